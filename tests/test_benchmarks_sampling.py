"""benchmarks/sampling.py: per-step-count compile and run times of the cascade sampler."""

import pytest

from benchmarks import sampling as bench
from imagen_jax import config as config_lib


@pytest.mark.slow
def test_measure_recompiles_each_step_count():
  config = config_lib.load_config("configs/demo.py:tiny")
  rows = bench.measure(config, [2, 3], batch=2)
  assert [r["steps"] for r in rows] == [2, 3]
  for r in rows:
    assert set(r["stages"]) == {"base", "sr"}
    assert r["finite"]
    for s in r["stages"].values():
      assert s["compile_s"] > 0  # a fresh Cascade traces every loop again
      assert s["run_s"] >= 0
    assert r["compile_s"] == pytest.approx(sum(s["compile_s"] for s in r["stages"].values()))
  table = bench.format_table(rows)
  assert table.count("\n") == 3 and "base compile s" in table


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--config", "configs/demo.py:tiny", "--steps", "0"], "positive integers"),
    (["--config", "configs/demo.py:tiny", "--batch", "0"], "--batch"),
    (["--config", "configs/nope.py"], "error:"),
  ],
)
def test_cli_rejects_bad_input(argv, message, capsys):
  assert bench.main(argv) == 2
  assert message in capsys.readouterr().err


def test_one_chip_answer_from_per_program_memory():
  """The one-chip line's four answers, from per-chip params and peaks (GiB)."""
  import types

  from benchmarks import sampling

  def row(kind, name, state, peak, hbm):
    g = 2**30
    return types.SimpleNamespace(
      kind=kind, stage=name, state_bytes=state * g, peak_bytes=peak and peak * g, hbm_bytes=hbm * g
    )

  def answer(hbm):
    programs = [("text", "t5", 8.5, 8.6), ("sample", "base", 4, 4.5), ("sample", "sr", 1, 8)]
    return sampling.one_chip([row(*p, hbm) for p in programs])

  assert "all programs resident at once" in answer(24)  # 13.5 + 7 = 20.5
  assert "text encoders freed after encoding (the stages together 12.0 GiB;" in answer(16)
  assert "only one program at a time" in answer(10)  # stages alone 12 > 10
  assert "sample.py --offload stages" in answer(10) and "--offload text" in answer(16)
  assert "no: text t5 alone needs 8.6 GiB" in answer(8)
  failed = row("sample", "base", 4, None, 16)
  assert "not answered" in sampling.one_chip([row("text", "t5", 8.5, 8.6, 16), failed])
