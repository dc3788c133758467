"""What every sampler loop shares: the guided x0 prediction and the driver.

The driver (`run`) owns the parts of a sampling loop that do not depend on
the update rule: the starting latent, image-to-image, inpainting and the
random keys. A sampler supplies its update as `step_fn(i, x, extra, rng_i)`
and a grid `logsnr_at(i)` (i = 0 is the noisiest point, i = num_steps the
end, where logsnr may be +inf); the driver runs `lax.fori_loop(start,
num_steps, ...)` inside the caller's jit.

Image-to-image (x_init, strength s in [0, 1]): the loop runs only the last
m = ceil(s n) of the n steps (a 1e-6 relative slack absorbs float error, so
s = k / n runs k steps), starting at grid point k = n - m from x_init noised
to that level, x = alpha_k x_init + sigma_k eps. Two ends are exact: s = 1
(k = 0) starts from the same pure noise eps as text-to-image, so the result
is bit-identical to it with the same rng; s = 0 (k = n) runs no step and
returns x_init unchanged. s is traced: changing it never recompiles.
Without x_init (text-to-image) the loop starts from eps at k = 0.

Inpainting (known [B, H, W, C], mask [B, H, W, 1], 1 = regenerate): at the
start and after every step, landing on grid point j, the known region (mask
0) is replaced by known noised to logsnr_at(j) with fresh noise per step
(x = mask x + (1 - mask) (alpha_j known + sigma_j eps_j)); the output then
takes the known pixels exactly (x = mask x + (1 - mask) known). A mask of
ones leaves every step untouched (text-to-image or plain image-to-image).

Random keys: rng -> (rng_init, rng_steps) = split(rng), as the samplers
have always done; eps = normal(rng_init) is the starting noise (or the
caller's own ``Edit.noise``: a pipeline's fixed starting latents), step i's own
noise key is fold_in(rng_steps, i), and the inpainting noise of grid point j
is normal(fold_in(fold_in(rng_init, 1), j)), a stream no step uses.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import guidance as guidance_lib
from imagen_jax.diffusion import losses

__all__ = [
  "Context",
  "Edit",
  "first_index",
  "make_edit",
  "predict_x0_eps",
  "run",
  "scalar",
  "start_index",
]


def scalar(value, default) -> jax.Array:
  """A float32 scalar array (one abstract signature for every traced number)."""
  return jnp.asarray(default if value is None else value, jnp.float32)


def predict_x0_eps(
  model_fn,
  x_t,
  t,
  logsnr,
  args,
  *,
  prediction: str,
  guidance_scale=1.0,
  use_guidance: bool = False,
  threshold: str = "none",
  quantile=0.995,
  max_value=None,
):
  """One (guided) model call turned into thresholded x0_hat and its eps_hat.

  Args:
    model_fn: (x_t [N, ...], t [N], args) -> pred [N, ..., C'], C' >= C;
      only the first C output channels are used (DeepFloyd IF's learned
      variance channels are dropped).
    x_t: [B, H, W, C] float.
    t: [B] float (continuous time) or int (discrete timestep) for the model.
    logsnr: [B] float, the log-SNR of x_t.
    args: pytree passed to model_fn.
    prediction: 'eps', 'x0' or 'v' (what model_fn predicts).
    guidance_scale: scalar, used when use_guidance.
    use_guidance: static; whether to run classifier-free guidance.
    threshold: 'none', 'static' or 'dynamic'.
    quantile: dynamic thresholding quantile (may be traced).
    max_value: None or the cap on the dynamic threshold (may be traced).

  Returns:
    (x0_hat, eps_hat): both [B, H, W, C] float32; eps_hat is recomputed from
    the thresholded x0_hat so the two stay consistent with x_t.
  """
  out = guidance_lib.guided_output(model_fn, x_t, t, args, guidance_scale, use_guidance)
  pred = out[..., : x_t.shape[-1]]
  x0_hat = losses.x0_from_pred(prediction, x_t, pred, logsnr)
  x0_hat = guidance_lib.apply_threshold(x0_hat, threshold, quantile, max_value)
  eps_hat = losses.eps_from_pred("x0", x_t, x0_hat, logsnr)
  return x0_hat, eps_hat


class Edit(NamedTuple):
  """Image-to-image and inpainting inputs of a loop (all traced arrays).

  x_init: None (text-to-image) or [B, H, W, C] float32.
  strength: [] float32 in [0, 1] (unused without x_init).
  known: None or [B, H, W, C] float32, the image whose mask-0 pixels stay.
  mask: None or [B, H, W, 1] float32, 1 = regenerate (None iff known is None).
  noise: None or [B, H, W, C] float32, the starting noise eps to use instead of
    normal(rng_init).
  """

  x_init: Optional[jax.Array]
  strength: jax.Array
  known: Optional[jax.Array]
  mask: Optional[jax.Array]
  noise: Optional[jax.Array] = None


class Context(NamedTuple):
  """What an update rule sees at every step (built inside the jitted loop).

  spec: the static sampler spec (`sampling.SamplerSpec`).
  options: the traced options (`sampling.SamplerOptions`: eta, thresholds,
    alphas_cumprod, ...).
  point: i [] int32 -> (t_model [], logsnr [] float32) of grid point i,
    0 <= i <= n (logsnr may be +inf at n); t_model is what the model gets
    (continuous t or an integer timestep).
  output: (x [B, ...], t_model []) -> the (guided) model output
    [B, ..., C'] float32, all channels.
  predict: (x [B, ...], t_model [], logsnr []) -> (x0_hat, eps_hat), both
    [B, ...] float32, guided and thresholded (`predict_x0_eps`).
  num_steps: n, [] int32.
  start: [] int32, the first grid point the loop runs (`first_index`).
  """

  spec: Any
  options: Any
  point: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
  output: Callable[[jax.Array, jax.Array], jax.Array]
  predict: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
  num_steps: jax.Array
  start: jax.Array


def make_edit(shape, x_init=None, strength=1.0, known=None, mask=None, noise=None) -> Edit:
  """Checks and packs a sampler's image-to-image / inpainting arguments.

  Args:
    shape: (B, H, W, C) of the samples.
    x_init: None (text-to-image) or [B, H, W, C] float in [-1, 1].
    strength: scalar in [0, 1] (may be traced); ignored without x_init.
    known: None or [B, H, W, C] float, the image to inpaint.
    mask: [B, H, W, 1] (or [B, H, W, C]) float or bool, 1 = regenerate;
      required with known.
    noise: None or [B, H, W, C] float, the starting noise (default: drawn).

  Returns:
    An Edit of float32 arrays.

  Raises:
    ValueError: for shapes that do not match, known without mask (or the
      reverse), or a concrete strength outside [0, 1].
  """
  shape = tuple(shape)
  if x_init is None:
    strength = 1.0
  elif tuple(x_init.shape) != shape:
    raise ValueError(f"x_init has shape {tuple(x_init.shape)}, want {shape}.")
  try:
    value = float(strength)
  except (TypeError, jax.errors.ConcretizationTypeError):
    value = 0.5  # Traced under an outer jit: the caller checks its range.
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"strength must lie in [0, 1], got {value}.")
  if (known is None) != (mask is None):
    raise ValueError("known and mask go together: give both or neither.")
  if known is not None:
    if tuple(known.shape) != shape:
      raise ValueError(f"known has shape {tuple(known.shape)}, want {shape}.")
    if tuple(mask.shape[:3]) != shape[:3] or mask.shape[3] not in (1, shape[3]):
      raise ValueError(f"mask has shape {tuple(mask.shape)}, want {shape[:3] + (1,)}.")
    known = jnp.asarray(known, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
  if x_init is not None:
    x_init = jnp.asarray(x_init, jnp.float32)
  if noise is not None:
    if tuple(noise.shape) != shape:
      raise ValueError(f"noise has shape {tuple(noise.shape)}, want {shape}.")
    noise = jnp.asarray(noise, jnp.float32)
  return Edit(x_init, scalar(strength, 1.0), known, mask, noise)


def start_index(num_steps, strength) -> jax.Array:
  """First grid point run: n - ceil(s n), as int32 (traced-friendly).

  Args:
    num_steps: n, int or [] int32.
    strength: s, [] float in [0, 1].

  Returns:
    [] int32 in [0, n].
  """
  n = jnp.asarray(num_steps, jnp.int32)
  run_steps = jnp.ceil(strength * n.astype(jnp.float32) * (1.0 - 1e-6))
  return n - jnp.clip(run_steps.astype(jnp.int32), 0, n)


def first_index(num_steps, edit: Edit) -> jax.Array:
  """The first grid point a loop runs: start_index with x_init, else 0."""
  if edit.x_init is None:
    return jnp.int32(0)
  return start_index(num_steps, edit.strength)


def _paste_known(x, edit: Edit, logsnr, key):
  """x with its mask-0 pixels replaced by `known` noised to logsnr."""
  noise = jax.random.normal(key, x.shape, jnp.float32)
  noised = losses.q_sample(edit.known, noise, jnp.full((x.shape[0],), logsnr, jnp.float32))
  return edit.mask * x + (1.0 - edit.mask) * noised


StepFn = Callable[[jax.Array, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


def run(
  step_fn: StepFn,
  extra_init: Any,
  rng,
  shape,
  num_steps,
  edit: Edit,
  logsnr_at: Callable[[jax.Array], jax.Array],
) -> jax.Array:
  """Runs a sampler's steps from its (possibly edited) start; call under jit.

  Args:
    step_fn: (i [] int32, x [B, ...], extra, rng_i) -> (x_next, extra), the
      update from grid point i to i + 1.
    extra_init: the initial `extra` carry (any pytree; e.g. a multistep
      solver's previous x0_hat).
    rng: PRNG key of the whole sample (see the module docstring).
    shape: (B, H, W, C), static.
    num_steps: n, Python int or [] int32 (traced: one compile for all n).
    edit: from make_edit.
    logsnr_at: i -> [] float32 log-SNR of grid point i (+inf allowed at n).

  Returns:
    x0: [B, H, W, C] float32.
  """
  rng_init, rng_steps = jax.random.split(rng)
  rng_known = jax.random.fold_in(rng_init, 1)
  noise = jax.random.normal(rng_init, shape, jnp.float32) if edit.noise is None else edit.noise
  n = jnp.asarray(num_steps, jnp.int32)
  start = first_index(n, edit)
  x = noise
  if edit.x_init is not None:
    logsnr_start = jnp.full((shape[0],), logsnr_at(start), jnp.float32)
    x = jnp.where(start == 0, noise, losses.q_sample(edit.x_init, noise, logsnr_start))
    x = jnp.where(start == n, edit.x_init, x)  # Strength 0: nothing to do.
  inpaint = edit.known is not None
  if inpaint:
    x = _paste_known(x, edit, logsnr_at(start), jax.random.fold_in(rng_known, start))

  def body(i, carry):
    x, extra = carry
    x, extra = step_fn(i, x, extra, jax.random.fold_in(rng_steps, i))
    if inpaint:
      x = _paste_known(x, edit, logsnr_at(i + 1), jax.random.fold_in(rng_known, i + 1))
    return x, extra

  x, _ = jax.lax.fori_loop(start, n, body, (x, extra_init))
  if inpaint:
    x = edit.mask * x + (1.0 - edit.mask) * edit.known
  return x
