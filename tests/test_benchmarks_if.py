"""benchmarks.if_sampling at tiny size, the peers' imports, and the one IF_SCHEDULER."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import if_sampling
from imagen_jax.convert import if_config
from imagen_jax.diffusion import schedules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def test_if_sampling_cli_tiny(tmp_path, capsys):
  """The README's command at tiny size: the converted stage's guided DDPM, IF's timesteps."""
  out_file = tmp_path / "if.json"
  argv = ["--width", "32", "--batch", "1", "--steps", "3", "--repeats", "1"]
  assert if_sampling.main(argv + ["--resolution", "16", "--json", str(out_file)]) == 0
  out = json.loads(out_file.read_text())
  assert (out["width"], out["resolution"], out["batch"]) == (32, 16, 1)
  assert (out["steps"], out["sampler"]) == (3, "ddpm")
  assert tuple(out["timesteps"]) == schedules.if_timesteps(3, 1000, "leading")
  assert out["sample_s"] > 0 and out["images_per_s"] == 1 / out["sample_s"]
  assert "3 guided ddpm steps" in capsys.readouterr().out


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--width", "40"], "--width must be a multiple of 32"),
    (["--resolution", "20"], "--resolution must be a multiple of 8"),
    (["--steps", "0"], "must be >= 1"),
  ],
)
def test_if_sampling_bad_input_is_a_usage_error(argv, message, capsys):
  with pytest.raises(SystemExit) as exc:
    if_sampling.main(argv)
  assert exc.value.code == 2
  assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_every_benchmark_imports_and_the_peers_not_the_cli():
  """Every benchmarks module imports without PyTorch; peer_if / peer_imagen share
  benchmarks.common, not benchmarks.peers (no import circle)."""
  names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py"))
  code = (
    "import importlib, sys, benchmarks.peer_if, benchmarks.peer_imagen; "
    "print('benchmarks.peers' in sys.modules); "
    f"[importlib.import_module('benchmarks.' + n) for n in {names!r}]; "
    "print('torch' in sys.modules)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["False", "False"]


def test_one_if_scheduler_is_the_fixtures():
  """The scheduler configs the fixture generator wrote are IF_SCHEDULER (stage II: max 1)."""
  with open(os.path.join(FIXTURES, "if_stage1", "scheduler", "scheduler_config.json")) as f:
    assert json.load(f) == if_config.IF_SCHEDULER
  with open(os.path.join(FIXTURES, "if_stage2", "scheduler", "scheduler_config.json")) as f:
    assert json.load(f) == dict(if_config.IF_SCHEDULER, sample_max_value=1.0)
