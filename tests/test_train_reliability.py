"""Training never loses or corrupts work: the non-finite guard, checkpoint
fallback, the workdir lock, the full fingerprint, settings validated up front,
signals and failed saves (docs/reliability.md lists which test proves what)."""

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from imagen_jax import lockfile
from imagen_jax import run as run_lib
from imagen_jax.stages import build_stage
from imagen_jax.train import checkpoint as ckpt_lib
from imagen_jax.train import fingerprint, guard, trainer, validate

import sample
import tiny
import train
from tiny import MODEL_FLAGS, ROOT


def _tiny_config(data_dir, **train_settings):
  """The tests' tiny config (tests/tiny.py), base stage only, synchronous checkpoints."""
  config = tiny.tiny_config(data_dir, async_checkpoint=False)
  config.stage_order = ("base",)
  config.train.update(train_settings)
  return config


def _ckpt_dir(workdir, stage="base"):
  return run_lib.checkpoint_dir(str(workdir), stage)


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(_ckpt_dir(workdir)) if d.isdigit())


def _ema(workdir, step=None):
  cfg = run_lib.read_config(str(workdir))
  params, got = run_lib.load_ema_params(str(workdir), build_stage(cfg.stages.base), step=step)
  return jax.device_get(params), got


def _finite(tree) -> bool:
  return all(np.isfinite(x).all() for x in jax.tree.leaves(tree))


def _tree(path):
  """Every file under path with its size and mtime (to prove nothing changed)."""
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      st = os.stat(os.path.join(root, f))
      out[os.path.relpath(os.path.join(root, f), path)] = (st.st_size, st.st_mtime_ns)
  return out


def _train_py(data_dir, workdir, *flags, env=None, prefix=(), pause=None):
  """train.py in a subprocess; ``pause=(point, seconds)`` runs it through
  tests/paused_train.py, which pauses at that point (see there)."""
  script = [os.path.join(ROOT, "train.py")]
  if pause is not None:
    script = [os.path.join(ROOT, "tests", "paused_train.py"), pause[0], str(pause[1])]
  cmd = [
    *prefix,
    sys.executable,
    *script,
    "--config",
    os.path.join(ROOT, "configs/demo.py:tiny"),
    "--workdir",
    str(workdir),
    "--stage",
    "base",
    f"--config.data.data_dir={data_dir}",
    *MODEL_FLAGS,
    *flags,
  ]
  return subprocess.Popen(
    cmd,
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=dict(os.environ, **(env or {})),
  )


def _wait_for(proc, marker, seen, timeout=240):
  """Reads proc's output line by line until ``marker``; returns what was read."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    seen.append(line)
    if marker in line:
      return
  proc.kill()
  raise AssertionError(f"no {marker!r} in the output:\n" + "".join(seen)[-3000:])


# 1. Non-finite guard ---------------------------------------------------------------


@pytest.mark.slow
def test_blowup_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, shapes_data_dir):
  workdir = tmp_path / "run"
  # Warmup: step 1 runs at lr 0 (finite), step 2 on at lr 1e30 (update norm inf).
  flags = [
    "--config.train.lr=1e30",
    "--config.train.warmup_steps=1",
    "--config.train.num_steps=20",
    "--config.train.checkpoint_every=1",
    "--config.train.max_nonfinite_steps=2",
    "--config.train.async_checkpoint=False",
    "--stage=base",
    *MODEL_FLAGS,
  ]
  with pytest.raises(SystemExit) as exit_info:
    _main(shapes_data_dir, workdir, flags)
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]  # after progress bars
  assert err.startswith("train.py: error: stage base: 3 consecutive non-finite steps (2-4"), err
  assert err.endswith(f"last good checkpoint: {_ckpt_dir(workdir)}/1"), err
  assert _steps(workdir) == [1]  # nothing saved after the blow-up
  params, step = _ema(workdir)
  assert step == 1 and _finite(params)
  lines = [json.loads(l) for l in open(workdir / "base" / "metrics.jsonl")]
  assert [l["finite"] for l in lines] == [1.0, 0.0, 0.0]  # step 4 stopped before its line
  assert lines[1]["nonfinite_steps"] == 1


def _main(data_dir, workdir, flags):
  """train.py's main in this process; exits (SystemExit) with its status, as the script."""
  argv = [
    "--config",
    os.path.join(ROOT, "configs/demo.py:tiny"),
    "--workdir",
    str(workdir),
    f"--config.data.data_dir={data_dir}",
    *flags,
  ]
  sys.exit(train.main(argv))


