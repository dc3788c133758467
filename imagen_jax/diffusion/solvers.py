"""Deterministic ODE solvers: DPM-Solver++ 2M, Euler and Heun, one jit each.

All three integrate the probability-flow ODE of the variance-preserving
process x_t = alpha x0 + sigma eps, from a (guided, thresholded) x0_hat per
model call; model functions and guidance are as in `samplers`. Only the first
C output channels are used, so DeepFloyd IF's learned-variance channels are
dropped (as diffusers does for its deterministic schedulers).

DPM-Solver++ 2M (Lu et al. 2022, data prediction, multistep), with
lambda = logsnr / 2 and h = lambda_s - lambda_t:
  x_s = (sigma_s / sigma_t) x_t - alpha_s expm1(-h) D,
  D = x0_hat (first order) or x0_hat + (x0_hat - x0_prev) / (2 r),
  r = (lambda_t - lambda_prev) / h.
The first step (also the first after an image-to-image start) and the last
step are first order: diffusers does the same with its default
final_sigmas_type='zero' (`lower_order_final`), and on our continuous grid
the last step spans logsnr(1 / n) to logsnr(0) = 20, a long interval over
which a linear extrapolation of x0_hat overshoots. Grids: continuous
stages use DDIM's uniform t grid (t_i = 1 - i / n); IF stages use the given
integer timesteps and end at sigma = 0, as diffusers'
`DPMSolverMultistepScheduler` (final_sigmas_type='zero'). With order=1 it is
DDIM (eta = 0): the discrete 'ddim' sampler is that.

Euler and Heun (Karras et al. 2022, "EDM", Algorithm 1 without churn) step in
sigma~ = sigma / alpha = exp(-logsnr / 2) with dx~/dsigma~ = eps_hat on
x~ = x / alpha, over EDM's grid sigma~_i = (smax^(1/rho) + i / (n - 1)
(smin^(1/rho) - smax^(1/rho)))^rho, i < n, and sigma~_n = 0. smax and smin
are clipped to the schedule's range; continuous stages find t for each
sigma~ by bisection on logsnr(t), IF stages take the nearest integer
timestep. Heun corrects every step with a second model call except the last
(into sigma~ = 0), so it makes 2n - 1 model calls; Euler makes n and equals
DDIM on the same grid.

Static (changing them recompiles): model_fn, shape, prediction, schedule,
threshold mode, num_train_steps, and whether guidance / inpainting is used.
Traced: rng, args, guidance_scale, quantile, max_value, sigma_min,
sigma_max, rho, strength, the images, AND the step count (num_steps, or the
IF timesteps, padded to num_train_steps): one compile serves every number of
steps and every strength.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import loop
from imagen_jax.diffusion import schedules

__all__ = [
  "discrete_logsnr_fn",
  "discrete_logsnr_table",
  "dpmpp_2m_sample",
  "dpmpp_2m_update",
  "dpmpp_run",
  "edm_bounds",
  "edm_run",
  "euler_sample",
  "heun_sample",
  "karras_sigma",
  "make_predictor",
  "solver_opts",
]

_BISECTION_ITERS = 40


def discrete_logsnr_table(num_train_steps: int = 1000) -> np.ndarray:
  """log(abar / (1 - abar)) of IF's squaredcos_cap_v2 schedule, [N] float32."""
  ac = schedules.alphas_cumprod(schedules.betas_squaredcos_cap_v2(num_train_steps)).astype(
    np.float64
  )
  return (np.log(ac) - np.log1p(-ac)).astype(np.float32)


def discrete_logsnr_fn(num_train_steps: int, timesteps, num_steps):
  """Grid point i -> log-SNR of timesteps[i], +inf from i = num_steps on.

  Args:
    num_train_steps: N (static).
    timesteps: [L] int32 (L >= num_steps; may be traced).
    num_steps: n, int or [] int32.

  Returns:
    A function of [] int32 returning [] float32.
  """
  table = jnp.asarray(discrete_logsnr_table(num_train_steps))
  ts = jnp.asarray(timesteps, jnp.int32)

  def logsnr_at(i):
    value = table[ts[jnp.clip(i, 0, ts.shape[0] - 1)]]
    return jnp.where(i >= num_steps, jnp.inf, value)

  return logsnr_at


