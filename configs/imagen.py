"""Imagen's whole cascade at the paper's scale: base64 (~2.1B) → sr256 (~600M) →
sr1024 (~390M), the three stage files composed in generation order.

  python -m benchmarks.sampling --topology v5e:1x1 --config configs/imagen.py \
      --param_dtype bfloat16
"""

import os

from imagen_jax import config as config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
  config = config_lib.load_config(os.path.join(_HERE, "base64.py"))
  for name in ("sr256", "sr1024"):
    part = config_lib.load_config(os.path.join(_HERE, f"{name}.py"))
    config_lib.add_stage(config, part.stages[name])
  return config
