"""Imagen base stage: 64×64 text-to-image UNet at the paper's scale (~2.1B params).

Width 512, multipliers (1, 2, 3, 4), 3 ResBlocks per level, text attention
('self_cross') at 32/16/8, head dim 64, conditioning width 2048 (time embedding
and projected T5-XXL text), T5-XXL text width 4096.

  python -m imagen_jax.models --config configs/base64.py
"""

from imagen_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.text.dim = 4096
  model = dict(
    channels=(512, 1024, 1536, 2048),
    num_res_blocks=3,
    attention=("none", "self_cross", "self_cross", "self_cross"),
    mid_attention="self_cross",
    head_dim=64,
    time_embed_dim=2048,
    text_dim=config.text.dim,
    text_proj_dim=2048,
    text_pool="attention",
    text_pool_projected=True,
    dtype="bfloat16",
    param_dtype="float32",
    remat="full",
  )
  config_lib.add_stage(config, config_lib.stage_config("base64", 64, model))
  return config
