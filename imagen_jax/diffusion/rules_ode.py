"""Update rules of the deterministic ODE solvers: DPM-Solver++ 2M, Euler, Heun.

All three integrate the probability-flow ODE of the variance-preserving
process x_t = alpha x0 + sigma eps from a (guided, thresholded) x0_hat per
model call (`loop.Context.predict`); only the first C output channels are
used, so learned-variance channels are dropped (as diffusers does for its
deterministic schedulers). Rules have the signature of `rules_ancestral`.

DPM-Solver++ 2M (Lu et al. 2022, data prediction, multistep), with
lambda = logsnr / 2 and h = lambda_s - lambda_t:
  x_s = (sigma_s / sigma_t) x_t - alpha_s expm1(-h) D,
  D = x0_hat (first order) or x0_hat + (x0_hat - x0_prev) / (2 r),
  r = (lambda_t - lambda_prev) / h.
The first step (also the first after an image-to-image start) and the last
step are first order: diffusers does the same with its default
final_sigmas_type='zero' (`lower_order_final`), and on the continuous grid
the last step spans logsnr(1 / n) to logsnr(0) = 20, a long interval over
which a linear extrapolation of x0_hat overshoots. On a discrete grid it
matches diffusers' `DPMSolverMultistepScheduler` (algorithm_type=
'dpmsolver++', solver_order=2, lower_order_final=True, final_sigmas_type=
'zero'); tests/test_diffusion_solvers.py checks that against a fixture from
tools/make_dpm_fixtures.py.

Euler and Heun (Karras et al. 2022, "EDM", Algorithm 1 without churn) step
over `grids.karras_point` in sigma~ = sigma / alpha with dx~/dsigma~ =
eps_hat on x~ = x / alpha. Heun corrects every step with a second model call
except the last (into sigma~ = 0), so it makes 2n - 1 model calls; Euler
makes n and equals DDIM (eta = 0) on the same grid.
"""

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import schedules

__all__ = ["dpmpp_2m_rule", "dpmpp_2m_update", "euler_rule", "heun_rule"]


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


def dpmpp_2m_rule(ctx, i, x_t, x0_prev, key):
  """DPM-Solver++ 2M; the carry is the previous x0_hat ([B, ...] float32)."""
  del key  # Deterministic.
  t, logsnr_t = ctx.point(i)
  _, logsnr_s = ctx.point(i + 1)
  _, logsnr_prev = ctx.point(jnp.maximum(i - 1, 0))
  x0_hat, _ = ctx.predict(x_t, t, logsnr_t)
  first_order = (i == ctx.start) | (i == ctx.num_steps - 1)
  x_s = dpmpp_2m_update(x_t, x0_hat, x0_prev, logsnr_prev, logsnr_t, logsnr_s, first_order)
  return x_s, x0_hat


def _euler(ctx, i, x_t):
  """Euler's step (DDIM's update) and what Heun's corrector needs."""
  t, logsnr_t = ctx.point(i)
  t_next, logsnr_s = ctx.point(i + 1)
  _, eps_hat = x0_eps = ctx.predict(x_t, t, logsnr_t)
  alpha_s, sigma_s = schedules.alpha_sigma(logsnr_s)
  x_s = alpha_s * x0_eps[0] + sigma_s * eps_hat
  return x_s, (t_next, logsnr_t, logsnr_s, alpha_s, eps_hat)


def euler_rule(ctx, i, x_t, carry, key):
  """Euler on the probability-flow ODE (one model call per step)."""
  del key  # Deterministic.
  x_s, _ = _euler(ctx, i, x_t)
  return x_s, carry


def heun_rule(ctx, i, x_t, carry, key):
  """Heun: Euler, then a trapezoidal correction unless landing on sigma~ = 0."""
  del key  # Deterministic.
  x_euler, (t_next, logsnr_t, logsnr_s, alpha_s, eps_hat) = _euler(ctx, i, x_t)

  def correct(x_euler):
    _, eps_next = ctx.predict(x_euler, t_next, logsnr_s)
    # Heun in sigma~: x~_s = x~_euler + (sigma~_s - sigma~_t)(eps' - eps)/2.
    d_sigma = jnp.exp(-0.5 * logsnr_s) - jnp.exp(-0.5 * logsnr_t)
    return x_euler + 0.5 * alpha_s * d_sigma * (eps_next - eps_hat)

  x_s = jax.lax.cond(jnp.isfinite(logsnr_s), correct, lambda x: x, x_euler)
  return x_s, carry
