"""Training on 8 fake CPU devices: strategies agree, FSDP splits memory, resume is
exact, SIGTERM leaves a restorable checkpoint, bad settings fail clearly."""

import os
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from imagen_jax import parallel
from imagen_jax import run as run_lib
from imagen_jax.stages import build_stage
from imagen_jax.train import optim, state as state_lib, step as step_lib, trainer
from tiny import MODEL_FLAGS, ROOT, tiny_config as _tiny_config

MESHES = {
  "dp": {"data": -1},
  "fsdp": {"fsdp": -1},
  "tp": {"data": 2, "tensor": 4},
  "fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2},
}


def _mesh(strategy):
  return parallel.make_mesh(ml_collections.ConfigDict({"shape": MESHES[strategy]}))


def _fake_batch(config, b=8):
  rng = np.random.default_rng(0)
  r, d, length = config.stages.base.resolution, config.text.dim, 6
  return (
    {
      "image": rng.integers(0, 256, (b, r, r, 3), dtype=np.uint8),
      "text_emb": rng.normal(size=(b, length, d)).astype(np.float32),
      "text_mask": np.arange(length)[None].repeat(b, 0) < rng.integers(1, 7, (b, 1)),
    },
    {"text_emb": np.zeros((length, d), np.float32), "text_mask": np.zeros(length, bool)},
  )


def _one_step(config, strategy):
  stage = build_stage(config.stages.base)
  tc = config.train
  tx = optim.make_optimizer(tc)
  mesh = None if strategy is None else _mesh(strategy)
  rules = parallel.logical_rules(strategy or "dp")
  state, shardings = state_lib.create_train_state(
    jax.random.PRNGKey(0), stage, tx, mesh, rules, text_len=6
  )
  fn = step_lib.jit_train_step(stage, tx, tc, shardings, mesh, rules, optim.lr_schedule(tc))
  batch, uncond = _fake_batch(config)
  if mesh is not None:
    batch = {
      k: jax.device_put(v, s)
      for (k, v), s in zip(batch.items(), step_lib.batch_shardings(mesh).values())
    }
  state, metrics = fn(state, batch, jax.random.PRNGKey(1), uncond)
  return jax.device_get(state.params), float(metrics["loss"])


def _max_abs_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def _initial_params(config):
  return nn.unbox(build_stage(config.stages.base).init(jax.random.PRNGKey(0), 6))


def test_strategies_match_single_device(tmp_path):
  config = _tiny_config(tmp_path, warmup_steps=0, lr=1e-2)
  ref_params, ref_loss = _one_step(config, None)
  init = _initial_params(config)
  for strategy in ("dp", "fsdp", "tp", "fsdp_tp"):
    params, loss = _one_step(config, strategy)
    assert abs(loss - ref_loss) < 1e-5, strategy
    assert _max_abs_diff(params, ref_params) < 1e-5, strategy
    # The step changed the parameters (not a no-op that trivially agrees).
    assert _max_abs_diff(params, init) > 1e-4


def test_adafactor_steps_under_fsdp_like_on_one_device(tmp_path):
  """Adafactor's factored moments (not shaped like the params, so replicated) step
  under FSDP exactly as on one device, and the step moves the parameters."""
  config = _tiny_config(tmp_path, optimizer="adafactor", warmup_steps=0, lr=1e-2, weight_decay=0.0)
  ref_params, ref_loss = _one_step(config, None)
  params, loss = _one_step(config, "fsdp")
  assert np.isfinite(loss) and abs(loss - ref_loss) < 1e-5
  assert _max_abs_diff(params, ref_params) < 1e-5
  assert _max_abs_diff(params, _initial_params(config)) > 1e-4


