"""Imagen's stages: continuous time t ∈ [0, 1] with a log-SNR schedule.

* t reaches the UNet as ``TIME_SCALE · t`` (the sinusoidal embedding is tuned
  for values in the hundreds, as in DDPM);
* a super-resolution stage gets the low-resolution image resized down to
  ``lowres_resolution`` and back up to ``resolution`` (``resize_lowres``), then
  noise-augmented at level ``aug_t`` ∈ [0, 1] of the augmentation schedule; the
  UNet sees ``TIME_SCALE · aug_t`` as its noise level;
* the objective is ε, x0 or v regression with optional Min-SNR-γ weighting.
"""

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import guidance as guidance_lib
from imagen_jax.diffusion import losses, sampling, schedules
from imagen_jax.stages import common

TIME_SCALE = 1000.0
SAMPLERS = sampling.SAMPLERS


def _shifted_logsnr(t, *, logsnr_fn, shift):
  """λ(t) + shift: a positive shift spends more of t ∈ [0, 1] at high SNR."""
  return logsnr_fn(t) + shift


def uniform_t(rng: jax.Array, batch: int) -> jax.Array:
  """Low-discrepancy t ∈ [0, 1): one random offset, evenly spaced (VDM)."""
  u = jax.random.uniform(rng, ())
  return jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)


def focus_high_noise(t: jax.Array, start: float, share: float) -> jax.Array:
  """Maps t ~ U[0, 1) to a density with an extra `share` of its mass on [start, 1).

  The inverse CDF of (1 - share) · U[0, 1] + share · U[start, 1]: piecewise linear,
  so evenly spaced t stay evenly spaced within each piece. At high noise the image
  carries no trace of the layout, and the model must draw it from the text alone
  (which object goes where); uniform t spends few examples there.
  """
  if not share:
    return t
  knee = (1.0 - share) * start  # the CDF at `start`
  above = start + (t - knee) * (1.0 - start) / (1.0 - knee)
  return jnp.where(t < knee, t / (1.0 - share), above)


