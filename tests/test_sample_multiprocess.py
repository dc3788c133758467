"""sample.py and eval.fid on 2 processes × 4 CPU devices make what 1 process × 8 makes.

Each process samples every other batch on its own devices; process 0 gathers
and writes the images (sample.py) or scores them (eval.fid). The processes talk
over localhost through JAX's multi-process runtime (gloo CPU collectives), as
tests/test_multiprocess.py's training runs do.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from imagen_jax.data import shapes as shapes_data
from imagen_jax.eval import fid_stats, inception

from test_multiprocess import _env, _free_port  # noqa: E402
from test_sample_cli import make_run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle in the top left", "a blue square in the center"]
BATCH = 8  # a multiple of both device counts: batch c holds the same rows in both launches


def _launch(module_or_script, flags, num_processes, devices):
  """Runs one launch (1 or 2 processes); returns process 0's output."""
  port = _free_port()
  procs = []
  for i in range(num_processes):
    dist = []
    if num_processes > 1:
      dist = [
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={num_processes}",
        f"--process_id={i}",
        "--distributed_timeout=120",
      ]
    cmd = [sys.executable, *module_or_script, *flags, *dist]
    procs.append(
      subprocess.Popen(
        cmd, cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
      )
    )
  outs = []
  for p in procs:
    out, _ = p.communicate(timeout=900)
    outs.append(out.decode())
    assert p.returncode == 0, out.decode()[-3000:]
  return outs[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny run, synthetic Inception weights, reference statistics, a prompts file."""
  root = tmp_path_factory.mktemp("mp_sample")
  make_run(root / "run")
  weights = str(root / "inception.safetensors")
  save_file(inception.synthetic_state_dict(0), weights)
  folder = root / "reference"
  folder.mkdir()
  for i in range(6):
    Image.fromarray(shapes_data.sample_scene((7, 0, i), 32)[0]).save(folder / f"{i}.png")
  ref = str(root / "ref.npz")
  flags = ["--folder", str(folder), "--resolution", "32", "--inception", weights]
  flags += ["--inception_resolution", "75", "--batch", str(BATCH), "--out", ref]
  assert fid_stats.main(flags) == 0
  prompts = root / "prompts.txt"
  prompts.write_text("\n".join(PROMPTS) + "\n")
  return {
    "root": root,
    "run": str(root / "run"),
    "weights": weights,
    "ref": ref,
    "prompts": prompts,
  }


def _images(directory):
  names = sorted(n for n in os.listdir(directory) if n[0].isdigit())
  return names, np.stack([np.asarray(Image.open(os.path.join(directory, n))) for n in names])


@pytest.mark.multiprocess
def test_two_processes_sample_the_images_of_one(files):
  flags = ["--workdir", files["run"], "--prompts_file", str(files["prompts"]), "--steps", "2,2"]
  flags += ["--num_per_prompt", "8", "--batch_size", str(BATCH), "--seed", "3"]
  outs = {}
  for procs, devices in ((1, 8), (2, 4)):
    out_dir = files["root"] / f"samples_{procs}"
    _launch(["sample.py"], flags + ["--out", str(out_dir)], procs, devices)
    outs[procs] = _images(out_dir)
  names, one = outs[1]
  assert len(names) == 16 and outs[2][0] == names  # 2 batches: one per process
  two = outs[2][1]
  diff = np.abs(one.astype(int) - two.astype(int))
  # Bit-identical where measured; another device count per batch may reorder a
  # float reduction elsewhere: at most a rare pixel a step apart (the bound of
  # tests/test_cascade.py's sharded sampling).
  assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())
  assert not np.array_equal(one[:8], one[8:])  # the two batches are different images


@pytest.mark.multiprocess
def test_two_processes_score_the_fid_of_one(files):
  flags = ["--workdir", files["run"], "--steps", "2,2", "--batch", str(BATCH)]
  flags += ["--inception", files["weights"], "--inception_resolution", "75"]
  flags += ["--reference", files["ref"], "--prompts_file", str(files["prompts"]), "--num", "16"]
  flags += ["--clip", os.path.join(ROOT, "tests", "fixtures", "clip_tiny")]
  results = {}
  for procs, devices in ((1, 8), (2, 4)):
    path = files["root"] / f"fid_{procs}.json"
    _launch(["-m", "imagen_jax.eval.fid"], flags + ["--out", str(path)], procs, devices)
    results[procs] = json.loads(path.read_text())
  one, two = results[1], results[2]
  assert one["num"] == two["num"] == 16 and math.isfinite(one["fid"]) and one["fid"] > 0
  assert two["fid"] == pytest.approx(one["fid"], rel=1e-4)
  assert one["clip_score"]["count"] == two["clip_score"]["count"] == 16
  assert two["clip_score"]["mean"] == pytest.approx(one["clip_score"]["mean"], rel=1e-4)