def karras_sigma(i, num_steps, sigma_min, sigma_max, rho) -> jax.Array:
  """EDM's sigma~ at grid point i of n.

  Args:
    i: [] int.
    num_steps: n, [] int.
    sigma_min, sigma_max, rho: [] float.

  Returns:
    [] float32: sigma_max at i = 0, sigma_min at i = n - 1, 0 from i = n on.
  """
  n = jnp.asarray(num_steps, jnp.int32)
  frac = i.astype(jnp.float32) / jnp.maximum(n - 1, 1).astype(jnp.float32)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  sigma = (hi + frac * (lo - hi)) ** rho
  return jnp.where(i >= n, 0.0, sigma)


def dpmpp_2m_update(
  x_t, x0_hat, x0_prev, logsnr_prev, logsnr_t, logsnr_s, first_order
) -> jax.Array:
  """One DPM-Solver++ (2M) step from t to s (see the module docstring).

  Args:
    x_t: [B, ...] float.
    x0_hat: [B, ...] float, the data prediction at t.
    x0_prev: [B, ...] float, the data prediction at the previous grid point
      (unused when first_order).
    logsnr_prev, logsnr_t, logsnr_s: [] float, increasing (logsnr_s may be
      +inf: sigma_s = 0).
    first_order: [] bool.

  Returns:
    x_s: [B, ...] float32.
  """
  alpha_s, sigma_s = schedules.alpha_sigma(logsnr_s)
  _, sigma_t = schedules.alpha_sigma(logsnr_t)
  h = 0.5 * (logsnr_s - logsnr_t)
  r = 0.5 * (logsnr_t - logsnr_prev) / h
  d = jnp.where(first_order, x0_hat, x0_hat + (x0_hat - x0_prev) / (2.0 * r))
  return (sigma_s / sigma_t) * x_t - (alpha_s * jnp.expm1(-h)) * d


def make_predictor(model_fn, args, opts, *, prediction, threshold, use_guidance):
  """The guided, thresholded prediction a solver calls at each grid point.

  Args:
    model_fn, args: as in `samplers`.
    opts: from `solver_opts` (guidance_scale, quantile, max_value used).
    prediction, threshold, use_guidance: static, as in
      `loop.predict_x0_eps`.

  Returns:
    predict(x [B, ...], t_model [], logsnr []) -> (x0_hat, eps_hat), both
    [B, ...] float32.
  """

  def predict(x, t_model, logsnr):
    b = x.shape[0]
    return loop.predict_x0_eps(
      model_fn,
      x,
      jnp.full((b,), t_model),
      jnp.full((b,), logsnr),
      args,
      prediction=prediction,
      guidance_scale=opts["guidance_scale"],
      use_guidance=use_guidance,
      threshold=threshold,
      quantile=opts["quantile"],
      max_value=opts["max_value"],
    )

  return predict


def dpmpp_run(predict, point, rng, shape, num_steps, edit, order):
  """DPM-Solver++ (order 2, or 1 = DDIM) over a grid; call under jit.

  Args:
    predict: from `make_predictor`.
    point: i [] int32 -> (t_model [], logsnr [] float32) of grid point i,
      for 0 <= i <= n (logsnr may be +inf at n).
    rng, shape, num_steps, edit: as in `loop.run`.
    order: static 1 or 2.

  Returns:
    x0: [B, H, W, C] float32.
  """
  n = jnp.asarray(num_steps, jnp.int32)
  start = loop.start_index(n, edit.strength)

  def step(i, x_t, x0_prev, key):
    del key  # Deterministic.
    t_model, logsnr_t = point(i)
    _, logsnr_s = point(i + 1)
    _, logsnr_prev = point(jnp.maximum(i - 1, 0))
    x0_hat, _ = predict(x_t, t_model, logsnr_t)
    first_order = (order == 1) | (i == start) | (i == n - 1)
    x_s = dpmpp_2m_update(x_t, x0_hat, x0_prev, logsnr_prev, logsnr_t, logsnr_s, first_order)
    return x_s, x0_hat

  return loop.run(step, jnp.zeros(shape, jnp.float32), rng, shape, n, edit, lambda i: point(i)[1])


