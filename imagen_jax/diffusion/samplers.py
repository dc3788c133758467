"""Samplers whose whole denoising loop runs inside one `jax.jit` call.

Model functions have the form

    model_fn(x_t: [N, H, W, C] float, t: [N], args) -> pred [N, H, W, C']

where `args` is any pytree of arrays (parameters, text embeddings, the
low-resolution image of a super-resolution stage, ...) passed through as a
traced argument, and C' >= C (extra output channels, such as DeepFloyd IF's
learned variance, are ignored by the continuous-time samplers). With guidance,
N = 2B: `cfg_predict` calls model_fn once on [x_t, x_t], and the caller builds
`args` with the unconditional rows first and the conditional rows last.

Public samplers (keyword-only options after `args`):

  ddpm_sample(model_fn, shape, rng, args, *, num_steps, prediction='eps',
              schedule='cosine', guidance_scale=None, threshold='static',
              quantile=0.995, max_value=None, x_init=None, strength=1.0,
              known=None, mask=None) -> x0 [shape]
  ddim_sample(..., same options ..., eta=0.0) -> x0 [shape]
  if_ddpm_sample(model_fn, shape, rng, args, *, timesteps,
                 num_train_steps=1000, guidance_scale=None, threshold='dynamic',
                 quantile=0.95, max_value=1.5, variance='learned_range',
                 x_init=None, strength=1.0, known=None, mask=None) -> x0

and the deterministic ODE solvers of `solvers` (DPM-Solver++ 2M, Euler, Heun)
and `if_solvers` (the same on IF's schedule, plus DDIM). `get_sampler(name)`
returns a continuous-time sampler ('ddpm', 'ddim', 'dpmpp_2m', 'euler',
'heun'; 'if_ddpm' too, for old callers) and `get_discrete_sampler(name)` an
IF one ('ddpm', 'ddim', 'dpmpp_2m' take `timesteps=`; 'euler', 'heun' take
`num_steps=`). Every sampler takes x_init / strength (image-to-image) and
known / mask (inpainting), run by `loop.run` (see its docstring).

Continuous samplers give the model t in [0, 1] ([N] float32) on a uniform grid
from 1 to 0 (t = 0 is data); `schedule` is 'cosine', 'linear' or any callable
t -> logsnr (keep the object: it is a static argument). The IF sampler gives
the model integer timesteps ([N] int32) and follows diffusers'
`DDPMScheduler.step` (epsilon prediction, learned_range variance).

Static (changing them recompiles): model_fn, shape, num_steps / timesteps,
prediction, schedule, threshold mode, variance kind, and whether guidance is
used (guidance_scale None or not) or inpainting (known None or not). Traced
(changing them does not recompile): rng, args, guidance_scale, quantile,
max_value (None is passed as +inf), eta, x_init, strength, known, mask. (The
solvers trace the step count too.) The single-step functions
(`predict_x0_eps`, `ancestral_step`, `ddim_step`, `if_ddpm_step`) are plain
functions for cascades and parity tests.
"""

import functools
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import guidance as guidance_lib
from imagen_jax.diffusion import if_schedules
from imagen_jax.diffusion import if_solvers
from imagen_jax.diffusion import loop
from imagen_jax.diffusion import losses
from imagen_jax.diffusion import schedules
from imagen_jax.diffusion import solvers

predict_x0_eps = loop.predict_x0_eps

__all__ = [
  "DISCRETE_SAMPLERS",
  "SAMPLERS",
  "VARIANCE_KINDS",
  "ancestral_step",
  "ddim_sample",
  "ddim_step",
  "ddpm_sample",
  "get_discrete_sampler",
  "get_sampler",
  "if_ddpm_sample",
  "if_ddpm_step",
  "predict_x0_eps",
]

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
Schedule = Union[str, Callable[[jax.Array], jax.Array]]
VARIANCE_KINDS = ("learned_range", "fixed_small")


def ancestral_step(x_t, x0_hat, logsnr_t, logsnr_s, noise) -> jax.Array:
  """Ancestral (VDM) step from t to s < t: a draw from q(x_s | x_t, x0_hat).

  c = -expm1(logsnr_t - logsnr_s); mean = alpha_s (x_t (1 - c) / alpha_t +
  c x0_hat); var = sigma_s^2 c.

  Args:
    x_t: [B, ...] float.
    x0_hat: [B, ...] float.
    logsnr_t: scalar or [B] float.
    logsnr_s: scalar or [B] float, > logsnr_t.
    noise: [B, ...] standard normal (zeros for a deterministic last step).

  Returns:
    x_s: [B, ...] float32.
  """
  bc = functools.partial(losses.expand_to, x=x_t)
  alpha_t, _ = schedules.alpha_sigma(logsnr_t)
  alpha_s, sigma_s = schedules.alpha_sigma(logsnr_s)
  c = -jnp.expm1(logsnr_t - logsnr_s)
  mean = bc(alpha_s * (1.0 - c) / alpha_t) * x_t + bc(alpha_s * c) * x0_hat
  return mean + bc(sigma_s * jnp.sqrt(c)) * noise


