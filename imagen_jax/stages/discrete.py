"""DeepFloyd IF's stages: a discrete DDPM (diffusers ``DDPMScheduler``).

``diffusion.kind = 'discrete'`` (converted IF checkpoints; 'if_ddpm' is read as
the same):

* 1000 integer timesteps of the ``squaredcos_cap_v2`` schedule, ε prediction,
  ``variance`` 'learned_range' (6 output channels: ε, then the interpolation v
  between log β_t and log β̃_t) or 'fixed_small';
* sampling: IF's ancestral step with dynamic thresholding (ratio 0.95,
  ``max_value`` 1.5 stage I / 1.0 stage II), "leading"-spaced timesteps or a
  named schedule ('smart50', 'fast27', ...); no text mask in the UNet;
* a super-resolution stage upscales the low-res image bilinearly with
  align_corners=True, noises it to an integer ``noise_level`` with the same
  schedule and passes the level through the UNet's class embedding;
* training (fine-tuning): ε MSE plus, for learned-range variance, the
  variational bound term with the mean's gradient stopped — the hybrid
  objective of improved DDPM that the learned-range parameterization comes from.
"""

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import guidance as guidance_lib
from imagen_jax.diffusion import if_schedules, losses, sampling, schedules
from imagen_jax.stages import common

SAMPLERS = sampling.SAMPLERS
# The deterministic solvers step on "trailing"-spaced timesteps (they start at
# the last training step, as diffusers' DPM-Solver does); IF's ancestral DDPM
# keeps the scheduler's own spacing.
_SOLVER_SPACING = "trailing"
KINDS = ("discrete", "if_ddpm")  # 'if_ddpm': the name converted folders used first


def _interp_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of 1-D linear interpolation, align_corners=True."""
  if size_out == 1:
    pos = np.zeros(1)
  else:
    pos = np.arange(size_out) * (size_in - 1) / (size_out - 1)
  lo = np.clip(np.floor(pos).astype(int), 0, size_in - 1)
  hi = np.minimum(lo + 1, size_in - 1)
  frac = pos - lo
  m = np.zeros((size_out, size_in), np.float32)
  m[np.arange(size_out), lo] += 1 - frac
  m[np.arange(size_out), hi] += frac
  return m


def upscale_align_corners(images: jax.Array, size: int) -> jax.Array:
  """Bilinear resize with align_corners=True (torch ``F.interpolate``), IF-II's upscaling.

  Args:
    images: [B, h, w, C] float.
    size: output height and width.

  Returns:
    [B, size, size, C] float32.
  """
  _, h, w, _ = images.shape
  mh = jnp.asarray(_interp_matrix(h, size))
  mw = jnp.asarray(_interp_matrix(w, size))
  return jnp.einsum(
    "oh,bhwc,pw->bopc",
    mh,
    jnp.asarray(images, jnp.float32),
    mw,
    precision=jax.lax.Precision.HIGHEST,
  )


def integer_level(stage_name: str, level: Any) -> int:
  """A discrete stage's noise level (a timestep of its table): an integer, or ValueError."""
  if float(level) != int(float(level)):
    raise ValueError(f"stage {stage_name}: noise_level must be an integer level, got {level}")
  return int(float(level))


def noise_lowres(
  upscaled: jax.Array,
  noise_level: Union[int, jax.Array],
  noise: jax.Array,
  num_train_steps: int = 1000,
) -> jax.Array:
  """IF-II's noise augmentation: sqrt(abar) x + sqrt(1 - abar) noise at ``noise_level``.

  Args:
    upscaled: [B, H, W, C] float, the upscaled low-resolution image.
    noise_level: int or [B] ints in [0, num_train_steps).
    noise: [B, H, W, C] standard normal.
    num_train_steps: steps of the image-noising squared-cosine schedule.

  Returns:
    [B, H, W, C] float32.
  """
  ac = jnp.asarray(schedules.alphas_cumprod(schedules.betas_squaredcos_cap_v2(num_train_steps)))
  level = jnp.broadcast_to(jnp.asarray(noise_level, jnp.int32), (upscaled.shape[0],))
  abar = ac[level][:, None, None, None]
  return jnp.sqrt(abar) * upscaled + jnp.sqrt(1.0 - abar) * noise


