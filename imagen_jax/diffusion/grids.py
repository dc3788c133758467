"""Sampling grids: grid point i -> (t_model, logsnr), for every schedule kind.

A sampler walks grid points i = 0 (noisiest) .. n (the end, where logsnr
may be +inf: sigma = 0). Every grid here is a function of traced numbers
(the step count n, the padded timesteps, EDM's sigma range), so no grid
ever recompiles a loop:

* `uniform_point`: continuous time t_i = 1 - i / n (DDPM, DDIM and
  DPM-Solver++ on continuous schedules); the model gets t ([] float32).
* `timestep_point`: the i-th of the given integer timesteps (padded, with
  their true count n), ending at logsnr = +inf; the model gets the timestep
  ([] int32). Discrete schedules (DeepFloyd IF, Stable Diffusion).
* `karras_point`: EDM's sigma~ grid (Karras et al. 2022) for Euler and
  Heun, sigma~ = sigma / alpha = exp(-logsnr / 2),
  sigma~_i = (smax^(1/rho) + i / (n - 1) (smin^(1/rho) - smax^(1/rho)))^rho
  for i < n and sigma~_n = 0, with smin and smax clipped to the schedule's
  range; continuous schedules find t for each sigma~ by bisection on
  logsnr(t), discrete ones take the nearest integer timestep.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "discrete_logsnr_table",
  "edm_bounds",
  "karras_point",
  "karras_sigma",
  "timestep_point",
  "uniform_point",
]

_BISECTION_ITERS = 40
Point = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def discrete_logsnr_table(alphas_cumprod) -> np.ndarray:
  """log(abar / (1 - abar)) per training timestep, computed in float64.

  Args:
    alphas_cumprod: [N] float (concrete), e.g. schedules.alphas_cumprod(...).

  Returns:
    [N] float32, decreasing.
  """
  ac = np.asarray(alphas_cumprod).astype(np.float64)
  return (np.log(ac) - np.log1p(-ac)).astype(np.float32)


def uniform_point(logsnr_fn, num_steps) -> Point:
  """Continuous grid t_i = 1 - i / n.

  Args:
    logsnr_fn: t -> logsnr (decreasing).
    num_steps: n, [] int32 (traced).

  Returns:
    point(i [] int32) -> (t [] float32, logsnr [] float32).
  """
  n = jnp.asarray(num_steps, jnp.int32).astype(jnp.float32)

  def point(i):
    t = 1.0 - i.astype(jnp.float32) / n
    return t, logsnr_fn(t)

  return point


def timestep_point(timesteps, logsnr_table, num_steps, final_logsnr=jnp.inf) -> Point:
  """Discrete grid over given integer timesteps, final_logsnr from i = n on.

  Args:
    timesteps: [L] int32, highest first, padded past n (traced).
    logsnr_table: [N] float32 (traced), from `discrete_logsnr_table`.
    num_steps: n <= L, [] int32 (traced).
    final_logsnr: [] float32 (traced), the log-SNR the last step lands on:
      +inf (x0), or diffusers DDIM's alphas_cumprod[0] when set_alpha_to_one
      is false (Stable Diffusion's schedulers).

  Returns:
    point(i [] int32) -> (timestep [] int32, logsnr [] float32).
  """
  ts = jnp.asarray(timesteps, jnp.int32)

  def point(i):
    t = ts[jnp.clip(i, 0, ts.shape[0] - 1)]
    return t, jnp.where(i >= num_steps, final_logsnr, logsnr_table[t])

  return point


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


def edm_bounds(sigma_min, sigma_max, logsnr_lo, logsnr_hi):
  """EDM's (sigma_min, sigma_max) clipped to a schedule's log-SNR range.

  Args:
    sigma_min, sigma_max: [] float, the requested range.
    logsnr_lo, logsnr_hi: [] float, the schedule's noisiest and cleanest
      log-SNR.

  Returns:
    (sigma_min, sigma_max): [] float32, sigma_min <= sigma_max.
  """
  smin = jnp.maximum(sigma_min, jnp.exp(-0.5 * logsnr_hi))
  smax = jnp.minimum(sigma_max, jnp.exp(-0.5 * logsnr_lo))
  return smin, jnp.maximum(smax, smin)


def _bisect_time(logsnr_fn, logsnr) -> jax.Array:
  """t in [0, 1] with logsnr_fn(t) = logsnr (logsnr_fn decreasing), [] f32."""

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    above = logsnr_fn(mid) > logsnr
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  lo, hi = jax.lax.fori_loop(0, _BISECTION_ITERS, body, (jnp.float32(0.0), jnp.float32(1.0)))
  return 0.5 * (lo + hi)


def karras_point(num_steps, sigma_min, sigma_max, rho, *, logsnr_fn=None, logsnr_table=None):
  """EDM's sigma~ grid on a continuous (logsnr_fn) or discrete (table) schedule.

  Args:
    num_steps: n, [] int32 (traced).
    sigma_min, sigma_max, rho: [] float32 (traced), EDM's grid.
    logsnr_fn: continuous schedule t -> logsnr; or
    logsnr_table: [N] float32, a discrete one (exactly one of the two).

  Returns:
    point(i) -> (t_model [] (float t or int32 timestep), logsnr [] float32),
    logsnr = +inf at i = n.
  """
  if logsnr_table is not None:
    lo, hi = logsnr_table[-1], logsnr_table[0]
  else:
    lo, hi = logsnr_fn(jnp.float32(1.0)), logsnr_fn(jnp.float32(0.0))
  smin, smax = edm_bounds(sigma_min, sigma_max, lo, hi)

  def point(i):
    sigma = karras_sigma(i, num_steps, smin, smax, rho)
    target = -2.0 * jnp.log(jnp.maximum(sigma, 1e-30))
    if logsnr_table is not None:
      t = jnp.argmin(jnp.abs(logsnr_table - target)).astype(jnp.int32)
      logsnr = logsnr_table[t]
    else:
      t = _bisect_time(logsnr_fn, target)
      logsnr = logsnr_fn(t)
    return t, jnp.where(sigma > 0, logsnr, jnp.inf)

  return point
