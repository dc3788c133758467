"""Diffusion training math: forward process, targets, weighting, noise augmentation.

All functions are pure and work on images `x: [B, H, W, C]` (any trailing
shape, in fact) with a per-example log-SNR `logsnr: [B]` that broadcasts over
the trailing axes. Prediction kinds:
  'eps': the noise eps;
  'x0':  the clean data x0;
  'v':   v = alpha eps - sigma x0 (Salimans & Ho 2022).
"""

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.schedules import alpha_sigma

__all__ = [
  "PREDICTION_KINDS",
  "check_prediction_kind",
  "diffusion_loss",
  "eps_from_pred",
  "expand_to",
  "get_target",
  "min_snr_weight",
  "noise_augment",
  "q_sample",
  "x0_from_pred",
]

PREDICTION_KINDS = ("eps", "x0", "v")


def check_prediction_kind(kind: str) -> None:
  """Raises ValueError unless `kind` is one of PREDICTION_KINDS."""
  if kind not in PREDICTION_KINDS:
    raise ValueError(f"Unknown prediction kind {kind!r}; valid: {list(PREDICTION_KINDS)}.")


def expand_to(v, x) -> jax.Array:
  """Reshapes per-example `v: [B]` (or a scalar) to broadcast against x.

  Args:
    v: [B] or scalar float.
    x: [B, ...] array.

  Returns:
    v as float32 with trailing unit axes: [B, 1, ..., 1] (x.ndim axes).
  """
  v = jnp.asarray(v, jnp.float32)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _alpha_sigma_like(logsnr, x) -> tuple[jax.Array, jax.Array]:
  alpha, sigma = alpha_sigma(logsnr)
  return expand_to(alpha, x), expand_to(sigma, x)


def q_sample(x0, eps, logsnr) -> jax.Array:
  """Samples the forward process: x_t = alpha x0 + sigma eps.

  Args:
    x0: [B, ...] float, clean data.
    eps: [B, ...] float, standard normal noise.
    logsnr: [B] (or scalar) float.

  Returns:
    x_t: [B, ...] float32.
  """
  alpha, sigma = _alpha_sigma_like(logsnr, x0)
  return alpha * x0 + sigma * eps


def get_target(kind: str, x0, eps, logsnr) -> jax.Array:
  """The regression target for prediction `kind`.

  Args:
    kind: 'eps', 'x0' or 'v'.
    x0: [B, ...] float.
    eps: [B, ...] float.
    logsnr: [B] float.

  Returns:
    target: [B, ...] float32 (eps, x0, or v = alpha eps - sigma x0).
  """
  check_prediction_kind(kind)
  if kind == "eps":
    return jnp.asarray(eps, jnp.float32)
  if kind == "x0":
    return jnp.asarray(x0, jnp.float32)
  alpha, sigma = _alpha_sigma_like(logsnr, x0)
  return alpha * eps - sigma * x0


def x0_from_pred(kind: str, x_t, pred, logsnr) -> jax.Array:
  """Converts a model prediction to x0_hat.

  x0_hat = (x_t - sigma eps_hat) / alpha, x0_hat itself, or
  alpha x_t - sigma v_hat.

  Args:
    kind: 'eps', 'x0' or 'v'.
    x_t: [B, ...] float.
    pred: [B, ...] float, the model output (same shape as x_t).
    logsnr: [B] float.

  Returns:
    x0_hat: [B, ...] float32.
  """
  check_prediction_kind(kind)
  pred = jnp.asarray(pred, jnp.float32)
  if kind == "x0":
    return pred
  alpha, sigma = _alpha_sigma_like(logsnr, x_t)
  if kind == "eps":
    return (x_t - sigma * pred) / alpha
  return alpha * x_t - sigma * pred


def eps_from_pred(kind: str, x_t, pred, logsnr) -> jax.Array:
  """Converts a model prediction to eps_hat.

  eps_hat itself, (x_t - alpha x0_hat) / sigma, or sigma x_t + alpha v_hat.

  Args:
    kind: 'eps', 'x0' or 'v'.
    x_t: [B, ...] float.
    pred: [B, ...] float, the model output (same shape as x_t).
    logsnr: [B] float.

  Returns:
    eps_hat: [B, ...] float32.
  """
  check_prediction_kind(kind)
  pred = jnp.asarray(pred, jnp.float32)
  if kind == "eps":
    return pred
  alpha, sigma = _alpha_sigma_like(logsnr, x_t)
  if kind == "x0":
    return (x_t - alpha * pred) / sigma
  return sigma * x_t + alpha * pred


def min_snr_weight(logsnr, kind: str, gamma: float = 5.0) -> jax.Array:
  """Min-SNR-gamma loss weight (Hang et al. 2023) for target `kind`.

  The weight makes every kind's loss equal min(snr, gamma) ||x0 - x0_hat||^2:
  eps: min(snr, gamma) / snr; x0: min(snr, gamma); v: min(snr, gamma) /
  (snr + 1). Computed in log-space forms that stay finite for |logsnr| ~ 20.

  Args:
    logsnr: [B] float.
    kind: 'eps', 'x0' or 'v'.
    gamma: the SNR cap.

  Returns:
    weight: [B] float32.
  """
  check_prediction_kind(kind)
  logsnr = jnp.asarray(logsnr, jnp.float32)
  if kind == "eps":
    return jnp.minimum(1.0, gamma * jnp.exp(-logsnr))
  if kind == "x0":
    return jnp.minimum(jnp.exp(logsnr), gamma)
  # snr / (snr + 1) = sigmoid(logsnr); gamma / (snr + 1) = gamma sigmoid(-logsnr).
  return jnp.minimum(jax.nn.sigmoid(logsnr), gamma * jax.nn.sigmoid(-logsnr))