def ddim_step(x_t, x0_hat, eps_hat, logsnr_t, logsnr_s, noise, eta=0.0) -> jax.Array:
  """Generalized DDIM step from t to s < t (Song et al. 2021).

  x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c noise with
  c = eta sigma_s sqrt(1 - exp(logsnr_t - logsnr_s))
    = eta (sigma_s / sigma_t) sqrt(1 - alpha_t^2 / alpha_s^2),
  so eta = 0 is deterministic DDIM and eta = 1 is the ancestral step.

  Args:
    x_t: [B, ...] float (unused beyond shape; eps_hat carries it).
    x0_hat: [B, ...] float.
    eps_hat: [B, ...] float, consistent with x0_hat and x_t.
    logsnr_t: scalar or [B] float.
    logsnr_s: scalar or [B] float, > logsnr_t.
    noise: [B, ...] standard normal.
    eta: scalar >= 0 (may be traced).

  Returns:
    x_s: [B, ...] float32.
  """
  bc = functools.partial(losses.expand_to, x=x_t)
  alpha_s, sigma_s = schedules.alpha_sigma(logsnr_s)
  c = eta * sigma_s * jnp.sqrt(-jnp.expm1(logsnr_t - logsnr_s))
  dir_scale = jnp.sqrt(jnp.maximum(jnp.square(sigma_s) - jnp.square(c), 0.0))
  return bc(alpha_s) * x0_hat + bc(dir_scale) * eps_hat + bc(c) * noise


@functools.partial(
  jax.jit,
  static_argnames=(
    "model_fn",
    "shape",
    "num_steps",
    "prediction",
    "logsnr_fn",
    "threshold",
    "use_guidance",
    "method",
  ),
)
def _continuous_loop(
  rng,
  args,
  guidance_scale,
  quantile,
  max_value,
  eta,
  edit,
  *,
  model_fn,
  shape,
  num_steps,
  prediction,
  logsnr_fn,
  threshold,
  use_guidance,
  method,
):
  """The jitted loop shared by ddpm_sample ('ancestral') and ddim_sample."""
  batch = shape[0]

  def time_at(i):
    return 1.0 - i.astype(jnp.float32) / num_steps

  def step(i, x_t, extra, key):
    t, s = time_at(i), time_at(i + 1)
    logsnr_t, logsnr_s = logsnr_fn(t), logsnr_fn(s)
    x0_hat, eps_hat = predict_x0_eps(
      model_fn,
      x_t,
      jnp.full((batch,), t),
      jnp.full((batch,), logsnr_t),
      args,
      prediction=prediction,
      guidance_scale=guidance_scale,
      use_guidance=use_guidance,
      threshold=threshold,
      quantile=quantile,
      max_value=max_value,
    )
    noise = jax.random.normal(key, shape)
    noise = jnp.where(i == num_steps - 1, 0.0, noise)  # Last step: no noise.
    if method == "ancestral":
      return ancestral_step(x_t, x0_hat, logsnr_t, logsnr_s, noise), extra
    return ddim_step(x_t, x0_hat, eps_hat, logsnr_t, logsnr_s, noise, eta), extra

  return loop.run(step, (), rng, shape, num_steps, edit, lambda i: logsnr_fn(time_at(i)))