def test_fsdp_splits_params_and_optimizer_state(tmp_path):
  config = _tiny_config(tmp_path)
  stage = build_stage(config.stages.base)
  tx = optim.make_optimizer(config.train)
  state, _ = state_lib.create_train_state(
    jax.random.PRNGKey(0), stage, tx, _mesh("fsdp"), parallel.logical_rules("fsdp"), 6
  )
  tree = (state.params, state.opt_state)
  total = sum(x.nbytes for x in jax.tree.leaves(tree))
  per_device = [
    sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == d)
    for d in jax.devices()
  ]
  assert max(per_device) <= 1.15 * total / 8, (per_device, total)


def _final_params(workdir, stage="base"):
  cfg = run_lib.read_config(workdir)
  params, step = run_lib.load_ema_params(workdir, build_stage(cfg.stages[stage]))
  return jax.device_get(params), step


@pytest.mark.slow
def test_resume_is_exact(tmp_path, shapes_data_dir):
  config = _tiny_config(shapes_data_dir, num_steps=6, checkpoint_every=3, async_checkpoint=False)
  straight = str(tmp_path / "straight")
  trainer.train_and_evaluate(config, straight, ["base"])
  # The same run, forgetting everything after step 3: restart from that checkpoint,
  # train 3 more.
  resumed = shutil.copytree(straight, str(tmp_path / "resumed"))
  shutil.rmtree(os.path.join(resumed, "base", "checkpoints", "6"))
  results = trainer.train_and_evaluate(config, resumed, ["base"])
  assert results[0].step == 6
  (a, step_a), (b, step_b) = _final_params(straight), _final_params(resumed)
  assert step_a == step_b == 6
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)
  lines = open(os.path.join(resumed, "base", "metrics.jsonl")).read().splitlines()
  assert len(lines) == 9  # 6 logged steps, then 3 more after the restart


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(tmp_path, shapes_data_dir):
  workdir = tmp_path / "run"
  cmd = [
    sys.executable,
    os.path.join(ROOT, "train.py"),
    "--config",
    os.path.join(ROOT, "configs/demo.py:tiny"),
    "--workdir",
    str(workdir),
    "--stage",
    "base",
    f"--config.data.data_dir={shapes_data_dir}",
    *MODEL_FLAGS,
    "--config.train.num_steps=100000",
    "--config.train.checkpoint_every=100000",
    "--config.train.sample_every=1",
  ]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  metrics = workdir / "base" / "metrics.jsonl"
  # Two logged steps before the signal; the wait ends as soon as they are there (a loaded
  # 2-core machine took longer than 240 s to compile the step and the grid sampler).
  deadline = time.time() + 600
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out.decode()[-2000:]
  assert b"preempted, checkpoint saved" in out
  params, step = _final_params(str(workdir))
  assert step >= 2
  grids = sorted(os.listdir(workdir / "base" / "samples"))
  assert grids and grids[0] == "step_0000001.png", grids
  assert np.isfinite(np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])).all()


def test_bad_settings(tmp_path, shapes_data_dir):
  config = _tiny_config(shapes_data_dir, batch_size=12)
  with pytest.raises(
    ValueError,
    match=r"batch_size=12 is not divisible by the data-parallel "
    r"size 8",
  ):
    trainer.train_and_evaluate(config, str(tmp_path / "a"), ["base"])
  with pytest.raises(ValueError, match="unknown stage 'nope'"):
    trainer.train_and_evaluate(config, str(tmp_path / "a"), ["nope"])
  with pytest.raises(ValueError, match="unknown sharding strategy 'zero3'"):
    parallel.logical_rules("zero3")


@pytest.mark.slow
def test_workdir_of_another_config_is_refused(tmp_path, shapes_data_dir):
  config = _tiny_config(shapes_data_dir, num_steps=2)  # test_train_reliability's program
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir, ["base"])
  before = sorted(os.listdir(os.path.join(workdir, "base", "checkpoints")))
  other = _tiny_config(shapes_data_dir, num_steps=2)
  other.stages.base.model.channels = (16, 48)
  with pytest.raises(ValueError, match="different model for stage 'base'"):
    trainer.train_and_evaluate(other, workdir, ["base"])
  assert sorted(os.listdir(os.path.join(workdir, "base", "checkpoints"))) == before