class ContinuousStage(common.Stage):
  """A stage with ``diffusion.kind = 'continuous'`` (the default)."""

  kind = "continuous"
  samplers = SAMPLERS

  def __init__(self, stage_config: Any, text_dim: Optional[int] = None):
    super().__init__(stage_config, text_dim)
    d = stage_config.diffusion
    self.prediction = d.prediction
    losses.check_prediction_kind(self.prediction)
    logsnr_fn = functools.partial(
      schedules.get_logsnr_fn(d.schedule), logsnr_min=d.logsnr_min, logsnr_max=d.logsnr_max
    )
    shift = float(d.get("logsnr_shift", 0.0))
    self.logsnr_fn = (
      functools.partial(_shifted_logsnr, logsnr_fn=logsnr_fn, shift=shift) if shift else logsnr_fn
    )
    self.aug_logsnr_fn = schedules.get_logsnr_fn(d.aug_schedule)
    self.high_noise = (float(d.get("high_noise_from", 0.9)), float(d.get("high_noise_share", 0.0)))
    start, share = self.high_noise
    if not (0.0 <= share < 1.0 and 0.0 < start < 1.0):
      raise ValueError(
        f"stage {self.name}: diffusion.high_noise_share must be in [0, 1) and "
        f"high_noise_from in (0, 1), got {share} and {start}"
      )

  def apply(self, params, x_t, t, text_emb=None, text_mask=None, lowres=None, aug_t=None):
    """The UNet's prediction for x_t at continuous times t ([B] in [0, 1])."""
    return self.unet(
      params,
      x_t,
      t * TIME_SCALE,
      text_emb,
      text_mask,
      lowres,
      None if aug_t is None else aug_t * TIME_SCALE,
    )

  def model_fn(self, x_t, t, args):
    """Sampler-facing signature: ``args`` = {params, text_emb, text_mask[, lowres, aug_t]}."""
    return self.apply(
      args["params"],
      x_t,
      t,
      args.get("text_emb"),
      args.get("text_mask"),
      args.get("lowres"),
      args.get("aug_t"),
    )

  def resize_lowres(self, images: jax.Array) -> jax.Array:
    """[B, h, w, 3] float → the stage's low-res view at [B, R, R, 3] (down, then up)."""
    if not self.is_sr:
      raise ValueError(f"stage {self.name} is not a super-resolution stage")
    if images.shape[1] != self.lowres_resolution:
      images = common.resize(images, self.lowres_resolution)
    return common.resize(images, self.resolution)

  def augment_lowres(self, lowres: jax.Array, aug_t: jax.Array, rng: jax.Array) -> jax.Array:
    """Noise-conditioning augmentation of the resized low-res image at levels aug_t [B]."""
    eps = jax.random.normal(rng, lowres.shape, lowres.dtype)
    return losses.noise_augment(lowres, aug_t, eps, self.aug_logsnr_fn)

  def loss_noise(self, rng, x0) -> dict:
    """{t [B], eps [B, R, R, C]; SR: aug_t [B], aug_eps [B, R, R, C]}."""
    d = self.config.diffusion
    r_t, r_eps, r_aug_t, r_aug = jax.random.split(rng, 4)
    b = x0.shape[0]
    t = focus_high_noise(uniform_t(r_t, b), *self.high_noise)
    noise = {"t": t, "eps": jax.random.normal(r_eps, x0.shape, jnp.float32)}
    if self.is_sr:
      noise["aug_t"] = jax.random.uniform(r_aug_t, (b,)) * d.aug_max
      noise["aug_eps"] = jax.random.normal(r_aug, x0.shape, x0.dtype)
    return noise

  def loss(self, params, x0, text_emb, text_mask, rng=None, noise=None) -> jax.Array:
    """ε/x0/v regression at low-discrepancy t; SR stages at a random aug level."""
    d = self.config.diffusion
    noise = self.loss_noise(rng, x0) if noise is None else noise
    lowres = aug_t = None
    if self.is_sr:
      aug_t = noise["aug_t"]
      lowres = losses.noise_augment(
        self.resize_lowres(x0), aug_t, noise["aug_eps"], self.aug_logsnr_fn
      )
    t, eps = noise["t"], noise["eps"]
    logsnr = self.logsnr_fn(t)
    x_t = losses.q_sample(x0, eps, logsnr)
    target = losses.get_target(self.prediction, x0, eps, logsnr)
    weight = (
      losses.min_snr_weight(logsnr, self.prediction, d.min_snr_gamma)
      if d.get("min_snr_gamma", 0.0) > 0
      else None
    )
    pred = self.apply(params, x_t, t, text_emb, text_mask, lowres, aug_t)
    return losses.diffusion_loss(pred[..., : x0.shape[-1]], target, weight)

  def sample_settings(
    self,
    sample_config: Any,
    steps: Optional[int] = None,
    guidance: Any = None,
    sampler: Optional[str] = None,
  ) -> common.SampleSettings:
    s = dict(sample_config)
    settings = common.SampleSettings(
      sampler=str(sampler or s.get("sampler", "ddim")),
      steps=int(s.get("steps", 64) if steps is None else steps),
      guidance=guidance_lib.parse_guidance(s.get("guidance") if guidance is None else guidance),
      threshold=str(s.get("threshold", "dynamic")),
      quantile=float(s.get("quantile", 0.995)),
      max_value=s.get("max_value"),
      eta=float(s.get("eta", 0.0)),
      aug_level=float(s.get("aug_level", 0.0)),
    )
    common.check_settings(settings, self.samplers, self.name)
    if not 0.0 <= settings.aug_level <= 1.0:
      raise ValueError(f"stage {self.name}: aug_level must be in [0, 1], got {settings.aug_level}")
    return settings

  def lowres_inputs(self, prev, settings, rng) -> dict:
    lowres = self.resize_lowres(prev)
    aug_t = jnp.full((prev.shape[0],), settings.aug_level, jnp.float32)
    return {"lowres": self.augment_lowres(lowres, aug_t, rng), "aug_t": aug_t}

  def sampler_schedule(self) -> tuple[dict, dict]:
    return dict(logsnr_fn=self.logsnr_fn), {}
