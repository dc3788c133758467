"""sample.py end to end on a tiny run directory, and its bad-input errors."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from imagen_jax.eval import shapes as eval_shapes
from imagen_jax import run as run_lib
from imagen_jax.train import checkpoint as ckpt_lib
from imagen_jax.train.state import TrainState

import sample  # noqa: E402  pylint: disable=wrong-import-position
from test_cascade import tiny_cascade_parts  # noqa: E402  pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_run(workdir, stages=None, step=7):
  """A run dir as train.py leaves it: config.json and EMA checkpoints of `stages`."""
  config, _, params = tiny_cascade_parts()
  run_lib.write_config(str(workdir), config)
  for name in stages if stages is not None else config.stage_order:
    state = TrainState(
      step=jnp.asarray(step, jnp.int32), params=params[name], ema_params=params[name], opt_state=()
    )
    ckpt = ckpt_lib.StageCheckpointer(str(workdir), name, async_save=False)
    ckpt.save(step, state, data_state={}, meta={"stage": name, "step": step})
    ckpt.close()
  return config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  make_run(workdir)
  return str(workdir)


def test_end_to_end(run_dir, tmp_path, capsys, caplog):
  prompts_file = tmp_path / "prompts.txt"
  long_prompt = "a blue square in the center " * 4  # > 48 ByT5 tokens: truncated
  prompts_file.write_text(f"\n{long_prompt}\n\n")
  out = tmp_path / "out"
  rc = sample.main(
    [
      "--workdir",
      run_dir,
      "--prompt",
      "a red circle in the top left",
      "--prompts_file",
      str(prompts_file),
      "--num_per_prompt",
      "2",
      "--steps",
      "2,2",
      "--guidance",
      "4,off",
      "--out",
      str(out),
    ]
  )
  assert rc == 0
  names = sorted(os.listdir(out))
  assert names == [
    "000_00.png",
    "000_01.png",
    "001_00.png",
    "001_01.png",
    "grid.png",
    "grid_base.png",
    "grid_sr.png",
    "prompts.json",
  ]
  image = np.asarray(Image.open(out / "001_01.png"))
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  assert json.loads((out / "prompts.json").read_text()) == [
    "a red circle in the top left",
    long_prompt.strip(),
  ]
  printed = capsys.readouterr().out
  assert str(out) in printed and "compile" in printed and "guidance off" in printed
  assert "truncated" in caplog.text


@pytest.mark.parametrize(
  "extra, message",
  [
    ([], "no prompts"),
    (["--prompts_file", "/nonexistent/prompts.txt"], "does not exist"),
    (["--prompt", "x", "--steps", "64"], "--steps has 1 value but the cascade has 2 stages"),
    (["--prompt", "x", "--guidance", "5,3,1"], "--guidance has 3 values"),
    (["--prompt", "x", "--steps", "64,abc"], "'abc' is not an integer"),
    (["--prompt", "x", "--num_per_prompt", "0"], "--num_per_prompt must be >= 1"),
    (["--prompt", "x", "--steps", "0,2"], "steps must be >= 1"),
    (["--prompt", "x", "--guidance", "inf,1"], "guidance must be a finite number"),
    (["--prompt", "x", "--guidance=-1,1"], "guidance must be a finite number >= 0"),
    (["--prompt", "x", "--batch_size", "0"], "--batch_size must be >= 1"),
    (["--prompt", "x", "--noise_level", "0.3,0.2"], "stage 'base' takes no low-resolution"),
    (["--prompt", "x", "--noise_level", "none,abc"], "'abc' is not a number"),
    (["--prompt", "x", "--noise_level", "2"], "aug_level must be in [0, 1]"),
  ],
)
def test_bad_input(run_dir, capsys, extra, message):
  assert sample.main(["--workdir", run_dir] + extra) == 2
  assert message in capsys.readouterr().err


def test_prompts_file_encodings(run_dir, tmp_path, capsys):
  bad = tmp_path / "latin1.txt"
  bad.write_bytes("a red circle in the top left caf\xe9\n".encode("latin-1"))
  assert sample.main(["--workdir", run_dir, "--prompts_file", str(bad)]) == 2
  err = capsys.readouterr().err
  assert "is not UTF-8 text" in err and str(bad) in err and err.count("\n") == 1
  bom = tmp_path / "bom.txt"
  bom.write_bytes("\ufeffa red circle in the top left\n".encode("utf-8"))
  assert sample.read_prompts([], str(bom)) == ["a red circle in the top left"]


def test_missing_checkpoint_names_stage_and_command(tmp_path, capsys):
  make_run(tmp_path, stages=["base"])
  assert sample.main(["--workdir", str(tmp_path), "--prompt", "a red circle"]) == 2
  err = capsys.readouterr().err
  assert "stage 'sr' has no checkpoint" in err and "--stage sr" in err
  assert "stage 'base'" not in err


def test_no_run_exits_2_without_traceback(tmp_path):
  proc = subprocess.run(
    [sys.executable, "sample.py", "--workdir", str(tmp_path / "none"), "--prompt", "a red circle"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2
  assert "config.json does not exist" in proc.stderr and "train.py" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_eval_cli_end_to_end(run_dir, tmp_path, capsys):
  rc = eval_shapes.main(
    [
      "--workdir",
      run_dir,
      "--num",
      "9",
      "--batch",
      "8",
      "--split",
      "holdout",
      "--steps",
      "1,1",
      "--guidance",
      "3,off",
      "--out",
      str(tmp_path),
    ]
  )
  assert rc == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["count"] == 9 and summary["holdout"]["count"] == 9
  assert summary["single_object"]["count"] + summary["two_object"]["count"] == 9
  assert summary["timings"]["base"]["calls"] == 2  # batches of 8 and 1 (padded to 8)
  saved = json.loads((tmp_path / "eval_shapes_holdout.json").read_text())
  assert len(saved["results"]) == 9 and "green triangle" in saved["results"][0]["caption"]
  grid = np.asarray(Image.open(tmp_path / "eval_shapes_holdout.png"))
  assert grid.shape == (3 * 34 + 2, 3 * 34 + 2, 3)


def test_eval_cli_bad_steps(run_dir, capsys):
  assert eval_shapes.main(["--workdir", run_dir, "--steps", "4"]) == 2
  assert "steps has 1 value " in capsys.readouterr().err
