"""Noise schedules: continuous log-SNR schedules and DeepFloyd IF's discrete DDPM.

Continuous time (Imagen / VDM style): t in [0, 1], t = 0 is clean data and
t = 1 is (almost) pure noise. The schedule is the log signal-to-noise ratio
logsnr(t) = log(alpha^2 / sigma^2), decreasing in t, with the variance-preserving
parametrization alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr), and
x_t = alpha x0 + sigma eps.

Discrete time (diffusers `DDPMScheduler`): integer timesteps 0..N-1, betas
from the squared-cosine alpha-bar ("squaredcos_cap_v2", DeepFloyd IF) or
linear in beta or in sqrt(beta) ("linear", "scaled_linear": Stable
Diffusion), and inference timestep lists (`if_timesteps`; IF's named lists are in `if_schedules`).

Everything here computes in float32 (jnp) or float64 (NumPy, discrete tables).
"""

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


__all__ = [
  "LOGSNR_SCHEDULES",
  "SPACINGS",
  "alpha_sigma",
  "BETA_SCHEDULES",
  "alphas_cumprod",
  "betas_linear",
  "betas_scaled_linear",
  "betas_squaredcos_cap_v2",
  "get_betas",
  "get_logsnr_fn",
  "if_timesteps",
  "logsnr_cosine",
  "logsnr_linear",
  "previous_timesteps",
]

LogSnrFn = Callable[[jax.Array], jax.Array]


def logsnr_cosine(
  t, logsnr_min: float = -20.0, logsnr_max: float = 20.0, shift: float = 0.0
) -> jax.Array:
  """Cosine log-SNR schedule, logsnr(t) = -2 log tan(a t + b) + shift.

  a and b are chosen so that logsnr(0) = logsnr_max and logsnr(1) = logsnr_min
  (before the shift): b = atan(exp(-logsnr_max / 2)),
  a = atan(exp(-logsnr_min / 2)) - b. `shift` is the "simple diffusion"
  resolution shift, 2 log(base_resolution / resolution).

  Near t = 1 the angle a t + b approaches pi/2, where float32 tan loses
  precision, so the upper half is evaluated through the complementary angle:
  -2 log tan(u) = 2 log tan(pi/2 - u), pi/2 - u = atan(exp(logsnr_min / 2))
  + a (1 - t).

  Args:
    t: any shape, float in [0, 1].
    logsnr_min: log-SNR at t = 1.
    logsnr_max: log-SNR at t = 0.
    shift: added to the log-SNR everywhere.

  Returns:
    logsnr: same shape as t, float32.
  """
  t = jnp.asarray(t, jnp.float32)
  b = math.atan(math.exp(-0.5 * logsnr_max))
  b_end = math.atan(math.exp(0.5 * logsnr_min))  # pi/2 - angle at t = 1.
  a = math.pi / 2 - b_end - b
  lower = -2.0 * jnp.log(jnp.tan(b + a * t))
  upper = 2.0 * jnp.log(jnp.tan(b_end + a * (1.0 - t)))
  logsnr = jnp.where(b + a * t < math.pi / 4, lower, upper)
  return logsnr + shift


def logsnr_linear(
  t,
  beta_min: float = 0.1,
  beta_max: float = 20.0,
  logsnr_min: float = -20.0,
  logsnr_max: float = 20.0,
) -> jax.Array:
  """Continuous VP "linear beta" log-SNR schedule (Song et al. 2021).

  logsnr(t) = -log(expm1(beta_min t + (beta_max - beta_min) t^2 / 2)), clamped
  to [logsnr_min, logsnr_max] so that t = 0 (logsnr = +inf) stays finite.
  Imagen uses it for the noise-conditioning augmentation level.

  Args:
    t: any shape, float in [0, 1].
    beta_min: beta(0).
    beta_max: beta(1).
    logsnr_min: lower clamp.
    logsnr_max: upper clamp (the value at t = 0).

  Returns:
    logsnr: same shape as t, float32, finite.
  """
  t = jnp.asarray(t, jnp.float32)
  integral = beta_min * t + 0.5 * (beta_max - beta_min) * jnp.square(t)
  # expm1(0) = 0 would give +inf (and NaN gradients); the floor keeps both finite.
  logsnr = -jnp.log(jnp.maximum(jnp.expm1(integral), 1e-30))
  return jnp.clip(logsnr, logsnr_min, logsnr_max)


LOGSNR_SCHEDULES = ("cosine", "linear")


def get_logsnr_fn(name: str, **kwargs) -> LogSnrFn:
  """Returns the log-SNR schedule `t -> logsnr` called `name`.

  Args:
    name: 'cosine' or 'linear'.
    **kwargs: schedule parameters bound with functools.partial (for example
      shift=..., logsnr_min=...).

  Returns:
    A function of t (any shape, in [0, 1]) returning float32 logsnr. Keep the
    returned object when passing it to a jitted sampler: a new partial is a
    new static argument and recompiles.

  Raises:
    ValueError: for an unknown name.
  """
  fns = {"cosine": logsnr_cosine, "linear": logsnr_linear}
  if name not in fns:
    raise ValueError(f"Unknown log-SNR schedule {name!r}; known: {sorted(fns)}.")
  if not kwargs:
    return fns[name]
  return functools.partial(fns[name], **kwargs)