def ddpm_sample(
  model_fn: ModelFn,
  shape,
  rng,
  args,
  *,
  num_steps: int,
  prediction: str = "eps",
  schedule: Schedule = "cosine",
  guidance_scale=None,
  threshold: str = "static",
  quantile=0.995,
  max_value=None,
  x_init=None,
  strength=1.0,
  known=None,
  mask=None,
) -> jax.Array:
  """Continuous-time ancestral sampler (VDM form), jitted as one loop.

  Args:
    model_fn: (x_t [N, ...], t [N] float in [0, 1], args) -> pred; hashable.
    shape: (B, H, W, C) of the samples.
    rng: PRNG key.
    args: pytree of arrays passed to model_fn (with guidance: 2B rows,
      unconditional first).
    num_steps: number of denoising steps (>= 1).
    prediction: 'eps', 'x0' or 'v'.
    schedule: 'cosine', 'linear' or a callable t -> logsnr.
    guidance_scale: None (no guidance; model called on B rows) or a scalar.
    threshold: 'none', 'static' or 'dynamic' (applied to x0_hat each step).
    quantile: dynamic thresholding quantile in [0, 1].
    max_value: None or the cap on the dynamic threshold s.
    x_init: None, or [B, H, W, C] float: image-to-image from this image
      (see `loop`); strength: s in [0, 1], the fraction of the steps run from
      x_init noised to that level (traced: no recompile across values).
    known, mask: None, or the inpainting image [B, H, W, C] and mask
      [B, H, W, 1] (1 = regenerate); the output keeps known's mask-0 pixels.

  Returns:
    x0: [B, H, W, C] float32.
  """
  logsnr_fn = loop.check_continuous(num_steps, prediction, threshold, schedule)
  edit = loop.make_edit(shape, x_init, strength, known, mask)
  return _continuous_loop(
    rng,
    args,
    loop.scalar(guidance_scale, 1.0),
    loop.scalar(quantile, 0.995),
    loop.scalar(max_value, jnp.inf),
    loop.scalar(1.0, 1.0),
    edit,
    model_fn=model_fn,
    shape=tuple(shape),
    num_steps=num_steps,
    prediction=prediction,
    logsnr_fn=logsnr_fn,
    threshold=threshold,
    use_guidance=guidance_scale is not None,
    method="ancestral",
  )


def ddim_sample(
  model_fn: ModelFn,
  shape,
  rng,
  args,
  *,
  num_steps: int,
  prediction: str = "eps",
  schedule: Schedule = "cosine",
  guidance_scale=None,
  threshold: str = "static",
  quantile=0.995,
  max_value=None,
  eta=0.0,
  x_init=None,
  strength=1.0,
  known=None,
  mask=None,
) -> jax.Array:
  """DDIM sampler (eta = 0 deterministic, eta = 1 ancestral), one jitted loop.

  Args:
    model_fn, shape, rng, args, num_steps, prediction, schedule,
    guidance_scale, threshold, quantile, max_value, x_init, strength, known,
    mask: as in `ddpm_sample`.
    eta: scalar >= 0, stochasticity (traced: changing it does not recompile).

  Returns:
    x0: [B, H, W, C] float32.
  """
  logsnr_fn = loop.check_continuous(num_steps, prediction, threshold, schedule)
  edit = loop.make_edit(shape, x_init, strength, known, mask)
  return _continuous_loop(
    rng,
    args,
    loop.scalar(guidance_scale, 1.0),
    loop.scalar(quantile, 0.995),
    loop.scalar(max_value, jnp.inf),
    loop.scalar(eta, 0.0),
    edit,
    model_fn=model_fn,
    shape=tuple(shape),
    num_steps=num_steps,
    prediction=prediction,
    logsnr_fn=logsnr_fn,
    threshold=threshold,
    use_guidance=guidance_scale is not None,
    method="ddim",
  )


