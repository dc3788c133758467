"""A fine-tuned Stable Diffusion / x4-upscaler run back to a diffusers pipeline folder.

  python -m imagen_jax.convert export-diffusers --src runs/sd_ft --stage sd --out sd_ft

A run trained with ``configs/stable_diffusion.py`` holds latent stages whose
``init_from`` is the converted folder they started from. The export is that
folder's pipeline (component and scheduler configs, CLIP text encoder, tokenizer)
with the run's latest EMA UNet and VAE in place of the converted ones
(``stable_diffusion.write_pipeline``); the VAE was frozen, so it is the converted
one bit for bit.
"""

import os
from typing import Optional

from imagen_jax import run as run_lib
from imagen_jax.convert import if_export, stable_diffusion
from imagen_jax.stages import build_stage


def is_latent_run(src: str, stage_name: Optional[str] = None) -> bool:
  """Whether ``src`` is a training run whose (named or only) stage is a latent stage."""
  try:
    stage, converted = if_export.read_stage(src, stage_name)
  except (OSError, ValueError):
    return False
  return not converted and stage.get("diffusion", {}).get("kind") == "latent"


def export_run(
  src: str, out: str, *, stage_name: Optional[str] = None, dtype: str = "float32"
) -> str:
  """Writes the diffusers pipeline of a run's latent stage (module docstring).

  Returns:
    The absolute output path.

  Raises:
    FileNotFoundError, FileExistsError, ValueError: one line naming the run, the stage
      or the file (nothing written).
  """
  if dtype not in if_export.OUT_DTYPES:
    raise ValueError(f"dtype must be one of {sorted(if_export.OUT_DTYPES)}, got {dtype!r}")
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"output {out} exists and is not an empty directory")
  stage_config, _ = if_export.read_stage(src, stage_name)
  folder = stage_config.get("init_from") or ""
  if not folder or not run_lib.is_converted_sd(folder):
    raise ValueError(
      f"{src}: stage {stage_config.name!r} was not fine-tuned from a converted Stable "
      f"Diffusion folder (init_from={folder!r}); its diffusers configs are there"
    )
  converted, params = stable_diffusion.load_converted(folder)
  ema, _ = run_lib.load_ema_params(src, build_stage(stage_config))
  params = dict(params, unet=ema["unet"], vae=ema["vae"])
  return stable_diffusion.write_pipeline(converted, params, folder, out, dtype)
