"""Flax UNets of the cascade: Imagen base UNet, Efficient UNet, DeepFloyd IF UNets."""

from imagen_jax.models.unet import (  # noqa: F401
  UNet,
  UNetConfig,
  count_params,
  dummy_inputs,
  init_abstract,
)
