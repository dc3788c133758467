"""The training loop's periodic actions and the metrics writer, without training."""

import json
import os

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from imagen_jax.train import periodic, signals


def test_periods():
  every = periodic.Periodic(3, last_step=7)
  assert [s for s in range(1, 8) if every.due(s)] == [3, 6, 7]
  assert not any(periodic.Periodic(0, 7).due(s) for s in range(1, 8))
  assert not any(periodic.Periodic(None, 7).due(s) for s in range(1, 8))
  grids = periodic.SampleGrids(None, stage=None, every=1, last_step=7)
  assert not grids.due(1)  # no sample function: never


def test_stop_agreement_reads_the_signal_flag():
  stop = signals.StopSignals()
  agree = periodic.StopAgreement(stop)
  assert agree.maybe(1) is False
  stop.requested = True
  assert agree.maybe(2) is True


def test_remote_metrics_are_appended_through_one_handle(tmp_path):
  """A gs:// metrics.jsonl: opened once per writer (earlier lines kept), not rewritten per line."""
  opened = []

  def local(path):
    path = os.fspath(path)
    return str(tmp_path) + path[len("gs://b") :] if path.startswith("gs://b") else path

  def one(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def open_(original, path, mode="r", *args, **kwargs):
    opened.append((os.fspath(path), mode))
    return original(local(path), mode, *args, **kwargs)

  fns = dict.fromkeys(("exists", "isdir", "listdir", "makedirs", "mkdir", "glob", "stat"), one)
  with epath_testing.mock_epath(open=open_, **fns):
    for first in (1, 10):  # a run, then its resumption
      writer = periodic.MetricWriter("gs://b/run/base")
      for step in range(first, first + 5):
        writer.write(step, {"loss": 1.0 / step})
      writer.close()
      writer.close()  # idempotent
  writes = [m for p, m in opened if p == "gs://b/run/base/metrics.jsonl" and "w" in m]
  assert len(writes) == 2  # one handle per writer, not one rewrite per line
  lines = (tmp_path / "run" / "base" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 10, 11, 12, 13, 14]


def test_local_metrics_are_flushed_per_line(tmp_path):
  writer = periodic.MetricWriter(str(tmp_path / "base"))
  writer.write(1, {"loss": 0.5})
  # Readable before the writer closes: a crash loses nothing written.
  assert json.loads((tmp_path / "base" / "metrics.jsonl").read_text()) == {"step": 1, "loss": 0.5}
  writer.close()
  assert epath.Path(tmp_path / "base" / "metrics.jsonl").exists()


if __name__ == "__main__":
  raise SystemExit(pytest.main([__file__]))
