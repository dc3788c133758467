"""One cascade stage: its UNet, its noise schedules, and the conventions that the
train step and the samplers must share.

Conventions (one place, used by ``train/`` and ``cascade.py``):

* images are float in [-1, 1] (``to_float`` / ``to_uint8``);
* continuous time t ∈ [0, 1] reaches the UNet as ``TIME_SCALE · t`` (the
  sinusoidal embedding is tuned for values in the hundreds, as in DDPM);
* a super-resolution stage gets the low-resolution image resized down to
  ``lowres_resolution`` and back up to ``resolution`` (``resize_lowres``), then
  noise-augmented at level ``aug_t`` ∈ [0, 1] of the augmentation schedule; the
  UNet sees ``TIME_SCALE · aug_t`` as its noise level.
"""

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import losses, schedules
from imagen_jax.models import UNet, UNetConfig, dummy_inputs

TIME_SCALE = 1000.0


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [..., 3] in [0, 255] → float32 in [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: jax.Array) -> jax.Array:
  """float in [-1, 1] → uint8 in [0, 255] (rounded, clipped)."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def resize(x: jax.Array, size: int) -> jax.Array:
  """x: [B, H, W, C] → [B, size, size, C]; antialiased bilinear."""
  b, _, _, c = x.shape
  return jax.image.resize(x, (b, size, size, c), method="linear", antialias=True)


def _shifted_logsnr(t, *, logsnr_fn, shift):
  """λ(t) + shift: a positive shift spends more of t ∈ [0, 1] at high SNR."""
  return logsnr_fn(t) + shift


class Stage:
  """A cascade stage built from ``config.stages.NAME``.

  Hashable by identity, so ``stage.model_fn`` can be a static argument of the
  jitted samplers: keep one ``Stage`` per stage and the compiled loops are reused.
  """

  def __init__(self, stage_config: Any, text_dim: Optional[int] = None):
    self.config = stage_config
    self.name = stage_config.name
    self.resolution = int(stage_config.resolution)
    self.lowres_resolution = stage_config.lowres_resolution
    model_config = dict(stage_config.model)
    if text_dim is not None and model_config.get("text_dim", 4096) != text_dim:
      raise ValueError(f"stage {self.name}: model.text_dim={model_config.get('text_dim')} "
                       f"but the text encoder gives {text_dim}-wide embeddings")
    self.unet_config = UNetConfig.from_config(model_config)
    self.model = UNet(self.unet_config)
    if bool(self.lowres_resolution) != self.unet_config.lowres_cond:
      raise ValueError(f"stage {self.name}: lowres_resolution={self.lowres_resolution} "
                       f"but model.lowres_cond={self.unet_config.lowres_cond}")
    d = stage_config.diffusion
    self.prediction = d.prediction
    losses.check_prediction_kind(self.prediction)
    logsnr_fn = functools.partial(schedules.get_logsnr_fn(d.schedule),
                                  logsnr_min=d.logsnr_min, logsnr_max=d.logsnr_max)
    shift = float(d.get("logsnr_shift", 0.0))
    self.logsnr_fn = (functools.partial(_shifted_logsnr, logsnr_fn=logsnr_fn, shift=shift)
                      if shift else logsnr_fn)
    self.aug_logsnr_fn = schedules.get_logsnr_fn(d.aug_schedule)

  @property
  def is_sr(self) -> bool:
    return bool(self.lowres_resolution)

  def init(self, rng: jax.Array, text_len: int = 8) -> Any:
    """Boxed (logically partitioned) parameters for one example shape."""
    inputs = dummy_inputs(self.unet_config, 1, self.resolution, text_len)
    return self.model.init(rng, **inputs)["params"]

  def apply(self, params, x_t, t, text_emb=None, text_mask=None, lowres=None, aug_t=None):
    """The UNet's prediction for x_t at continuous times t ([B] in [0, 1])."""
    return self.model.apply(
        {"params": params}, x_t, t * TIME_SCALE, text_emb, text_mask, lowres=lowres,
        noise_level=None if aug_t is None else aug_t * TIME_SCALE)

  def model_fn(self, x_t, t, args):
    """Sampler-facing signature: ``args`` = {params, text_emb, text_mask[, lowres, aug_t]}."""
    out = self.apply(args["params"], x_t, t, args.get("text_emb"), args.get("text_mask"),
                     args.get("lowres"), args.get("aug_t"))
    return out.astype(jnp.float32)

  def resize_lowres(self, images: jax.Array) -> jax.Array:
    """[B, h, w, 3] float → the stage's low-res view at [B, R, R, 3] (down, then up)."""
    if not self.is_sr:
      raise ValueError(f"stage {self.name} is not a super-resolution stage")
    if images.shape[1] != self.lowres_resolution:
      images = resize(images, self.lowres_resolution)
    return resize(images, self.resolution)

  def augment_lowres(self, lowres: jax.Array, aug_t: jax.Array, rng: jax.Array) -> jax.Array:
    """Noise-conditioning augmentation of the resized low-res image at levels aug_t [B]."""
    eps = jax.random.normal(rng, lowres.shape, lowres.dtype)
    return losses.noise_augment(lowres, aug_t, eps, self.aug_logsnr_fn)