def test_step_skips_nonfinite_update():
  """Inside the jitted step: a NaN batch leaves params, EMA and moments untouched."""
  config = _tiny_config("unused")
  from imagen_jax.train import optim, state as state_lib, step as step_lib  # pylint: disable=import-outside-toplevel

  stage = build_stage(config.stages.base)
  tx = optim.make_optimizer(config.train)
  state, shardings = state_lib.create_train_state(
    jax.random.PRNGKey(0), stage, tx, None, (), text_len=6
  )
  fn = step_lib.jit_train_step(
    stage, tx, config.train, shardings, None, (), optim.lr_schedule(config.train)
  )
  r, d = config.stages.base.resolution, config.text.dim
  batch = {
    "image": np.zeros((8, r, r, 3), np.uint8),
    "text_emb": np.full((8, 6, d), np.nan, np.float32),
    "text_mask": np.ones((8, 6), bool),
  }
  uncond = {"text_emb": np.zeros((6, d), np.float32), "text_mask": np.zeros(6, bool)}
  before = jax.device_get((state.params, state.ema_params, state.opt_state))
  state, metrics = fn(state, batch, jax.random.PRNGKey(1), uncond)
  assert float(metrics["finite"]) == 0.0 and int(state.step) == 1
  after = jax.device_get((state.params, state.ema_params, state.opt_state))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  g = guard.NonFiniteGuard("base", limit=1)
  g.record(1, metrics["finite"])
  assert g.check("x") == 1 and g.streak == 1
  g.record(2, metrics["finite"])
  with pytest.raises(guard.NonFiniteError, match="2 consecutive non-finite steps"):
    g.check("x")


# 2. Checkpoint fallback --------------------------------------------------------------


def _truncate_latest_ema(workdir):
  """Halves the newest step's EMA tree metadata (a host lost mid-copy).

  A file read from disk on every restore: the array data files of a step this
  process wrote may still be served from TensorStore's in-process cache.
  """
  step = _steps(workdir)[-1]
  victim = os.path.join(_ckpt_dir(workdir), str(step), "ema", "_METADATA")
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  return step


@pytest.mark.slow
def test_damaged_latest_step_falls_back(tmp_path, capsys, caplog, shapes_data_dir):
  workdir = tmp_path / "run"
  config = _tiny_config(shapes_data_dir, num_steps=4, checkpoint_every=2, keep_checkpoints=3)
  trainer.train_and_evaluate(config, str(workdir))
  assert _steps(workdir) == [2, 4]
  good, _ = _ema(workdir, step=2)
  assert _truncate_latest_ema(workdir) == 4
  # Sampling: the previous step, a warning naming the damaged one.
  out = tmp_path / "samples"
  with caplog.at_level(logging.WARNING):
    assert (
      sample.main(
        ["--workdir", str(workdir), "--prompt", "a red circle", "--steps", "2", "--out", str(out)]
      )
      == 0
    )
  assert "checkpoint step 4" in caplog.text and "unreadable" in caplog.text
  assert os.path.isfile(out / "000_00.png")
  params, step = _ema(workdir)
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, params, good)
  assert _steps(workdir) == [2, 4]  # sampling never moves or deletes anything
  # A crash left an unfinished save: cleaned at start.
  os.makedirs(os.path.join(_ckpt_dir(workdir), "3.orbax-checkpoint-tmp-1234", "ema"))
  capsys.readouterr()
  config.train.num_steps = 6
  results = trainer.train_and_evaluate(config, str(workdir))
  assert results[0].step == 6
  printed = capsys.readouterr().out
  assert f"stage base: resumed from step 2 ({_ckpt_dir(workdir)}/2)" in printed
  damaged = workdir / "base" / ckpt_lib.DAMAGED / "4"
  assert f"damaged checkpoint step 4 moved to {damaged}" in printed
  assert os.path.isdir(damaged)  # kept, never deleted
  assert sorted(os.listdir(_ckpt_dir(workdir))) == ["2", "4", "6"]
  assert _finite(_ema(workdir)[0])


# 3. Workdir lock and 4. fingerprint: one trained run ---------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_data_dir):
  """(workdir, data_dir): the tiny base stage trained 2 steps (checkpoint at 2)."""
  root = tmp_path_factory.mktemp("trained")
  config = _tiny_config(shapes_data_dir, num_steps=2, checkpoint_every=2)
  trainer.train_and_evaluate(config, str(root / "run"))
  return root / "run", shapes_data_dir


def _lock_path(workdir):
  return os.path.join(run_lib.stage_dir(str(workdir), "base"), ".lock")