def stage_timesteps(
  sample_config: Any, timesteps: Union[None, str, Sequence[int]] = None, num_train_steps: int = 1000
) -> tuple[int, ...]:
  """The inference timesteps: an explicit name / list, the config's name, or spaced steps."""
  timesteps = timesteps or sample_config.get("timesteps") or None
  if isinstance(timesteps, str):
    return if_schedules.named_if_timesteps(timesteps)
  if timesteps is not None:
    return tuple(int(s) for s in timesteps)
  return schedules.if_timesteps(
    int(sample_config["steps"]),
    num_train_steps,
    sample_config.get("spacing", "leading"),
    int(sample_config.get("steps_offset", 0)),
  )


class DiscreteStage(common.Stage):
  """A DeepFloyd IF stage (``diffusion.kind = 'discrete'``)."""

  kind = "discrete"
  samplers = SAMPLERS

  def __init__(self, stage_config: Any, text_dim: Optional[int] = None):
    super().__init__(stage_config, text_dim)
    d = stage_config.diffusion
    if d.get("prediction", "eps") != "eps":
      raise ValueError(
        f"stage {self.name}: discrete stages predict eps, got prediction={d.prediction!r}"
      )
    beta_schedule = d.get("beta_schedule", "squaredcos_cap_v2")
    if beta_schedule not in schedules.BETA_SCHEDULES:
      raise ValueError(
        f"stage {self.name}: beta_schedule {beta_schedule!r} is not one of "
        f"{schedules.BETA_SCHEDULES}"
      )
    if d.get("high_noise_share", 0.0):
      raise ValueError(
        f"stage {self.name}: diffusion.high_noise_share is a continuous-time setting; "
        "discrete stages sample their timesteps uniformly"
      )
    self.prediction = "eps"
    self.num_train_steps = int(d.get("num_train_steps", 1000))
    self.aug_num_train_steps = int(d.get("aug_num_train_steps", 1000))
    self.variance = str(d.get("variance", stage_config.sample.get("variance", "learned_range")))
    if self.variance not in sampling.VARIANCE_KINDS:
      raise ValueError(
        f"stage {self.name}: variance {self.variance!r} is not one of {sampling.VARIANCE_KINDS}"
      )
    self.alphas_cumprod = schedules.alphas_cumprod(
      schedules.get_betas(beta_schedule, self.num_train_steps)
    )

  def model_fn(self, x_t, t, args):
    """``args`` = {params, text_emb, text_mask[, lowres, noise_level]}; t: [N] ints."""
    return self.unet(
      args["params"],
      x_t,
      t,
      args.get("text_emb"),
      args.get("text_mask"),
      args.get("lowres"),
      args.get("noise_level"),
    )

  def lowres_from(self, images: jax.Array, noise_level: jax.Array, rng: jax.Array) -> jax.Array:
    """[B, h, w, C] low-res images → the upscaled, noised UNet input [B, R, R, C]."""
    up = self._upscale(images)
    return noise_lowres(up, noise_level, jax.random.normal(rng, up.shape), self.aug_num_train_steps)

  def _upscale(self, images: jax.Array) -> jax.Array:
    """[B, h, w, C] → resized to the low resolution, upscaled to [B, R, R, C]."""
    if images.shape[1] != self.lowres_resolution:
      images = common.resize(images, self.lowres_resolution)
    return upscale_align_corners(images, self.resolution)

  def loss_noise(self, rng, x0) -> dict:
    """{t [B], eps [B, R, R, C]; SR: level [B], aug_eps [B, R, R, C]}."""
    d = self.config.diffusion
    r_t, r_eps, r_lvl, r_aug = jax.random.split(rng, 4)
    b = x0.shape[0]
    noise = {}
    if self.is_sr:
      top = max(1, int(round(float(d.get("aug_max", 0.5)) * self.aug_num_train_steps)))
      noise["level"] = jax.random.randint(r_lvl, (b,), 0, top)
      noise["aug_eps"] = jax.random.normal(
        r_aug, (b, self.resolution, self.resolution, x0.shape[-1])
      )
    noise["t"] = jax.random.randint(r_t, (b,), 0, self.num_train_steps)
    noise["eps"] = jax.random.normal(r_eps, x0.shape, jnp.float32)
    return noise

  def loss(self, params, x0, text_emb, text_mask, rng=None, noise=None) -> jax.Array:
    noise = self.loss_noise(rng, x0) if noise is None else noise
    c = x0.shape[-1]
    lowres = level = None
    if self.is_sr:
      level = noise["level"]
      lowres = noise_lowres(self._upscale(x0), level, noise["aug_eps"], self.aug_num_train_steps)
    t, eps = noise["t"], noise["eps"]
    abar = jnp.asarray(self.alphas_cumprod)[t][:, None, None, None]
    x_t = jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * eps
    out = self.unet(params, x_t, t, text_emb, text_mask, lowres, level)
    loss = losses.diffusion_loss(out[..., :c], eps)
    if self.variance == "learned_range":
      loss = loss + losses.learned_range_vb(
        jax.lax.stop_gradient(out[..., :c]), out[..., c:], x0, x_t, t, self.alphas_cumprod
      )
    return loss

  def sample_settings(
    self,
    sample_config: Any,
    steps: Optional[int] = None,
    guidance: Any = None,
    sampler: Optional[str] = None,
  ) -> common.SampleSettings:
    s = dict(sample_config)
    name = str(sampler or s.get("sampler", "ddpm"))
    name = "ddpm" if name == "if_ddpm" else name
    if steps is not None:  # an explicit step count replaces a named schedule
      s["steps"], s["timesteps"] = int(steps), ""
    if name != "ddpm" and s.get("spacing", "leading") == "leading":
      s["spacing"], s["steps_offset"] = _SOLVER_SPACING, 0
    settings = table_settings(
      self,
      s,
      name,
      guidance,
      threshold="dynamic",
      quantile=0.95,
      aug_level=integer_level(self.name, s.get("noise_level", s.get("aug_level", 0)) or 0),
    )
    if self.is_sr and not 0 <= settings.aug_level < self.aug_num_train_steps:
      raise ValueError(
        f"stage {self.name}: noise_level must be in "
        f"[0, {self.aug_num_train_steps}), got {settings.aug_level}"
      )
    return settings

  def lowres_inputs(self, prev, settings, rng) -> dict:
    level = jnp.full((prev.shape[0],), settings.aug_level, jnp.int32)
    return {"lowres": self.lowres_from(prev, level, rng), "noise_level": level}

  def sampler_schedule(self) -> tuple[dict, dict]:
    spec = dict(schedule="discrete", variance=self.variance)
    return spec, dict(alphas_cumprod=self.alphas_cumprod)