def alpha_sigma(logsnr) -> tuple[jax.Array, jax.Array]:
  """Variance-preserving alpha and sigma from the log-SNR.

  Args:
    logsnr: any shape, float.

  Returns:
    (alpha, sigma): same shape as logsnr, float32, with
    alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr).
  """
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


# ---------------------------------------------------------------------------
# Discrete DDPM (DeepFloyd IF).


def betas_squaredcos_cap_v2(num_train_steps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
  """Betas of the squared-cosine schedule (Nichol & Dhariwal 2021).

  alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2);
  beta_i = min(1 - alpha_bar((i + 1) / N) / alpha_bar(i / N), max_beta).

  Args:
    num_train_steps: N, the number of discrete training timesteps.
    max_beta: upper cap on every beta.

  Returns:
    betas: [N] float64.
  """
  i = np.arange(num_train_steps, dtype=np.float64)

  def alpha_bar(s):
    return np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2

  ratio = alpha_bar((i + 1) / num_train_steps) / alpha_bar(i / num_train_steps)
  return np.minimum(1.0 - ratio, max_beta)


def betas_linear(
  num_train_steps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02
) -> np.ndarray:
  """diffusers' 'linear' betas: linspace(beta_start, beta_end, N), [N] float64."""
  return np.linspace(beta_start, beta_end, num_train_steps, dtype=np.float64)


def betas_scaled_linear(
  num_train_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> np.ndarray:
  """diffusers' 'scaled_linear' betas (Stable Diffusion), [N] float64.

  beta_i = linspace(sqrt(beta_start), sqrt(beta_end), N)_i ^ 2 (diffusers
  computes the linspace in float32; alphas_cumprod casts to float32 too).
  """
  root = np.linspace(beta_start**0.5, beta_end**0.5, num_train_steps, dtype=np.float32)
  return np.square(root).astype(np.float64)


BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")


def get_betas(name: str, num_train_steps: int = 1000, **kwargs) -> np.ndarray:
  """The betas of diffusers' `beta_schedule` called `name` (BETA_SCHEDULES).

  Args:
    name: 'squaredcos_cap_v2', 'linear' or 'scaled_linear'.
    num_train_steps: N.
    **kwargs: the schedule's own parameters (beta_start, beta_end, max_beta).

  Returns:
    betas: [N] float64.

  Raises:
    ValueError: for an unknown name.
  """
  fns = {
    "squaredcos_cap_v2": betas_squaredcos_cap_v2,
    "linear": betas_linear,
    "scaled_linear": betas_scaled_linear,
  }
  if name not in fns:
    raise ValueError(f"Unknown beta schedule {name!r}; known: {list(BETA_SCHEDULES)}.")
  return fns[name](num_train_steps, **kwargs)


def alphas_cumprod(betas, dtype=np.float32) -> np.ndarray:
  """Cumulative product of (1 - beta), i.e. alpha_bar at each timestep.

  diffusers stores betas in float32 and multiplies in float32; the default
  dtype reproduces that.

  Args:
    betas: [N] float.
    dtype: the dtype the product is computed and returned in.

  Returns:
    alphas_cumprod: [N] of `dtype`.
  """
  betas = np.asarray(betas).astype(dtype)
  return np.cumprod(np.asarray(1.0, dtype) - betas, dtype=dtype)


SPACINGS = ("leading", "trailing", "linspace")


def if_timesteps(
  num_inference_steps: int,
  num_train_steps: int = 1000,
  spacing: str = "leading",
  steps_offset: int = 0,
) -> tuple[int, ...]:
  """Inference timesteps as diffusers `DDPMScheduler.set_timesteps` makes them.

  Args:
    num_inference_steps: n, the number of denoising steps (1..N).
    num_train_steps: N.
    spacing: 'leading' (timesteps arange(n) * (N // n), reversed; DeepFloyd
      IF's setting), 'trailing' (round(arange(N, 0, -N / n)) - 1) or
      'linspace' (round(linspace(0, N - 1, n)), reversed).
    steps_offset: added to 'leading' timesteps (diffusers `steps_offset`).

  Returns:
    A tuple of n Python ints, highest first.

  Raises:
    ValueError: for an unknown spacing or n outside [1, N].
  """
  n = num_inference_steps
  if not 1 <= n <= num_train_steps:
    raise ValueError(f"num_inference_steps must be in [1, {num_train_steps}], got {n}.")
  if spacing == "leading":
    steps = (np.arange(n) * (num_train_steps // n)).round()[::-1]
    steps = steps + steps_offset
  elif spacing == "trailing":
    steps = np.round(np.arange(num_train_steps, 0, -num_train_steps / n)) - 1
  elif spacing == "linspace":
    steps = np.linspace(0, num_train_steps - 1, n).round()[::-1]
  else:
    raise ValueError(f"Unknown timestep spacing {spacing!r}; known: {list(SPACINGS)}.")
  return tuple(int(s) for s in steps.astype(np.int64))


def previous_timesteps(timesteps) -> tuple[int, ...]:
  """The timestep each step lands on: the next entry, -1 after the last.

  Args:
    timesteps: sequence of ints, highest first.

  Returns:
    A tuple of the same length: prev[i] = timesteps[i + 1], prev[-1] = -1.
  """
  timesteps = tuple(int(s) for s in timesteps)
  return timesteps[1:] + (-1,)