def test_second_trainer_is_refused(trained, tmp_path):
  workdir, data = trained
  # This process plays the first trainer: a live pid on this host.
  with lockfile.hold(_lock_path(workdir), what="training workdir"):
    before = _tree(workdir)
    with pytest.raises(lockfile.Locked) as e:
      trainer.train_and_evaluate(_tiny_config(data, num_steps=4), str(workdir))
    assert _tree(workdir) == before  # nothing written, the holder's lock untouched
  message = str(e.value)
  assert "\n" not in message
  assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
  assert not os.path.exists(_lock_path(workdir))  # released by its holder


def _stale_lock(workdir, **info):
  with open(_lock_path(workdir), "w") as f:
    json.dump(
      dict(dict(pid=1, host=socket.gethostname(), what="x", since="then", token="t"), **info), f
    )


def test_stale_lock_is_taken_over(trained, caplog):
  workdir, data = trained
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _stale_lock(workdir, pid=dead.pid)
  config = _tiny_config(data, num_steps=2)
  with caplog.at_level(logging.WARNING):
    assert trainer.train_and_evaluate(config, str(workdir))[0].step == 2
  assert f"pid {dead.pid} is gone" in caplog.text
  assert not os.path.exists(_lock_path(workdir))  # released at the end
  # A holder on another host: only its heartbeat tells; an hour old is stale.
  _stale_lock(workdir, pid=os.getpid(), host="elsewhere")
  os.utime(_lock_path(workdir), (time.time() - 3600,) * 2)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert trainer.train_and_evaluate(config, str(workdir))[0].step == 2
  assert "no heartbeat for 3600 s" in caplog.text


@pytest.mark.parametrize(
  "field, value, message",
  [
    (
      "stages.base.diffusion.prediction",
      "eps",
      "different diffusion setting for stage 'base': config.stages.base.diffusion."
      "prediction is 'v' there but 'eps' now",
    ),
    ("stages.base.resolution", 8, "config.stages.base.resolution is 16 there but 8 now"),
    (
      "text.max_length",
      40,
      "different text encoder for stage 'base': config.text.max_length is 88 there but 40 now",
    ),
    (
      "data.builder_kwargs.num_train",
      32,
      "different data source for stage 'base': "
      "config.data.builder_kwargs.num_train is 64 there but 32 now",
    ),
    (
      "train.batch_size",
      16,
      "different batch size for stage 'base': config.train.batch_size is 8 there but 16 now",
    ),
  ],
)
def test_other_settings_are_refused_before_writing(trained, field, value, message):
  workdir, data = trained
  config = _tiny_config(data, num_steps=4)
  group, key = field.rsplit(".", 1)
  parent = config
  for part in group.split("."):
    parent = parent[part]
  parent[key] = value
  before = _tree(workdir)
  with pytest.raises(fingerprint.ConfigMismatch) as e:
    trainer.train_and_evaluate(config, str(workdir))
  assert message in str(e.value) and "\n" not in str(e.value)
  assert _tree(workdir) == before  # config.json and checkpoints untouched


def test_deleted_config_json(trained, tmp_path, caplog):
  workdir, data = trained
  os.rename(workdir / "config.json", tmp_path / "config.json")
  try:
    other = _tiny_config(data, num_steps=2)
    other.stages.base.diffusion.schedule = "linear"
    with pytest.raises(
      fingerprint.ConfigMismatch, match="config.stages.base.diffusion.schedule is 'cosine' there"
    ):
      trainer.train_and_evaluate(other, str(workdir))
    assert not os.path.exists(workdir / "config.json")  # refused before writing it
    # The checkpoints vouch for the same config: config.json is written again.
    with caplog.at_level(logging.WARNING):
      trainer.train_and_evaluate(_tiny_config(data, num_steps=2), str(workdir))
    assert "config.json was missing" in caplog.text
    written = json.loads((workdir / "config.json").read_text())
    assert written["stages"]["base"]["diffusion"]["schedule"] == "cosine"
  finally:
    os.replace(tmp_path / "config.json", workdir / "config.json")


def test_config_json_is_written_once(trained):
  workdir, data = trained
  before = (workdir / "config.json").read_bytes()
  config = _tiny_config(data, num_steps=2, lr=1e-3)  # a compatible change
  config.stages.base.sample.steps = 7
  trainer.train_and_evaluate(config, str(workdir))
  assert (workdir / "config.json").read_bytes() == before
  assert not fingerprint.write_config_once(str(workdir), config)


# 5. Settings validated up front ------------------------------------------------------