def if_ddpm_step(
  model_output,
  t,
  prev_t,
  x_t,
  noise,
  alphas_cumprod,
  quantile=0.95,
  max_value=1.5,
  *,
  threshold: str = "dynamic",
  variance: str = "learned_range",
):
  """One DeepFloyd IF / diffusers `DDPMScheduler.step` (epsilon prediction).

  abar_t = alphas_cumprod[t], abar_prev = alphas_cumprod[prev_t] (1 when
  prev_t < 0), beta_t = 1 - abar_t / abar_prev (the step's own beta, so it
  spans the gap to the previous timestep of the schedule),
  beta_tilde = max((1 - abar_prev) / (1 - abar_t) beta_t, 1e-20).
  x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), thresholded;
  mean = sqrt(abar_prev) beta_t / (1 - abar_t) x0_hat
       + sqrt(abar_t / abar_prev) (1 - abar_prev) / (1 - abar_t) x_t.
  Std: 'learned_range': exp(logvar / 2), logvar = f log beta_t + (1 - f)
  log beta_tilde, f = (v + 1) / 2 from the extra channels; 'fixed_small':
  sqrt(beta_tilde). No noise is added when t == 0.

  Args:
    model_output: [B, H, W, 2C] (learned_range: eps_hat then v) or
      [B, H, W, C] ('fixed_small' accepts either) float.
    t: int scalar (may be traced), current timestep.
    prev_t: int scalar (may be traced), the next timestep of the schedule
      (-1 after the last).
    x_t: [B, H, W, C] float.
    noise: [B, H, W, C] standard normal.
    alphas_cumprod: [N] float (schedules.alphas_cumprod).
    quantile: dynamic thresholding ratio (may be traced).
    max_value: cap on s (IF's sample_max_value; None = no cap; may be traced).
    threshold: 'dynamic', 'static' (clip to [-1, 1]) or 'none'.
    variance: 'learned_range' or 'fixed_small'.

  Returns:
    (x_prev, x0_hat): both [B, H, W, C] float32.
  """
  if variance not in VARIANCE_KINDS:
    raise ValueError(f"Unknown variance kind {variance!r}; valid: {list(VARIANCE_KINDS)}.")
  c = x_t.shape[-1]
  if variance == "learned_range" and model_output.shape[-1] != 2 * c:
    raise ValueError(
      f"variance='learned_range' needs {2 * c} output channels (eps and v), "
      f"got {model_output.shape[-1]}."
    )
  model_output = jnp.asarray(model_output, jnp.float32)
  x_t = jnp.asarray(x_t, jnp.float32)
  ac = jnp.asarray(alphas_cumprod, jnp.float32)
  abar_t = ac[t]
  abar_prev = jnp.where(prev_t >= 0, ac[jnp.maximum(prev_t, 0)], 1.0)
  # As diffusers: the x_t coefficient uses sqrt(alpha_t), not sqrt(1 - beta_t);
  # beta_t rounds to 1 in float32 when abar_t << abar_prev (t = 999).
  alpha_t = abar_t / abar_prev
  beta_t = 1.0 - alpha_t
  x0_hat = (x_t - jnp.sqrt(1.0 - abar_t) * model_output[..., :c]) / jnp.sqrt(abar_t)
  x0_hat = guidance_lib.apply_threshold(x0_hat, threshold, quantile, max_value)
  mean = (jnp.sqrt(abar_prev) * beta_t / (1.0 - abar_t)) * x0_hat + (
    jnp.sqrt(alpha_t) * (1.0 - abar_prev) / (1.0 - abar_t)
  ) * x_t
  beta_tilde = jnp.maximum((1.0 - abar_prev) / (1.0 - abar_t) * beta_t, 1e-20)
  std = _if_std(model_output[..., c:], beta_t, beta_tilde, variance)
  x_prev = mean + jnp.where(t > 0, std * noise, 0.0)
  return x_prev, x0_hat


def _if_std(v, beta_t, beta_tilde, variance):
  """Noise std of an IF step: learned interpolation of log variances or fixed.

  Args:
    v: [B, H, W, C] float in [-1, 1], the model's variance channels (unused
      for 'fixed_small').
    beta_t: scalar, the step's beta (upper end of the learned range).
    beta_tilde: scalar, the posterior variance (lower end).
    variance: 'learned_range' or 'fixed_small'.

  Returns:
    std: [B, H, W, C] or scalar float32.
  """
  if variance == "fixed_small":
    return jnp.sqrt(beta_tilde)
  frac = (v + 1.0) / 2.0
  logvar = frac * jnp.log(beta_t) + (1.0 - frac) * jnp.log(beta_tilde)
  return jnp.exp(0.5 * logvar)


@functools.partial(
  jax.jit,
  static_argnames=(
    "model_fn",
    "shape",
    "timesteps",
    "num_train_steps",
    "threshold",
    "variance",
    "use_guidance",
  ),
)
def _if_loop(
  rng,
  args,
  guidance_scale,
  quantile,
  max_value,
  edit,
  *,
  model_fn,
  shape,
  timesteps,
  num_train_steps,
  threshold,
  variance,
  use_guidance,
):
  """The jitted loop of if_ddpm_sample."""
  ac = jnp.asarray(schedules.alphas_cumprod(schedules.betas_squaredcos_cap_v2(num_train_steps)))
  ts = jnp.asarray(timesteps, jnp.int32)
  prev_ts = jnp.asarray(schedules.previous_timesteps(timesteps), jnp.int32)

  def step(i, x_t, extra, key):
    t = ts[i]
    out = guidance_lib.guided_output(
      model_fn, x_t, jnp.full((shape[0],), t), args, guidance_scale, use_guidance
    )
    noise = jax.random.normal(key, shape)
    x_prev, _ = if_ddpm_step(
      out,
      t,
      prev_ts[i],
      x_t,
      noise,
      ac,
      quantile,
      max_value,
      threshold=threshold,
      variance=variance,
    )
    return x_prev, extra

  logsnr_at = solvers.discrete_logsnr_fn(num_train_steps, ts, len(timesteps))
  return loop.run(step, (), rng, shape, len(timesteps), edit, logsnr_at)


