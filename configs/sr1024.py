"""Imagen super-resolution stage 256→1024: Efficient UNet without self-attention
(~390M params).

As sr256 but narrower at the two lowest levels (768 channels) and with text
cross-attention only ('cross': keys/values from the text tokens alone) at the
lowest resolution, so it runs on 1024px inputs without any image self-attention.

  python -m imagen_jax.models --config configs/sr1024.py
"""

from imagen_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  model = config_lib.efficient_unet(
    (128, 256, 512, 768, 768), (2, 4, 8, 8, 2), "cross", config.text.dim
  )
  stage = config_lib.stage_config("sr1024", 1024, model, lowres_resolution=256)
  stage.sample.guidance = 4.0
  config_lib.add_stage(config, stage)
  return config
