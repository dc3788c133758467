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
