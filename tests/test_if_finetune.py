"""Fine-tuning a converted DeepFloyd IF stage with the trainer, resuming it exactly,
sampling the result as a run and exporting it back to diffusers."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from imagen_jax import config as config_lib
from imagen_jax import run as run_lib
from imagen_jax.cascade import Cascade
from imagen_jax.convert import deepfloyd_if, if_export
from imagen_jax.stages import build_stage
from imagen_jax.train import trainer
import tiny
from tiny import if_pipeline as make_src

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def finetune_config(converted, data_dir, steps):
  config = config_lib.load_config(os.path.join(REPO, f"configs/deepfloyd_if.py:{converted}"))
  config.data.update(dict(name="shapes", data_dir=str(data_dir)))
  config.data.builder_kwargs = dict(tiny.SHAPES_KWARGS)
  config.mesh.shape = {"fsdp": -1}
  config.train.update(
    dict(
      num_steps=steps,
      batch_size=8,
      lr=1e-3,
      warmup_steps=1,
      log_every=1,
      checkpoint_every=1,
      async_checkpoint=False,
    )
  )
  return config


def final_params(workdir, stage_config):
  return run_lib.load_ema_params(str(workdir), build_stage(stage_config))[0]


@pytest.mark.slow
def test_finetune_resume_sample_export(tmp_path, shapes_data_dir):
  converted = str(tmp_path / "if_I")
  deepfloyd_if.convert(make_src("if_stage1", str(tmp_path / "IF-I")), converted)
  start = deepfloyd_if.load_converted(converted)[1]
  data = shapes_data_dir

  # Three steps straight; the same run without its step-3 checkpoint resumes from
  # step 2 and takes the third step again.
  config = finetune_config(converted, data, 3)
  straight = trainer.train_and_evaluate(config, str(tmp_path / "b"))
  shutil.copytree(tmp_path / "b", tmp_path / "a")
  shutil.rmtree(tmp_path / "a" / "if_I" / "checkpoints" / "3")
  resumed = trainer.train_and_evaluate(config, str(tmp_path / "a"))
  assert resumed[0].step == straight[0].step == 3
  a = final_params(tmp_path / "a", config.stages.if_I)
  b = final_params(tmp_path / "b", config.stages.if_I)
  assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))
  # It started from the converted weights (EMA after 3 steps stays close to them),
  # and it trained (they moved).
  diffs = [
    float(np.abs(np.asarray(x) - np.asarray(y)).max())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(start))
  ]
  assert 0 < max(diffs) < 0.05, max(diffs)
  losses = {}
  for run in ("a", "b"):
    with open(tmp_path / run / "if_I" / "metrics.jsonl") as f:
      losses[run] = [json.loads(line)["loss"] for line in f]
  assert len(losses["b"]) == 3 and np.isfinite(losses["b"]).all()
  assert losses["a"] == losses["b"] + losses["b"][-1:]  # step 3 again, the same loss

  # The fine-tuned run samples like any run, from its own checkpoints...
  saved = run_lib.read_config(str(tmp_path / "a"))
  assert saved.stages.if_I.source == "" and saved.stages.if_I.init_from == converted
  cascade = Cascade.from_workdir(str(tmp_path / "a"), mesh=None)
  out = cascade.sample(["a red circle"], jax.random.key(0), steps=2, progress=False)
  assert out.final.shape == (1, 16, 16, 3)
  # ... and goes back to diffusers.
  exported = if_export.export(str(tmp_path / "a"), str(tmp_path / "unet"), stage_name="if_I")
  assert sorted(os.listdir(exported)) == ["config.json", "diffusion_pytorch_model.safetensors"]