def if_ddpm_sample(
  model_fn: ModelFn,
  shape,
  rng,
  args,
  *,
  timesteps,
  num_train_steps: int = 1000,
  guidance_scale=None,
  threshold: str = "dynamic",
  quantile=0.95,
  max_value=1.5,
  variance: str = "learned_range",
  x_init=None,
  strength=1.0,
  known=None,
  mask=None,
) -> jax.Array:
  """DeepFloyd IF's discrete DDPM sampler, one jitted loop.

  Args:
    model_fn: (x_t [N, ...], t [N] int32, args) -> [N, ..., 2C] (eps, v) for
      'learned_range', or [N, ..., C] eps for 'fixed_small'; hashable.
    shape: (B, H, W, C) of the samples.
    rng: PRNG key.
    args: pytree of arrays passed to model_fn.
    timesteps: ints, highest first: a name of IF_SCHEDULES ('smart50', ...) or
      a sequence such as schedules.if_timesteps(100).
    num_train_steps: N of the squaredcos_cap_v2 training schedule.
    guidance_scale: None (no guidance) or a scalar.
    threshold: 'dynamic' (IF's default), 'static' or 'none'.
    quantile: dynamic thresholding ratio (IF: 0.95).
    max_value: cap on s (IF: 1.5 for stage I, 1.0 for stage II); None = none.
    variance: 'learned_range' or 'fixed_small'.
    x_init: None, or [B, H, W, C] float: image-to-image from this image
      (see `loop`); strength: s in [0, 1], the fraction of the steps run from
      x_init noised to that level (traced: no recompile across values).
    known, mask: None, or the inpainting image [B, H, W, C] and mask
      [B, H, W, 1] (1 = regenerate); the output keeps known's mask-0 pixels.

  Returns:
    x0: [B, H, W, C] float32.
  """
  if isinstance(timesteps, str):
    timesteps = if_schedules.named_if_timesteps(timesteps)
  timesteps = tuple(int(s) for s in timesteps)
  if not timesteps:
    raise ValueError("timesteps must hold at least one step, got none.")
  if not all(0 <= s < num_train_steps for s in timesteps):
    raise ValueError(f"timesteps must lie in [0, {num_train_steps}), got {timesteps}.")
  guidance_lib.check_threshold_mode(threshold)
  if variance not in VARIANCE_KINDS:
    raise ValueError(f"Unknown variance kind {variance!r}; valid: {list(VARIANCE_KINDS)}.")
  edit = loop.make_edit(shape, x_init, strength, known, mask)
  return _if_loop(
    rng,
    args,
    loop.scalar(guidance_scale, 1.0),
    loop.scalar(quantile, 0.95),
    loop.scalar(max_value, jnp.inf),
    edit,
    model_fn=model_fn,
    shape=tuple(shape),
    timesteps=timesteps,
    num_train_steps=num_train_steps,
    threshold=threshold,
    variance=variance,
    use_guidance=guidance_scale is not None,
  )


SAMPLERS = ("ddpm", "ddim", "if_ddpm", "dpmpp_2m", "euler", "heun")
DISCRETE_SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "euler", "heun")


def get_sampler(name: str) -> Callable[..., jax.Array]:
  """Returns the continuous-time sampler called `name` (see SAMPLERS).

  'if_ddpm' (IF's discrete DDPM) stays here for old callers; the IF stages'
  samplers come from `get_discrete_sampler`.

  Raises:
    ValueError: for an unknown name.
  """
  fns = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "if_ddpm": if_ddpm_sample,
    "dpmpp_2m": solvers.dpmpp_2m_sample,
    "euler": solvers.euler_sample,
    "heun": solvers.heun_sample,
  }
  if name not in fns:
    raise ValueError(f"Unknown sampler {name!r}; valid: {list(SAMPLERS)}.")
  return fns[name]


def get_discrete_sampler(name: str) -> Callable[..., jax.Array]:
  """Returns the DeepFloyd IF (discrete schedule) sampler called `name`.

  'ddpm' is `if_ddpm_sample` (IF's own ancestral sampler), 'ddim' and
  'dpmpp_2m' take `timesteps=` like it; 'euler' and 'heun' take
  `num_steps=` (they build EDM's sigma grid). See DISCRETE_SAMPLERS.

  Raises:
    ValueError: for an unknown name.
  """
  fns = {
    "ddpm": if_ddpm_sample,
    "ddim": if_solvers.if_ddim_sample,
    "dpmpp_2m": if_solvers.if_dpmpp_2m_sample,
    "euler": if_solvers.if_euler_sample,
    "heun": if_solvers.if_heun_sample,
  }
  if name not in fns:
    raise ValueError(f"Unknown IF sampler {name!r}; valid: {list(DISCRETE_SAMPLERS)}.")
  return fns[name]