def table_settings(
  stage: Any, s: dict, name: str, guidance: Any, *, threshold: str, quantile: float, aug_level: int
) -> common.SampleSettings:
  """The settings of a stage that samples on a discrete table (IF's and the latent stages).

  Args:
    stage: the stage (``name``, ``num_train_steps``, ``samplers``).
    s: its ``sample`` config with the caller's step and spacing overrides applied.
    name: the sampler; guidance: the override (None: the config's).
    threshold, quantile: the stage kind's defaults; aug_level: the low-res noise level.

  Raises:
    ValueError: a step count below 1, timesteps off the table, a sampler or setting the
      stage cannot run (naming the stage).
  """
  if int(s.get("steps", 1)) < 1:
    raise ValueError(f"stage {stage.name}: steps must be >= 1, got {s['steps']}")
  timesteps = stage_timesteps(s, None, stage.num_train_steps)
  if not all(0 <= t < stage.num_train_steps for t in timesteps):
    raise ValueError(f"stage {stage.name}: timesteps must lie in [0, {stage.num_train_steps})")
  settings = common.SampleSettings(
    sampler=name,
    steps=len(timesteps),
    guidance=guidance_lib.parse_guidance(s.get("guidance") if guidance is None else guidance),
    threshold=str(s.get("threshold", threshold)),
    quantile=float(s.get("quantile", quantile)),
    max_value=s.get("max_value"),
    eta=float(s.get("eta", 0.0)),
    aug_level=aug_level,
    timesteps=timesteps,
  )
  common.check_settings(settings, stage.samplers, stage.name)
  return settings
