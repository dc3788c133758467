"""benchmarks.input_pipeline at toy size: every source and resolution measured; bad flags."""

import os

from benchmarks import input_pipeline
from imagen_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_source_and_resolution_is_read():
  config = config_lib.load_config(os.path.join(ROOT, "configs/own_data.py:tiny"))
  result = input_pipeline.run(config, workers=2, n=8, steps=0)
  got = {(r["source"], r["resolution"]) for r in result["reads"]}
  assert got == {(s, r) for s in ("webdataset", "parquet", "array_record") for r in (64, 256)}
  assert all(r["examples_per_s"] > 0 for r in result["reads"])
  assert "| array_record | 256 |" in input_pipeline.table(result)


def test_bad_flags_exit_2(capsys):
  args = ["--config", os.path.join(ROOT, "configs/own_data.py:tiny"), "--examples", "0"]
  assert input_pipeline.main(args) == 2
  assert "--examples=0 must be positive" in capsys.readouterr().err