def edm_run(predict, point, rng, shape, num_steps, edit, heun):
  """Euler (heun=False) or Heun over an EDM sigma grid; call under jit.

  Args:
    predict, point, rng, shape, num_steps, edit: as in `dpmpp_run`; point n
      must have logsnr +inf (sigma~ = 0), where Heun takes an Euler step.
    heun: static bool.

  Returns:
    x0: [B, H, W, C] float32.
  """

  def step(i, x_t, extra, key):
    del key  # Deterministic.
    t_model, logsnr_t = point(i)
    t_next, logsnr_s = point(i + 1)
    x0_hat, eps_hat = predict(x_t, t_model, logsnr_t)
    alpha_s, sigma_s = schedules.alpha_sigma(logsnr_s)
    x_s = alpha_s * x0_hat + sigma_s * eps_hat  # Euler: DDIM's update.
    if not heun:
      return x_s, extra

    def correct(x_euler):
      _, eps_next = predict(x_euler, t_next, logsnr_s)
      # Heun in sigma~: x~_s = x~_euler + (sigma~_s - sigma~_t)(eps' - eps)/2.
      d_sigma = jnp.exp(-0.5 * logsnr_s) - jnp.exp(-0.5 * logsnr_t)
      return x_euler + 0.5 * alpha_s * d_sigma * (eps_next - eps_hat)

    x_s = jax.lax.cond(jnp.isfinite(logsnr_s), correct, lambda x: x, x_s)
    return x_s, extra

  return loop.run(step, (), rng, shape, num_steps, edit, lambda i: point(i)[1])


def _bisect_time(logsnr_fn, logsnr) -> jax.Array:
  """t in [0, 1] with logsnr_fn(t) = logsnr (logsnr_fn decreasing), [] f32."""

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    above = logsnr_fn(mid) > logsnr
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  lo, hi = jax.lax.fori_loop(0, _BISECTION_ITERS, body, (jnp.float32(0.0), jnp.float32(1.0)))
  return 0.5 * (lo + hi)


def edm_bounds(opts, logsnr_lo, logsnr_hi):
  """EDM's (sigma_min, sigma_max) clipped to a schedule's log-SNR range.

  Args:
    opts: from `solver_opts` (sigma_min, sigma_max used).
    logsnr_lo, logsnr_hi: [] float, the schedule's noisiest and cleanest
      log-SNR.

  Returns:
    (sigma_min, sigma_max): [] float32, sigma_min <= sigma_max.
  """
  smin = jnp.maximum(opts["sigma_min"], jnp.exp(-0.5 * logsnr_hi))
  smax = jnp.minimum(opts["sigma_max"], jnp.exp(-0.5 * logsnr_lo))
  return smin, jnp.maximum(smax, smin)


@functools.partial(
  jax.jit,
  static_argnames=(
    "model_fn",
    "shape",
    "prediction",
    "logsnr_fn",
    "threshold",
    "use_guidance",
    "method",
  ),
)
def _continuous_solver(
  rng,
  args,
  opts,
  num_steps,
  edit,
  *,
  model_fn,
  shape,
  prediction,
  logsnr_fn,
  threshold,
  use_guidance,
  method,
):
  """The jitted loop of the continuous-time solvers."""
  predict = make_predictor(
    model_fn, args, opts, prediction=prediction, threshold=threshold, use_guidance=use_guidance
  )
  if method in ("dpmpp_2m", "ddim"):

    def point(i):
      t = 1.0 - i.astype(jnp.float32) / num_steps.astype(jnp.float32)
      return t, logsnr_fn(t)

    order = 1 if method == "ddim" else 2
    return dpmpp_run(predict, point, rng, shape, num_steps, edit, order)
  smin, smax = edm_bounds(opts, logsnr_fn(jnp.float32(1.0)), logsnr_fn(jnp.float32(0.0)))

  def edm_point(i):
    sigma = karras_sigma(i, num_steps, smin, smax, opts["rho"])
    t = _bisect_time(logsnr_fn, -2.0 * jnp.log(jnp.maximum(sigma, 1e-30)))
    return t, jnp.where(sigma > 0, logsnr_fn(t), jnp.inf)

  return edm_run(predict, edm_point, rng, shape, num_steps, edit, heun=method == "heun")


