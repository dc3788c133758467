"""Imagen super-resolution stage 64→256: Efficient UNet (~600M params).

Width 128, multipliers (1, 2, 4, 8, 8), ResBlocks (2, 4, 8, 8, 2) per level,
self-attention with text keys/values only at the lowest resolution, skips
scaled by 1/√2, the noise-augmented 64px image concatenated on channels and
its augmentation level embedded like the timestep.

  python -m imagen_jax.models --config configs/sr256.py
"""

from imagen_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  model = config_lib.efficient_unet(
    (128, 256, 512, 1024, 1024), (2, 4, 8, 8, 2), "self_cross", config.text.dim
  )
  stage = config_lib.stage_config("sr256", 256, model, lowres_resolution=64)
  stage.sample.guidance = 4.0
  config_lib.add_stage(config, stage)
  return config