@pytest.mark.parametrize(
  "setting, value, message",
  [
    ("keep_checkpoints", 0, "config.train.keep_checkpoints=0 must be >= 1"),
    ("checkpoint_every", 0, "config.train.checkpoint_every=0 must be >= 1"),
    ("log_every", 0, "config.train.log_every=0 must be >= 1"),
    ("num_steps", 0, "config.train.num_steps=0 must be >= 1"),
    ("num_steps", -3, "config.train.num_steps=-3 must be >= 1"),
    ("batch_size", 0, "config.train.batch_size=0 must be >= 1"),
    ("batch_size", 12, "config.train.batch_size=12 is not divisible by the data-parallel size 8"),
    ("sample_every", -1, "config.train.sample_every=-1 must be >= 0"),
    ("max_nonfinite_steps", -1, "config.train.max_nonfinite_steps=-1 must be >= 0"),
  ],
)
def test_bad_settings_fail_before_anything(tmp_path, setting, value, message):
  config = _tiny_config(tmp_path / "data", **{setting: value})
  with pytest.raises(validate.ConfigError) as e:
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert message in str(e.value) and "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "data")


def test_train_py_bad_setting_exits_2(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    _main(tmp_path / "data", tmp_path / "run", ["--config.train.keep_checkpoints=0"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.strip().splitlines()[-1] == (
    "train.py: error: config.train.keep_checkpoints=0 must be >= 1: the checkpoints kept; "
    "0 would delete the one just written"
  )
  assert "Traceback" not in err
  assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "data")


# 6. Signals --------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_while_compiling_then_signals_during_the_save(tmp_path, shapes_data_dir):
  workdir = tmp_path / "run"
  proc = _train_py(
    shapes_data_dir,
    workdir,
    "--config.train.num_steps=100000",
    "--config.train.checkpoint_every=100000",
    pause=("save", 4),
  )
  seen = []
  _wait_for(proc, "stage base: compiling the train step", seen)
  proc.send_signal(signal.SIGTERM)
  _wait_for(proc, "[test pause] save", seen)
  # The save of the stop is in progress: more signals must not interrupt it.
  proc.send_signal(signal.SIGTERM)
  proc.send_signal(signal.SIGINT)
  out = "".join(seen) + proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "Traceback" not in out and "already stopping" in out
  assert "stage base: SIGTERM: saving checkpoint step" in out
  assert "preempted, checkpoint saved" in out
  steps = _steps(workdir)
  assert len(steps) == 1 and not [d for d in os.listdir(_ckpt_dir(workdir)) if not d.isdigit()]
  params, step = _ema(workdir)
  assert step == steps[0] and _finite(params)
  assert not os.path.exists(_lock_path(workdir))


@pytest.mark.slow
def test_ctrl_c_before_training_exits_130(tmp_path, shapes_data_dir):
  workdir = tmp_path / "run"
  proc = _train_py(shapes_data_dir, workdir, pause=("setup", 60))
  seen = []
  _wait_for(proc, "[test pause] setup", seen)
  proc.send_signal(signal.SIGINT)
  out = "".join(seen) + proc.communicate(timeout=60)[0]
  assert proc.returncode == 130, out[-3000:]
  assert out.strip().splitlines()[-1] == (
    "train.py: stopped by SIGINT before training started; nothing to save"
  )
  assert "Traceback" not in out
  assert not os.path.exists(_lock_path(workdir))
  assert not os.path.exists(_ckpt_dir(workdir))


# 7. A failed save (disk full) --------------------------------------------------------


@pytest.mark.slow
def test_failed_save_keeps_earlier_checkpoints(trained, tmp_path):
  workdir = shutil.copytree(trained[0], tmp_path / "run")
  shapes_data_dir = trained[1]
  biggest = max(
    os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(_ckpt_dir(workdir)) for f in fs
  )
  # A file-size limit (in KiB) under one checkpoint file; SIGXFSZ ignored, so
  # write() fails with EFBIG as on a full disk. A shell sets both (no preexec_fn:
  # forking this multithreaded process to run Python in the child can deadlock).
  limit_kib = max(1, biggest // 2 // 1024)
  shell = ["bash", "-c", f"ulimit -f {limit_kib} && trap '' XFSZ && exec \"$@\"", "bash"]
  proc = _train_py(
    shapes_data_dir,
    workdir,
    "--config.train.num_steps=4",
    "--config.train.checkpoint_every=2",
    prefix=shell,
  )
  out = proc.communicate(timeout=240)[0]
  assert proc.returncode == 1, out[-3000:]
  last = out.strip().splitlines()[-1]
  assert last.startswith(
    f"train.py: error: could not save the stage 'base' checkpoint of "
    f"step 4 to {_ckpt_dir(workdir)}/4: "
  ), out[-3000:]
  assert os.strerror(errno.EFBIG) in last and "earlier checkpoints intact: [2]" in last
  assert out.count("train.py: error:") == 1  # (orbax logs its writers' errors before it)
  assert sorted(os.listdir(_ckpt_dir(workdir))) == ["2"]  # no temp folder left
  params, step = _ema(workdir)
  assert step == 2 and _finite(params)