def solver_opts(
  guidance_scale, quantile, max_value, sigma_min=0.002, sigma_max=80.0, rho=7.0
) -> dict:
  """The traced numbers of a solver call, as a dict of float32 scalars.

  Args:
    guidance_scale, quantile, max_value: as in `samplers` (None: 1, 0.995,
      +inf).
    sigma_min, sigma_max, rho: EDM's grid (Euler and Heun only).

  Returns:
    {name: [] float32} for the six names.
  """
  return dict(
    guidance_scale=loop.scalar(guidance_scale, 1.0),
    quantile=loop.scalar(quantile, 0.995),
    max_value=loop.scalar(max_value, jnp.inf),
    sigma_min=loop.scalar(sigma_min, 0.002),
    sigma_max=loop.scalar(sigma_max, 80.0),
    rho=loop.scalar(rho, 7.0),
  )


def _continuous(
  method,
  model_fn,
  shape,
  rng,
  args,
  *,
  num_steps,
  prediction,
  schedule,
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
  """Checks the options of a continuous solver and runs its jitted loop."""
  logsnr_fn = loop.check_continuous(num_steps, prediction, threshold, schedule)
  edit = loop.make_edit(shape, x_init, strength, known, mask)
  return _continuous_solver(
    rng,
    args,
    solver_opts(guidance_scale, quantile, max_value, **edm),
    jnp.asarray(num_steps, jnp.int32),
    edit,
    model_fn=model_fn,
    shape=tuple(shape),
    prediction=prediction,
    logsnr_fn=logsnr_fn,
    threshold=threshold,
    use_guidance=guidance_scale is not None,
    method=method,
  )


def dpmpp_2m_sample(
  model_fn,
  shape,
  rng,
  args,
  *,
  num_steps: int,
  prediction: str = "eps",
  schedule="cosine",
  guidance_scale=None,
  threshold: str = "static",
  quantile=0.995,
  max_value=None,
  x_init=None,
  strength=1.0,
  known=None,
  mask=None,
) -> jax.Array:
  """DPM-Solver++ 2M for a continuous-time stage, one jitted loop.

  Args:
    model_fn, shape, rng, args, num_steps, prediction, schedule,
    guidance_scale, threshold, quantile, max_value, x_init, strength, known,
    mask: as in `samplers.ddpm_sample`; num_steps is traced here (no
    recompile across step counts), and thresholding acts on each x0_hat.

  Returns:
    x0: [B, H, W, C] float32 (n model calls).
  """
  return _continuous(
    "dpmpp_2m",
    model_fn,
    shape,
    rng,
    args,
    num_steps=num_steps,
    prediction=prediction,
    schedule=schedule,
    guidance_scale=guidance_scale,
    threshold=threshold,
    quantile=quantile,
    max_value=max_value,
    x_init=x_init,
    strength=strength,
    known=known,
    mask=mask,
  )


def euler_sample(
  model_fn,
  shape,
  rng,
  args,
  *,
  num_steps: int,
  prediction: str = "eps",
  schedule="cosine",
  guidance_scale=None,
  threshold: str = "static",
  quantile=0.995,
  max_value=None,
  x_init=None,
  strength=1.0,
  known=None,
  mask=None,
  sigma_min=0.002,
  sigma_max=80.0,
  rho=7.0,
) -> jax.Array:
  """Euler on the probability-flow ODE over EDM's sigma grid, one jit.

  Args:
    model_fn ... mask: as in `dpmpp_2m_sample`.
    sigma_min, sigma_max, rho: EDM's grid (traced), clipped to the schedule.

  Returns:
    x0: [B, H, W, C] float32 (n model calls).
  """
  return _continuous(
    "euler",
    model_fn,
    shape,
    rng,
    args,
    num_steps=num_steps,
    prediction=prediction,
    schedule=schedule,
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


def heun_sample(
  model_fn,
  shape,
  rng,
  args,
  *,
  num_steps: int,
  prediction: str = "eps",
  schedule="cosine",
  guidance_scale=None,
  threshold: str = "static",
  quantile=0.995,
  max_value=None,
  x_init=None,
  strength=1.0,
  known=None,
  mask=None,
  sigma_min=0.002,
  sigma_max=80.0,
  rho=7.0,
) -> jax.Array:
  """Heun (EDM's 2nd-order sampler, no churn), one jitted loop.

  Args:
    model_fn ... rho: as in `euler_sample`.

  Returns:
    x0: [B, H, W, C] float32 (2n - 1 model calls).
  """
  return _continuous(
    "heun",
    model_fn,
    shape,
    rng,
    args,
    num_steps=num_steps,
    prediction=prediction,
    schedule=schedule,
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
