"""DeepFloyd IF (discrete DDPM schedule) entry points of the ODE solvers.

The same loops as `solvers` on IF's squaredcos_cap_v2 schedule: the model
gets integer timesteps ([N] int32) and predicts eps (or `prediction`) in its
first C channels; further channels (IF's learned variance) are dropped, as
diffusers' deterministic schedulers do. Grid: DPM-Solver++ and DDIM run over
the given timesteps (as `samplers.if_ddpm_sample` takes them) and end at
sigma = 0; Euler and Heun build EDM's sigma grid of num_steps points and use
the nearest integer timestep of each.

if_dpmpp_2m_sample matches diffusers' `DPMSolverMultistepScheduler`
(algorithm_type='dpmsolver++', solver_order=2, lower_order_final=True,
final_sigmas_type='zero', variance_type='learned_range', thresholding as
given) run over the same timesteps; tests/test_diffusion_solvers.py checks
that against a fixture from tools/make_dpm_fixtures.py.

Timesteps are padded to num_train_steps entries and passed traced with their
count, so one compile serves every schedule and step count.
"""

import functools

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import guidance as guidance_lib
from imagen_jax.diffusion import if_schedules
from imagen_jax.diffusion import loop
from imagen_jax.diffusion import losses
from imagen_jax.diffusion import solvers

__all__ = [
  "if_ddim_sample",
  "if_dpmpp_2m_sample",
  "if_euler_sample",
  "if_heun_sample",
]


@functools.partial(
  jax.jit,
  static_argnames=(
    "model_fn",
    "shape",
    "prediction",
    "num_train_steps",
    "threshold",
    "use_guidance",
    "method",
  ),
)
def _discrete_solver(
  rng,
  args,
  opts,
  num_steps,
  timesteps,
  edit,
  *,
  model_fn,
  shape,
  prediction,
  num_train_steps,
  threshold,
  use_guidance,
  method,
):
  """The jitted loop of the IF (discrete-schedule) solvers."""
  predict = solvers.make_predictor(
    model_fn, args, opts, prediction=prediction, threshold=threshold, use_guidance=use_guidance
  )
  table = jnp.asarray(solvers.discrete_logsnr_table(num_train_steps))
  if method in ("dpmpp_2m", "ddim"):
    logsnr_at = solvers.discrete_logsnr_fn(num_train_steps, timesteps, num_steps)

    def point(i):
      return timesteps[jnp.clip(i, 0, timesteps.shape[0] - 1)], logsnr_at(i)

    order = 1 if method == "ddim" else 2
    return solvers.dpmpp_run(predict, point, rng, shape, num_steps, edit, order)
  smin, smax = solvers.edm_bounds(opts, table[-1], table[0])

  def edm_point(i):
    sigma = solvers.karras_sigma(i, num_steps, smin, smax, opts["rho"])
    target = -2.0 * jnp.log(jnp.maximum(sigma, 1e-30))
    t = jnp.argmin(jnp.abs(table - target)).astype(jnp.int32)
    return t, jnp.where(sigma > 0, table[t], jnp.inf)

  return solvers.edm_run(predict, edm_point, rng, shape, num_steps, edit, heun=method == "heun")


def _padded_timesteps(timesteps, num_train_steps):
  """Checks IF timesteps; returns ([num_train_steps] int32, count)."""
  if isinstance(timesteps, str):
    timesteps = if_schedules.named_if_timesteps(timesteps)
  timesteps = [int(s) for s in timesteps]
  if not timesteps:
    raise ValueError("timesteps must hold at least one step, got none.")
  if not all(0 <= s < num_train_steps for s in timesteps):
    raise ValueError(f"timesteps must lie in [0, {num_train_steps}), got {timesteps}.")
  if len(timesteps) > num_train_steps:
    raise ValueError(f"at most {num_train_steps} timesteps, got {len(timesteps)}.")
  padded = timesteps + [0] * (num_train_steps - len(timesteps))
  return jnp.asarray(padded, jnp.int32), len(timesteps)


def _discrete(
  method,
  model_fn,
  shape,
  rng,
  args,
  *,
  timesteps,
  num_steps,
  num_train_steps,
  prediction,
  guidance_scale,
  threshold,
  quantile,
  max_value,
  x_init,
  strength,
  known,
  mask,
  **edm,
):
  """Checks the options of an IF solver and runs its jitted loop."""
  losses.check_prediction_kind(prediction)
  guidance_lib.check_threshold_mode(threshold)
  if timesteps is None:
    if not isinstance(num_steps, int) or num_steps < 1:
      raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}.")
    timesteps = (0,)
  else:
    timesteps, num_steps = _padded_timesteps(timesteps, num_train_steps)
  edit = loop.make_edit(shape, x_init, strength, known, mask)
  opts = solvers.solver_opts(guidance_scale, quantile, max_value, **edm)
  return _discrete_solver(
    rng,
    args,
    opts,
    jnp.asarray(num_steps, jnp.int32),
    jnp.asarray(timesteps, jnp.int32),
    edit,
    model_fn=model_fn,
    shape=tuple(shape),
    prediction=prediction,
    num_train_steps=num_train_steps,
    threshold=threshold,
    use_guidance=guidance_scale is not None,
    method=method,
  )


