"""Classifier-free guidance and x0 thresholding (static and dynamic).

Thresholding acts on the predicted clean image `x0_hat: [B, H, W, C]` before
a sampler uses it. Dynamic thresholding (Imagen, Saharia et al. 2022) takes
s = quantile(|x0_hat|) per example, s = max(s, 1) (DeepFloyd IF also caps it:
s = min(s, max_value)), and returns clip(x0_hat, -s, s) / s. The numbers
(quantile, max_value) may be traced jnp scalars; only `mode` is static.
"""

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

__all__ = [
  "THRESHOLD_MODES",
  "apply_threshold",
  "cfg_batch",
  "cfg_predict",
  "check_threshold_mode",
  "dynamic_threshold",
  "guided_output",
  "parse_guidance",
  "static_threshold",
]

THRESHOLD_MODES = ("none", "static", "dynamic")
GUIDANCE_OFF = ("none", "off")


def parse_guidance(value: Any) -> Optional[float]:
  """A guidance setting → None (no guidance) or the scale w.

  None, 'none' / 'off' (any case) and a scale of 1 (the conditional model
  alone: one forward pass on B rows) all mean no guidance.

  Raises:
    ValueError: not a number, negative or not finite.
  """
  if value is None or (isinstance(value, str) and value.strip().lower() in GUIDANCE_OFF):
    return None
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"guidance {value!r} is not a number or one of {GUIDANCE_OFF}") from None
  if not math.isfinite(value) or value < 0:
    raise ValueError(f"guidance must be a finite number >= 0, got {value}")
  return None if value == 1.0 else value


def cfg_batch(cond: Any, uncond: Any = None) -> Any:
  """The doubled [uncond; cond] batch that ``cfg_predict``'s model call expects.

  Args:
    cond: a pytree of arrays with a leading batch axis B.
    uncond: the same structure for the unconditional rows (e.g. the empty or
      negative prompt's embeddings), or None to repeat ``cond`` (inputs that
      do not differ between the halves, such as a low-res image).

  Returns:
    The pytree with every leaf [2B, ...]: rows [0, B) unconditional.
  """
  uncond = cond if uncond is None else uncond
  return jax.tree.map(lambda u, c: jnp.concatenate([jnp.asarray(u), jnp.asarray(c)]), uncond, cond)


def check_threshold_mode(mode: str) -> None:
  """Raises ValueError unless `mode` is one of THRESHOLD_MODES."""
  if mode not in THRESHOLD_MODES:
    raise ValueError(f"Unknown threshold mode {mode!r}; valid: {list(THRESHOLD_MODES)}.")


def static_threshold(x0_hat) -> jax.Array:
  """Clips x0_hat to [-1, 1].

  Args:
    x0_hat: [B, ...] float.

  Returns:
    [B, ...] float, clipped.
  """
  return jnp.clip(x0_hat, -1.0, 1.0)


def dynamic_threshold(x0_hat, quantile=0.995, max_value=None) -> jax.Array:
  """Dynamic thresholding: clip to [-s, s] and divide by s, per example.

  s = quantile(|x0_hat[b]|, quantile) over all of example b's entries (linear
  interpolation, as torch.quantile), then s = max(s, 1) and, when max_value is
  given, s = min(s, max_value). With s = 1 this is static clipping.

  Args:
    x0_hat: [B, ...] float.
    quantile: scalar in [0, 1]; may be a traced value.
    max_value: None (no cap) or a scalar (may be traced; +inf means no cap).

  Returns:
    [B, ...] float32, in [-1, 1] when s >= the largest |x0_hat|.
  """
  x0_hat = jnp.asarray(x0_hat, jnp.float32)
  flat = jnp.abs(x0_hat.reshape(x0_hat.shape[0], -1))
  s = jnp.quantile(flat, jnp.asarray(quantile, jnp.float32), axis=1)
  s = jnp.maximum(s, 1.0)
  if max_value is not None:
    s = jnp.minimum(s, jnp.asarray(max_value, jnp.float32))
  s = s.reshape(s.shape + (1,) * (x0_hat.ndim - 1))
  return jnp.clip(x0_hat, -s, s) / s


def apply_threshold(x0_hat, mode: str, quantile=0.995, max_value=None) -> jax.Array:
  """Applies thresholding `mode` ('none', 'static' or 'dynamic') to x0_hat.

  Args:
    x0_hat: [B, ...] float.
    mode: static Python str.
    quantile: dynamic mode only; scalar, may be traced.
    max_value: dynamic mode only; None or scalar, may be traced.

  Returns:
    [B, ...] float32.
  """
  check_threshold_mode(mode)
  x0_hat = jnp.asarray(x0_hat, jnp.float32)
  if mode == "none":
    return x0_hat
  if mode == "static":
    return static_threshold(x0_hat)
  return dynamic_threshold(x0_hat, quantile, max_value)


def cfg_predict(model_fn: Callable[..., jax.Array], x_t, t, args: Any, guidance_scale) -> jax.Array:
  """Classifier-free guidance from one model call on the doubled batch.

  The model sees concat([x_t, x_t]) and concat([t, t]); the caller arranges
  `args` (e.g. text embeddings) so that rows [0, B) are unconditional and rows
  [B, 2B) conditional. The first C = x_t.shape[-1] output channels are guided,
  uncond + w (cond - uncond); any further channels (DeepFloyd IF's
  learned-variance channels) come from the conditional half unchanged.

  Args:
    model_fn: (x [2B, ...], t [2B], args) -> out [2B, ..., C'] with C' >= C.
    x_t: [B, H, W, C] float.
    t: [B] timesteps (float or int).
    args: pytree passed through to model_fn.
    guidance_scale: w, scalar (may be traced); w = 1 is the conditional model.

  Returns:
    [B, H, W, C'] float32.
  """
  out = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), args)
  out = jnp.asarray(out, jnp.float32)
  out_uncond, out_cond = jnp.split(out, 2, axis=0)
  c = x_t.shape[-1]
  guided = out_uncond[..., :c] + guidance_scale * (out_cond[..., :c] - out_uncond[..., :c])
  return jnp.concatenate([guided, out_cond[..., c:]], axis=-1)


def guided_output(
  model_fn: Callable[..., jax.Array], x_t, t, args: Any, guidance_scale, use_guidance: bool
) -> jax.Array:
  """The model output a sampler uses: guided when use_guidance, else plain.

  Args:
    model_fn: (x [N, ...], t [N], args) -> out [N, ..., C'].
    x_t: [B, H, W, C] float.
    t: [B] timesteps (float or int).
    args: pytree passed through (2B rows, unconditional first, with guidance).
    guidance_scale: scalar (may be traced); unused without guidance.
    use_guidance: static Python bool.

  Returns:
    [B, H, W, C'] float32.
  """
  if use_guidance:
    return cfg_predict(model_fn, x_t, t, args, guidance_scale)
  return jnp.asarray(model_fn(x_t, t, args), jnp.float32)
