"""Fine-tuning a converted Stable Diffusion stage with train.py: only the UNet trains (the
VAE comes back bit for bit and has no optimizer state), the run resumes, samples through
sample.py and exports back to a diffusers pipeline."""

import os

import jax
import numpy as np
import optax
import pytest
from PIL import Image

import sample
import train
from imagen_jax import config as config_lib
from imagen_jax import run as run_lib
from imagen_jax.convert import sd_export, stable_diffusion
from imagen_jax.stages import build_stage
from imagen_jax.train import state as state_lib
from imagen_jax.train import validate
import tiny


def _bits(tree) -> list:
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _images(root) -> str:
  """Eight 24px PNGs with short captions (the tiny CLIP tokenizer keeps 7 tokens)."""
  rng = np.random.default_rng(0)
  os.makedirs(root)
  for i in range(8):
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(f"{root}/{i}.png")
    with open(f"{root}/{i}.txt", "w") as f:
      f.write(["red", "blue"][i % 2])
  return str(root)


def test_only_the_unet_has_optimizer_state(sd_converted):
  stage = build_stage(run_lib.read_config(str(sd_converted / "sd_v1_tiny")).stages.sd)
  _, abstract = state_lib.state_shardings(stage, optax.adam(1e-3), None, None)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract)]
  opt = [p for p in paths if p.startswith(".opt_state")]
  assert opt and all("'unet'" in p for p in opt if "count" not in p), opt[:4]
  assert any(p.startswith(".params['vae']") for p in paths)


@pytest.mark.slow
def test_finetune_resume_sample_export(sd_converted, tmp_path):
  folder = str(sd_converted / "sd_v1_tiny")
  workdir = str(tmp_path / "run")
  argv = ["--config", os.path.join(tiny.ROOT, f"configs/stable_diffusion.py:{folder}")]
  argv += ["--workdir", workdir, f"--config.data.src={_images(tmp_path / 'images')}"]
  argv += [f"--config.data.data_dir={tmp_path / 'data'}"]
  # One step as the README row runs it (the same compiled step), then one more.
  flags = list(tiny.SD_FINETUNE_FLAGS)
  assert train.main(argv + flags) == 0

  config = run_lib.read_config(workdir)
  stage = build_stage(config.stages.sd)
  start = run_lib.load_sd_params(folder, stage)
  tuned, step = run_lib.load_ema_params(workdir, stage)
  assert step == 1
  assert _bits(tuned["vae"]) == _bits(start["vae"])  # frozen: bit for bit
  assert _bits(tuned["unet"]) != _bits(start["unet"])  # trained

  # A second call continues from the checkpoint (step 1 → 2), the VAE still untouched.
  # (With a sample grid at step 2: the trainer's grids take each stage's own encoder.)
  flags[flags.index("--config.train.num_steps=1")] = "--config.train.num_steps=2"
  grids = ["--config.train.sample_every=2", "--config.train.sample_prompts=('red',)"]
  assert train.main(argv + flags + grids) == 0
  assert os.path.isfile(os.path.join(workdir, "sd", "samples", "step_0000002.png"))
  tuned2, step = run_lib.load_ema_params(workdir, stage)
  assert step == 2 and _bits(tuned2["vae"]) == _bits(start["vae"])
  assert _bits(tuned2["unet"]) != _bits(tuned["unet"])
  with open(os.path.join(workdir, "sd", "metrics.jsonl")) as f:
    assert len(f.readlines()) == 2

  # An ordinary run: sample.py samples it with the stage's CLIP tower...
  out = str(tmp_path / "samples")
  argv = ["--workdir", workdir, "--steps", "2", "--prompt", "red", "--out", out]
  assert sample.main(argv) == 0
  assert Image.open(os.path.join(out, "000_00.png")).size == (stage.resolution,) * 2
  # ... and export-diffusers writes the fine-tuned UNet back in a diffusers pipeline.
  exported = sd_export.export_run(workdir, str(tmp_path / "exp"), stage_name="sd")
  assert sorted(os.listdir(exported)) == [
    "model_index.json",
    "scheduler",
    "text_encoder",
    "tokenizer",
    "unet",
    "vae",
  ]
  _, unet = stable_diffusion.load_unet(exported)
  assert _bits(unet) == _bits(tuned2["unet"])


def test_precomputed_t5_embeddings_are_refused(sd_converted):
  folder = sd_converted / "sd_v1_tiny"
  config = config_lib.load_config(os.path.join(tiny.ROOT, f"configs/stable_diffusion.py:{folder}"))
  config.text.precomputed = True
  with pytest.raises(validate.ConfigError, match="own CLIP tower"):
    validate.check_train_settings(config)