def if_dpmpp_2m_sample(
  model_fn,
  shape,
  rng,
  args,
  *,
  timesteps,
  num_train_steps: int = 1000,
  prediction: str = "eps",
  guidance_scale=None,
  threshold: str = "dynamic",
  quantile=0.95,
  max_value=1.5,
  x_init=None,
  strength=1.0,
  known=None,
  mask=None,
) -> jax.Array:
  """DPM-Solver++ 2M on IF's discrete schedule, one jitted loop.

  Args:
    model_fn: (x_t [N, ...], t [N] int32, args) -> [N, ..., C'] with the
      prediction in the first C channels; hashable.
    shape: (B, H, W, C) of the samples.
    rng: PRNG key.
    args: pytree of arrays passed to model_fn (with guidance: 2B rows,
      unconditional first).
    timesteps: ints, highest first: a name of IF_SCHEDULES or a sequence such
      as schedules.if_timesteps(20, spacing='trailing') (traced).
    num_train_steps: N of the squaredcos_cap_v2 training schedule (static).
    prediction: 'eps' (IF), 'x0' or 'v'.
    guidance_scale: None (no guidance) or a scalar (traced).
    threshold: 'dynamic' (IF's default), 'static' or 'none'; applied to every
      x0_hat.
    quantile: dynamic thresholding ratio (IF: 0.95).
    max_value: cap on s (IF: 1.5 for stage I, 1.0 for stage II); None = none.
    x_init, strength, known, mask: image-to-image and inpainting, as in
      `samplers.ddpm_sample` (strength cuts the grid to its last
      ceil(strength n) steps).

  Returns:
    x0: [B, H, W, C] float32 (one model call per timestep).
  """
  return _discrete(
    "dpmpp_2m",
    model_fn,
    shape,
    rng,
    args,
    timesteps=timesteps,
    num_steps=None,
    num_train_steps=num_train_steps,
    prediction=prediction,
    guidance_scale=guidance_scale,
    threshold=threshold,
    quantile=quantile,
    max_value=max_value,
    x_init=x_init,
    strength=strength,
    known=known,
    mask=mask,
  )


def if_ddim_sample(
  model_fn,
  shape,
  rng,
  args,
  *,
  timesteps,
  num_train_steps: int = 1000,
  prediction: str = "eps",
  guidance_scale=None,
  threshold: str = "dynamic",
  quantile=0.95,
  max_value=1.5,
  x_init=None,
  strength=1.0,
  known=None,
  mask=None,
) -> jax.Array:
  """Deterministic DDIM (eta = 0) on IF's discrete schedule, one jitted loop.

  Args: as in `if_dpmpp_2m_sample` (DPM-Solver++ of order 1 is DDIM).

  Returns:
    x0: [B, H, W, C] float32.
  """
  return _discrete(
    "ddim",
    model_fn,
    shape,
    rng,
    args,
    timesteps=timesteps,
    num_steps=None,
    num_train_steps=num_train_steps,
    prediction=prediction,
    guidance_scale=guidance_scale,
    threshold=threshold,
    quantile=quantile,
    max_value=max_value,
    x_init=x_init,
    strength=strength,
    known=known,
    mask=mask,
  )


def if_euler_sample(
  model_fn,
  shape,
  rng,
  args,
  *,
  num_steps: int,
  num_train_steps: int = 1000,
  prediction: str = "eps",
  guidance_scale=None,
  threshold: str = "dynamic",
  quantile=0.95,
  max_value=1.5,
  x_init=None,
  strength=1.0,
  known=None,
  mask=None,
  sigma_min=0.002,
  sigma_max=80.0,
  rho=7.0,
) -> jax.Array:
  """Euler over EDM's sigma grid on IF's discrete schedule, one jitted loop.

  Args:
    num_steps: n (traced: no recompile across step counts).
    sigma_min, sigma_max, rho: EDM's grid, clipped to the schedule (traced).
    model_fn, shape, rng, args, num_train_steps, prediction, guidance_scale,
    threshold, quantile, max_value, x_init, strength, known, mask: as in
    `if_dpmpp_2m_sample`.

  Returns:
    x0: [B, H, W, C] float32 (n model calls).
  """
  return _discrete(
    "euler",
    model_fn,
    shape,
    rng,
    args,
    timesteps=None,
    num_steps=num_steps,
    num_train_steps=num_train_steps,
    prediction=prediction,
    guidance_scale=guidance_scale,
    threshold=threshold,
    quantile=quantile,
    max_value=max_value,
    x_init=x_init,
    strength=strength,
    known=known,
    mask=mask,
    sigma_min=sigma_min,
    sigma_max=sigma_max,
    rho=rho,
  )


def if_heun_sample(
  model_fn,
  shape,
  rng,
  args,
  *,
  num_steps: int,
  num_train_steps: int = 1000,
  prediction: str = "eps",
  guidance_scale=None,
  threshold: str = "dynamic",
  quantile=0.95,
  max_value=1.5,
  x_init=None,
  strength=1.0,
  known=None,
  mask=None,
  sigma_min=0.002,
  sigma_max=80.0,
  rho=7.0,
) -> jax.Array:
  """Heun over EDM's sigma grid on IF's discrete schedule, one jitted loop.

  Args: as in `if_euler_sample`.

  Returns:
    x0: [B, H, W, C] float32 (2n - 1 model calls).
  """
  return _discrete(
    "heun",
    model_fn,
    shape,
    rng,
    args,
    timesteps=None,
    num_steps=num_steps,
    num_train_steps=num_train_steps,
    prediction=prediction,
    guidance_scale=guidance_scale,
    threshold=threshold,
    quantile=quantile,
    max_value=max_value,
    x_init=x_init,
    strength=strength,
    known=known,
    mask=mask,
    sigma_min=sigma_min,
    sigma_max=sigma_max,
    rho=rho,
  )