def diffusion_loss(pred, target, weight=None) -> jax.Array:
  """Per-example mean squared error, optionally weighted.

  Args:
    pred: [B, ...] float.
    target: [B, ...] float.
    weight: None or [B] float.

  Returns:
    loss: [B] float32, mean over all non-batch axes (times weight).
  """
  err = jnp.square(jnp.asarray(pred, jnp.float32) - target)
  loss = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
  if weight is not None:
    loss = loss * jnp.asarray(weight, jnp.float32)
  return loss


def noise_augment(x_lowres, aug_t, eps, logsnr_fn) -> jax.Array:
  """Noise-conditioning augmentation of a super-resolution stage's input.

  Args:
    x_lowres: [B, H, W, C] float, the (upsampled) low-resolution image.
    aug_t: [B] float in [0, 1], the augmentation level per example.
    eps: [B, H, W, C] float, standard normal noise.
    logsnr_fn: schedule t -> logsnr (e.g. get_logsnr_fn('linear')).

  Returns:
    x_aug: [B, H, W, C] float32, alpha x_lowres + sigma eps at logsnr_fn(aug_t).
  """
  return q_sample(x_lowres, eps, logsnr_fn(aug_t))


def _normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
  """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (
    -1.0
    + logvar2
    - logvar1
    + jnp.exp(logvar1 - logvar2)
    + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
  )


def _discretized_gaussian_nll(x0, mean, logvar) -> jax.Array:
  """-log P(x0) of 8-bit data in [-1, 1] (bins of width 2/255) under N(mean, e^logvar)."""
  inv_std = jnp.exp(-0.5 * logvar)
  upper = jax.scipy.stats.norm.cdf(inv_std * (x0 - mean + 1.0 / 255.0))
  lower = jax.scipy.stats.norm.cdf(inv_std * (x0 - mean - 1.0 / 255.0))
  tiny = 1e-12
  log_p = jnp.where(
    x0 < -0.999,
    jnp.log(jnp.maximum(upper, tiny)),
    jnp.where(
      x0 > 0.999, jnp.log(jnp.maximum(1.0 - lower, tiny)), jnp.log(jnp.maximum(upper - lower, tiny))
    ),
  )
  return -log_p


def learned_range_vb(eps_hat, v, x0, x_t, t, alphas_cumprod) -> jax.Array:
  """The variational-bound term that trains a learned-range variance (discrete DDPM).

  The model's reverse step p(x_{t-1} | x_t) has the posterior mean computed from
  ``eps_hat`` (pass it through ``stop_gradient`` so that this term trains only
  the variance) and log variance f log β_t + (1 - f) log β̃_t, f = (v + 1) / 2,
  with β̃_0 replaced by β̃_1 (its log would be -inf). The term is
  KL(q(x_{t-1} | x_t, x0) ‖ p) for t > 0 and the discretized decoder NLL at
  t = 0, in bits per dimension, averaged per example.

  Args:
    eps_hat: [B, H, W, C] float, predicted noise.
    v: [B, H, W, C] float in [-1, 1], the variance channels.
    x0: [B, H, W, C] float, clean data in [-1, 1].
    x_t: [B, H, W, C] float, the noised input.
    t: [B] int timesteps in [0, N).
    alphas_cumprod: [N] float (schedules.alphas_cumprod).

  Returns:
    [B] float32.
  """
  ac = jnp.asarray(alphas_cumprod, jnp.float32)
  ac_prev = jnp.concatenate([jnp.ones((1,), jnp.float32), ac[:-1]])
  betas = 1.0 - ac / ac_prev
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  post_logvar = jnp.log(jnp.concatenate([post_var[1:2], post_var[1:]]))
  coef_x0 = betas * jnp.sqrt(ac_prev) / (1.0 - ac)
  coef_xt = (1.0 - ac_prev) * jnp.sqrt(1.0 - betas) / (1.0 - ac)
  pick = lambda table: expand_to(table[t], x0)
  x0_hat = (x_t - jnp.sqrt(1.0 - pick(ac)) * eps_hat) / jnp.sqrt(pick(ac))
  true_mean = pick(coef_x0) * x0 + pick(coef_xt) * x_t
  model_mean = pick(coef_x0) * x0_hat + pick(coef_xt) * x_t
  frac = (jnp.asarray(v, jnp.float32) + 1.0) / 2.0
  model_logvar = frac * jnp.log(pick(betas)) + (1.0 - frac) * pick(post_logvar)
  kl = _normal_kl(true_mean, pick(post_logvar), model_mean, model_logvar)
  nll = _discretized_gaussian_nll(x0, model_mean, model_logvar)
  per_dim = jnp.where(expand_to(t, x0) == 0, nll, kl) / jnp.log(2.0)
  return jnp.mean(per_dim.reshape(per_dim.shape[0], -1), axis=1)
