"""Training from streamed webdataset / parquet shards: exact resume, skip counts in
metrics.jsonl, the README's commands, bad sources refused in one line (exit 2)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

import corpus_testdata as td
from imagen_jax import config as config_lib
from imagen_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The base model of _config, as command-line overrides (the same compiled step).
SMALL = [
  "--config.stages.base.model.channels=(16, 32)",
  "--config.stages.base.model.num_res_blocks=(1, 1)",
  "--config.stages.base.model.attention=('none', 'self_cross')",
]


def _config(variant, src, **train):
  config = config_lib.load_config(os.path.join(ROOT, f"configs/own_data.py:{variant},tiny"))
  config.data.update(dict(src=src, shuffle_buffer=4, interleave=2))
  config.train.update(train)
  # Two levels instead of three, as tests/test_train.py: compiles several times faster.
  config.stages.base.model.update(
    dict(channels=(16, 32), num_res_blocks=(1, 1), attention=("none", "self_cross"))
  )
  return config


def _final(workdir):
  ckpt = os.path.join(workdir, "base", "checkpoints")
  step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  mgr = ocp.CheckpointManager(ckpt, item_names=("train", "data"))
  restored = mgr.restore(
    step, args=ocp.args.Composite(train=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())
  )
  return restored.train["params"], restored.data


def test_webdataset_resume_is_exact_and_skips_are_logged(tmp_path):
  td.make_webdataset(str(tmp_path / "shards"))
  config = _config(
    "webdataset",
    str(tmp_path / "shards/{00000..00003}.tar"),
    num_steps=6,
    checkpoint_every=3,
    async_checkpoint=False,
    log_every=1,
  )
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  trainer.train_and_evaluate(config, straight, ["base"])
  trainer.train_and_evaluate(config, resumed, ["base"])
  shutil.rmtree(os.path.join(resumed, "base", "checkpoints", "6"))
  assert trainer.train_and_evaluate(config, resumed, ["base"])[0].step == 6
  (a, data_a), (b, data_b) = _final(straight), _final(resumed)
  jax.tree.map(np.testing.assert_array_equal, a, b)  # the same examples, in order
  assert data_a == data_b and len(data_a["stream"]) == 1 and data_a["examples"] == 48
  lines = [json.loads(x) for x in open(os.path.join(straight, "base", "metrics.jsonl"))]
  last = lines[-1]
  # 48 examples of 22 decodable per epoch: epoch 2 began, every skip reason was met.
  for reason in ("no_caption", "no_image", "undecodable_image", "truncated_shard"):
    assert last[f"skipped_{reason}"] >= 2, last


def _train_py(*args, timeout=600):
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_parquet_trains_through_train_py(tmp_path):
  td.make_parquet(str(tmp_path / "pq"))
  out = _train_py(
    "--config",
    "configs/own_data.py:parquet,tiny",
    "--workdir",
    str(tmp_path / "run"),
    "--stage",
    "base",
    f"--config.data.src={tmp_path / 'pq'}/*.parquet",
    "--config.train.num_steps=6",  # as above: the step compiled there is in the cache
    *SMALL,
    timeout=1800,  # a cold compile on a loaded 2-core machine took over 7 minutes
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "stage base: step 6" in out.stdout
  metrics = [json.loads(x) for x in open(tmp_path / "run" / "base" / "metrics.jsonl")]
  assert metrics[-1]["step"] == 6 and metrics[-1]["skipped_no_caption"] >= 1


def test_bad_sources_one_line_exit_2(tmp_path):
  td.make_parquet(str(tmp_path / "pq"), num_shards=1)
  cases = [
    ("webdataset", f"{tmp_path}/none/*.tar", "matches no file"),
    ("webdataset", f"{tmp_path}/{{0..2.tar", "Malformed brace pattern"),
    ("parquet", f"{tmp_path}/pq/*.parquet --config.data.image_column=png", "columns: key, jpg"),
  ]
  for variant, src, words in cases:
    src, *more = src.split(" ")
    out = _train_py(
      "--config",
      f"configs/own_data.py:{variant},tiny",
      "--workdir",
      str(tmp_path / "r"),
      f"--config.data.src={src}",
      *more,
      timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("train.py: error: ") and words in lines[-1], out.stderr[-2000:]
