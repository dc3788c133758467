"""Update rules of the stochastic samplers: ancestral DDPM and DDIM (with eta).

A rule is `step(ctx, i, x_t, carry, key) -> (x_s, carry)`, the update from
grid point i to i + 1 given a `loop.Context` (grid, guided model, traced
options); `sampling` plugs it into `loop.run`. The single-step math is also
public for parity tests:

* `ancestral_step`: a draw from q(x_s | x_t, x0_hat) in log-SNR form (VDM),
  used on continuous schedules;
* `discrete_ddpm_step`: diffusers' `DDPMScheduler.step` on an alphas_cumprod
  table (DeepFloyd IF, Stable Diffusion), with 'learned_range' or
  'fixed_small' variance and eps, v or x0 prediction;
* `ddim_step`: generalized DDIM (eta = 0 deterministic, 1 ancestral), on
  any schedule (the discrete grid ends at logsnr = +inf, sigma = 0).
"""

import functools

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import guidance as guidance_lib
from imagen_jax.diffusion import losses
from imagen_jax.diffusion import schedules

__all__ = [
  "VARIANCE_KINDS",
  "ancestral_step",
  "ddim_rule",
  "ddim_step",
  "ddpm_rule",
  "discrete_ddpm_step",
  "if_ddpm_step",
]

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
    logsnr_s: scalar or [B] float, > logsnr_t (+inf: sigma_s = 0).
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


def _x0_from_table(prediction, x_t, pred, abar_t):
  """diffusers' x0 from eps, v or x0 at alpha_bar abar_t ([] float)."""
  if prediction == "eps":
    return (x_t - jnp.sqrt(1.0 - abar_t) * pred) / jnp.sqrt(abar_t)
  if prediction == "v":
    return jnp.sqrt(abar_t) * x_t - jnp.sqrt(1.0 - abar_t) * pred
  return pred


def discrete_ddpm_step(
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
  prediction: str = "eps",
):
  """One diffusers `DDPMScheduler.step` on an alphas_cumprod table.

  abar_t = alphas_cumprod[t], abar_prev = alphas_cumprod[prev_t] (1 when
  prev_t < 0), beta_t = 1 - abar_t / abar_prev (the step's own beta, so it
  spans the gap to the previous timestep of the schedule),
  beta_tilde = max((1 - abar_prev) / (1 - abar_t) beta_t, 1e-20).
  x0_hat from the prediction (eps: (x_t - sqrt(1 - abar_t) eps_hat) /
  sqrt(abar_t); v: sqrt(abar_t) x_t - sqrt(1 - abar_t) v_hat), thresholded;
  mean = sqrt(abar_prev) beta_t / (1 - abar_t) x0_hat
       + sqrt(abar_t / abar_prev) (1 - abar_prev) / (1 - abar_t) x_t.
  Std: 'learned_range': exp(logvar / 2), logvar = f log beta_t + (1 - f)
  log beta_tilde, f = (v + 1) / 2 from the extra channels; 'fixed_small':
  sqrt(beta_tilde). No noise is added when t == 0.

  Args:
    model_output: [B, H, W, 2C] (learned_range: the prediction, then the
      variance channels) or [B, H, W, C] ('fixed_small' accepts either).
    t: int scalar (may be traced), current timestep.
    prev_t: int scalar (may be traced), the next timestep of the schedule
      (-1 after the last).
    x_t: [B, H, W, C] float.
    noise: [B, H, W, C] standard normal.
    alphas_cumprod: [N] float (schedules.alphas_cumprod; may be traced).
    quantile: dynamic thresholding ratio (may be traced).
    max_value: cap on s (IF's sample_max_value; None = no cap; may be traced).
    threshold: 'dynamic', 'static' (clip to [-1, 1]) or 'none'.
    variance: 'learned_range' or 'fixed_small'.
    prediction: 'eps', 'v' or 'x0' (what the first C channels are).

  Returns:
    (x_prev, x0_hat): both [B, H, W, C] float32.
  """
  if variance not in VARIANCE_KINDS:
    raise ValueError(f"Unknown variance kind {variance!r}; valid: {list(VARIANCE_KINDS)}.")
  c = x_t.shape[-1]
  if variance == "learned_range" and model_output.shape[-1] != 2 * c:
    raise ValueError(
      f"variance='learned_range' needs {2 * c} output channels (prediction and v), "
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
  x0_hat = _x0_from_table(prediction, x_t, model_output[..., :c], abar_t)
  x0_hat = guidance_lib.apply_threshold(x0_hat, threshold, quantile, max_value)
  mean = (jnp.sqrt(abar_prev) * beta_t / (1.0 - abar_t)) * x0_hat + (
    jnp.sqrt(alpha_t) * (1.0 - abar_prev) / (1.0 - abar_t)
  ) * x_t
  beta_tilde = jnp.maximum((1.0 - abar_prev) / (1.0 - abar_t) * beta_t, 1e-20)
  std = _discrete_std(model_output[..., c:], beta_t, beta_tilde, variance)
  x_prev = mean + jnp.where(t > 0, std * noise, 0.0)
  return x_prev, x0_hat


# DeepFloyd IF's name for the same step (eps prediction by default).
if_ddpm_step = discrete_ddpm_step


def _discrete_std(v, beta_t, beta_tilde, variance):
  """Noise std of a discrete step: learned interpolation of log variances or fixed.

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


def _last_step_quiet(ctx, i, noise):
  """The noise of step i, zero on the last step (it lands on x0)."""
  return jnp.where(i == ctx.num_steps - 1, 0.0, noise)


def ddpm_rule(ctx, i, x_t, carry, key):
  """Ancestral DDPM: VDM's step (continuous) or diffusers' step (discrete)."""
  spec, opts = ctx.spec, ctx.options
  noise = jax.random.normal(key, x_t.shape, jnp.float32)
  t, logsnr_t = ctx.point(i)
  t_next, logsnr_s = ctx.point(i + 1)
  if spec.schedule == "discrete":
    prev_t = jnp.where(i + 1 < ctx.num_steps, t_next, -1)
    x_prev, _ = discrete_ddpm_step(
      ctx.output(x_t, t),
      t,
      prev_t,
      x_t,
      noise,
      opts.alphas_cumprod,
      opts.quantile,
      opts.max_value,
      threshold=spec.threshold,
      variance=spec.variance,
      prediction=spec.prediction,
    )
    return x_prev, carry
  x0_hat, _ = ctx.predict(x_t, t, logsnr_t)
  return ancestral_step(x_t, x0_hat, logsnr_t, logsnr_s, _last_step_quiet(ctx, i, noise)), carry


def ddim_rule(ctx, i, x_t, carry, key):
  """DDIM with traced eta on any grid (eta = 0: deterministic)."""
  t, logsnr_t = ctx.point(i)
  _, logsnr_s = ctx.point(i + 1)
  x0_hat, eps_hat = ctx.predict(x_t, t, logsnr_t)
  noise = _last_step_quiet(ctx, i, jax.random.normal(key, x_t.shape, jnp.float32))
  return ddim_step(x_t, x0_hat, eps_hat, logsnr_t, logsnr_s, noise, ctx.options.eta), carry
