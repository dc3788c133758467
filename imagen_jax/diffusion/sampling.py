"""One sampler interface: a static spec, a traced options pytree, one jitted loop.

(Over 400 lines: the one sampler interface, its static spec, traced options and
jitted loop, is kept in one file so that no caller needs to know more than this
module; the update rules live in ``rules_ancestral`` and ``rules_ode``.)

    spec = sampling.SamplerSpec("dpmpp_2m", prediction="v", threshold="dynamic",
                                logsnr_fn=stage_logsnr_fn, guided=True)
    options = sampling.make_options(spec, steps=25, guidance_scale=5.0,
                                    quantile=0.995)
    x0 = sampling.sample(spec, model_fn, (B, H, W, C), rng, args, options)

`SamplerSpec` (frozen, hashable) holds what changes the compiled program:
the sampler, the prediction kind, the threshold mode, the schedule kind
(a continuous log-SNR function, or a discrete alphas_cumprod table), the edit
kind ('none', 'img2img', 'inpaint'), the variance kind of discrete ancestral
steps and whether classifier-free guidance is on. `SamplerOptions` (a
NamedTuple of arrays) holds everything else, traced: the step count, the
discrete timesteps (padded to the table length N, with their true count),
the alphas_cumprod table itself, guidance scale, quantile, max_value, eta,
strength and EDM's sigma range. `sample` runs `loop.run` (start, image-to-
image, inpainting, keys) with the spec's update rule inside ONE jit whose
static arguments are (spec, model_fn, shape) alone: no sampler recompiles
across step counts, timestep lists, guidance scales, thresholds, eta,
strength or beta schedules of one length.

Samplers (update rules in `rules_ancestral` and `rules_ode`) and grids:

  'ddpm'      ancestral; continuous: VDM's step on t_i = 1 - i / n;
              discrete: diffusers' DDPMScheduler.step over the timesteps
              (variance 'learned_range' or 'fixed_small').
  'ddim'      DDIM with traced eta, same grids (discrete: ends at sigma = 0).
  'dpmpp_2m'  DPM-Solver++ 2M, same grids.
  'euler',    EDM's sigma grid of n points (the timesteps' values are not
  'heun'      used, only their count).

Model functions: model_fn(x_t [N, H, W, C], t [N], args) -> [N, H, W, C'],
C' >= C, hashable (keep one object: it is a static argument). t is float32
in [0, 1] on continuous schedules and int32 timesteps on discrete ones. With
guidance, N = 2B: the model is called once on [x_t; x_t] and `args` has the
unconditional rows first (`guidance.cfg_batch`).

A latent stage (Stable Diffusion, the x4 upscaler) calls it as the IF
stages do: a discrete spec with its own table and prediction,

    ac = schedules.alphas_cumprod(schedules.betas_scaled_linear(1000))
    spec = SamplerSpec("ddim", prediction="v", threshold="none",
                       schedule="discrete", guided=True)
    options = make_options(spec, timesteps=schedules.if_timesteps(
        50, 1000, "leading", steps_offset=1), alphas_cumprod=ac,
        guidance_scale=7.5)
    latents = sample(spec, unet_fn, (B, h, w, 4), rng, args, options)

and decodes the latents itself; the upscaler passes its noised low-res
latent in `args` like any super-resolution stage.

Inside `compiled_first(callback)` every `sample` call compiles its loop ahead
and calls `callback()` before running it: the processes of a multi-process
run wait there for each other, so none enters the loop's collectives while
another still compiles it.
"""

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import grids
from imagen_jax.diffusion import guidance as guidance_lib
from imagen_jax.diffusion import if_schedules
from imagen_jax.diffusion import loop
from imagen_jax.diffusion import losses
from imagen_jax.diffusion import rules_ancestral
from imagen_jax.diffusion import rules_ode
from imagen_jax.diffusion import schedules

__all__ = [
  "EDIT_KINDS",
  "SAMPLERS",
  "SCHEDULE_KINDS",
  "VARIANCE_KINDS",
  "SamplerOptions",
  "SamplerSpec",
  "edit_kind",
  "make_options",
  "sample",
]

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "euler", "heun")
SCHEDULE_KINDS = ("continuous", "discrete")
EDIT_KINDS = ("none", "img2img", "inpaint")
VARIANCE_KINDS = rules_ancestral.VARIANCE_KINDS
# name -> (update rule, initial carry from the shape, grid: 'native' or 'karras').
_RULES = {
  "ddpm": (rules_ancestral.ddpm_rule, lambda shape: (), "native"),
  "ddim": (rules_ancestral.ddim_rule, lambda shape: (), "native"),
  "dpmpp_2m": (rules_ode.dpmpp_2m_rule, lambda shape: jnp.zeros(shape, jnp.float32), "native"),
  "euler": (rules_ode.euler_rule, lambda shape: (), "karras"),
  "heun": (rules_ode.heun_rule, lambda shape: (), "karras"),
}


def _check(value, valid, what):
  if value not in valid:
    raise ValueError(f"Unknown {what} {value!r}; valid: {list(valid)}.")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """What changes the compiled sampling program (static, hashable).

  sampler: one of SAMPLERS.
  prediction: 'eps', 'x0' or 'v' (what model_fn predicts).
  threshold: 'none', 'static' or 'dynamic' (applied to every x0_hat).
  schedule: 'continuous' (logsnr_fn) or 'discrete' (options.alphas_cumprod).
  logsnr_fn: continuous only: t -> logsnr, or 'cosine' / 'linear' (default
    'cosine'); keep the object, it is part of the hash.
  edit: 'none', 'img2img' (x_init) or 'inpaint' (known + mask, optionally
    x_init too); see `edit_kind`.
  variance: discrete 'ddpm' only: 'learned_range' (the model's extra
    channels) or 'fixed_small'; continuous ancestral steps are fixed_small.
  guided: classifier-free guidance (2B-row model calls).

  Raises:
    ValueError: for an unknown value or a combination that cannot run.
  """

  sampler: str
  prediction: str = "eps"
  threshold: str = "static"
  schedule: str = "continuous"
  logsnr_fn: Union[None, str, Callable[[jax.Array], jax.Array]] = None
  edit: str = "none"
  variance: str = "fixed_small"
  guided: bool = False

  def __post_init__(self):
    _check(self.sampler, SAMPLERS, "sampler")
    losses.check_prediction_kind(self.prediction)
    guidance_lib.check_threshold_mode(self.threshold)
    _check(self.schedule, SCHEDULE_KINDS, "schedule kind")
    _check(self.edit, EDIT_KINDS, "edit kind")
    _check(self.variance, VARIANCE_KINDS, "variance kind")
    if self.schedule == "discrete":
      if self.logsnr_fn is not None:
        raise ValueError("a discrete spec takes its schedule from options.alphas_cumprod.")
      return
    if self.variance != "fixed_small":
      raise ValueError(f"variance={self.variance!r} needs a discrete schedule.")
    fn = self.logsnr_fn if self.logsnr_fn is not None else "cosine"
    if not callable(fn):
      fn = schedules.get_logsnr_fn(fn)
    object.__setattr__(self, "logsnr_fn", fn)


class SamplerOptions(NamedTuple):
  """The traced numbers of a sampler call (`make_options` builds them).

  num_steps: [] int32, n.
  timesteps: [L] int32, discrete grid highest first, padded to L = N (the
    table length); [1] zeros on continuous schedules.
  alphas_cumprod: [N] float32 (discrete); [1] on continuous schedules.
  logsnr_table: [N] float32, log(abar / (1 - abar)) of the table.
  guidance_scale, quantile, max_value (+inf: no cap), eta, strength,
  sigma_min, sigma_max, rho: [] float32.
  final_logsnr: [] float32, where a discrete grid's last step lands (+inf:
    x0; see `make_options`' final_alpha_cumprod).
  """

  num_steps: jax.Array
  timesteps: jax.Array
  alphas_cumprod: jax.Array
  logsnr_table: jax.Array
  guidance_scale: jax.Array
  quantile: jax.Array
  max_value: jax.Array
  eta: jax.Array
  strength: jax.Array
  sigma_min: jax.Array
  sigma_max: jax.Array
  rho: jax.Array
  final_logsnr: jax.Array


def _concrete(value):
  """float(value), or None for a value traced under an outer jit."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def _grid_numbers(spec, steps, timesteps, alphas_cumprod):
  """(num_steps, padded timesteps, alphas_cumprod, logsnr_table) arrays."""
  if spec.schedule == "continuous":
    if timesteps is not None or alphas_cumprod is not None:
      raise ValueError("timesteps and alphas_cumprod belong to a discrete schedule.")
    if _concrete(steps) is None or int(steps) != _concrete(steps) or int(steps) < 1:
      raise ValueError(f"steps must be an int >= 1, got {steps!r}.")
    zeros = jnp.zeros((1,), jnp.float32)
    return jnp.int32(int(steps)), jnp.zeros((1,), jnp.int32), zeros, zeros
  if alphas_cumprod is None:
    raise ValueError("a discrete schedule needs alphas_cumprod.")
  table = grids.discrete_logsnr_table(alphas_cumprod)
  n_train = len(table)
  if timesteps is None:
    if not isinstance(steps, int) or not 1 <= steps <= n_train:
      raise ValueError(f"steps must be an int in [1, {n_train}], got {steps!r}.")
    timesteps = schedules.if_timesteps(steps, n_train, "trailing")
  if isinstance(timesteps, str):
    timesteps = if_schedules.named_if_timesteps(timesteps)
  timesteps = [int(s) for s in timesteps]
  if not timesteps or len(timesteps) > n_train:
    raise ValueError(f"timesteps must hold 1 to {n_train} steps, got {len(timesteps)}.")
  if not all(0 <= s < n_train for s in timesteps):
    raise ValueError(f"timesteps must lie in [0, {n_train}), got {timesteps}.")
  if steps is not None and steps != len(timesteps):
    raise ValueError(f"steps={steps} but {len(timesteps)} timesteps were given.")
  padded = jnp.asarray(timesteps + [0] * (n_train - len(timesteps)), jnp.int32)
  ac = jnp.asarray(alphas_cumprod, jnp.float32)
  return jnp.int32(len(timesteps)), padded, ac, jnp.asarray(table)


def make_options(
  spec: SamplerSpec,
  *,
  steps=None,
  timesteps=None,
  alphas_cumprod=None,
  guidance_scale=1.0,
  quantile=0.995,
  max_value=None,
  eta=0.0,
  strength=1.0,
  sigma_min=0.002,
  sigma_max=80.0,
  rho=7.0,
  final_alpha_cumprod=None,
) -> SamplerOptions:
  """Checks a call's numbers against its spec and packs them as arrays.

  Args:
    spec: the SamplerSpec.
    steps: continuous: n >= 1 (required). Discrete: optional; without
      timesteps, n "trailing"-spaced timesteps are made.
    timesteps: discrete only: ints in [0, N), highest first, or a name of
      IF_SCHEDULES ('smart50', ...).
    alphas_cumprod: discrete only (required): [N] float (concrete), e.g.
      schedules.alphas_cumprod(schedules.betas_squaredcos_cap_v2(1000)).
    guidance_scale: w (None: 1; unused unless spec.guided).
    quantile: dynamic thresholding quantile.
    max_value: None (no cap) or the dynamic threshold's cap.
    eta: DDIM's stochasticity (>= 0).
    strength: image-to-image strength in [0, 1] (with x_init).
    sigma_min, sigma_max, rho: EDM's grid (Euler, Heun).
    final_alpha_cumprod: discrete grids: None (the last step lands on x0) or
      the alpha_bar it lands on (diffusers DDIM with set_alpha_to_one=False:
      alphas_cumprod[0]).

  Returns:
    SamplerOptions.

  Raises:
    ValueError: for a step count, timestep list or strength that cannot run.
  """
  num_steps, padded, ac, table = _grid_numbers(spec, steps, timesteps, alphas_cumprod)
  value = _concrete(strength)
  if value is not None and not 0.0 <= value <= 1.0:
    raise ValueError(f"strength must lie in [0, 1], got {value}.")
  return SamplerOptions(
    num_steps=num_steps,
    timesteps=padded,
    alphas_cumprod=ac,
    logsnr_table=table,
    guidance_scale=loop.scalar(guidance_scale, 1.0),
    quantile=loop.scalar(quantile, 0.995),
    max_value=loop.scalar(max_value, jnp.inf),
    eta=loop.scalar(eta, 0.0),
    strength=loop.scalar(strength, 1.0),
    sigma_min=loop.scalar(sigma_min, 0.002),
    sigma_max=loop.scalar(sigma_max, 80.0),
    rho=loop.scalar(rho, 7.0),
    final_logsnr=_final_logsnr(final_alpha_cumprod),
  )


def _final_logsnr(final_alpha_cumprod) -> jax.Array:
  """log(a / (1 - a)) of the final alpha_bar a (float64), +inf for None."""
  if final_alpha_cumprod is None:
    return jnp.float32(jnp.inf)
  return jnp.asarray(grids.discrete_logsnr_table([float(final_alpha_cumprod)])[0])


def edit_kind(images: Optional[dict]) -> str:
  """'inpaint' with known (and mask), 'img2img' with x_init alone, else 'none'."""
  images = images or {}
  if images.get("known") is not None:
    return "inpaint"
  return "img2img" if images.get("x_init") is not None else "none"


def _point(spec, opts):
  """The grid of spec's sampler: point(i) -> (t_model, logsnr)."""
  discrete = spec.schedule == "discrete"
  if _RULES[spec.sampler][2] == "karras":
    table = dict(logsnr_table=opts.logsnr_table) if discrete else dict(logsnr_fn=spec.logsnr_fn)
    return grids.karras_point(opts.num_steps, opts.sigma_min, opts.sigma_max, opts.rho, **table)
  if discrete:
    return grids.timestep_point(
      opts.timesteps, opts.logsnr_table, opts.num_steps, opts.final_logsnr
    )
  return grids.uniform_point(spec.logsnr_fn, opts.num_steps)


_BEFORE_RUN: contextvars.ContextVar[Optional[Callable[[], None]]] = contextvars.ContextVar(
  "sampling_before_run", default=None
)


@contextlib.contextmanager
def compiled_first(callback: Callable[[], None]):
  """Within it, `sample` compiles each loop, calls ``callback()``, then runs it."""
  token = _BEFORE_RUN.set(callback)
  try:
    yield
  finally:
    _BEFORE_RUN.reset(token)


@functools.partial(jax.jit, static_argnames=("spec", "model_fn", "shape"))
def _sample_jit(rng, args, options, edit, *, spec, model_fn, shape):
  """The one jitted loop: spec's rule on spec's grid through `loop.run`."""
  rule, init_carry, _ = _RULES[spec.sampler]
  batch = shape[0]

  def output(x, t_model):
    t = jnp.full((batch,), t_model)
    return guidance_lib.guided_output(model_fn, x, t, args, options.guidance_scale, spec.guided)

  def predict(x, t_model, logsnr):
    return loop.predict_x0_eps(
      model_fn,
      x,
      jnp.full((batch,), t_model),
      jnp.full((batch,), logsnr),
      args,
      prediction=spec.prediction,
      guidance_scale=options.guidance_scale,
      use_guidance=spec.guided,
      threshold=spec.threshold,
      quantile=options.quantile,
      max_value=options.max_value,
    )

  point = _point(spec, options)
  start = loop.first_index(options.num_steps, edit)
  ctx = loop.Context(spec, options, point, output, predict, options.num_steps, start)
  step = functools.partial(rule, ctx)
  return loop.run(
    step, init_carry(shape), rng, shape, options.num_steps, edit, lambda i: point(i)[1]
  )


def sample(
  spec: SamplerSpec,
  model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
  shape,
  rng: jax.Array,
  args: Any,
  options: SamplerOptions,
  images: Optional[dict] = None,
) -> jax.Array:
  """Runs spec's sampler as one jitted loop (see the module docstring).

  Args:
    spec: SamplerSpec (static).
    model_fn: (x_t [N, ...], t [N], args) -> pred [N, ..., C'] (static).
    shape: (B, H, W, C) of the samples (static).
    rng: PRNG key (see `loop` for how it is split).
    args: pytree of arrays passed to model_fn (traced).
    options: from make_options (traced).
    images: the edit inputs spec.edit names: {} / None for 'none';
      {x_init [B, H, W, C]} for 'img2img'; {known [B, H, W, C], mask
      [B, H, W, 1] (1 = regenerate)[, x_init]} for 'inpaint'. Images are
      float in [-1, 1]; strength lives in options. Any kind may add
      noise [B, H, W, C]: the starting noise instead of a draw from rng.

  Returns:
    x0: [B, H, W, C] float32.

  Raises:
    ValueError: images that do not match spec.edit or shape.
  """
  images = dict(images or {})
  unknown = set(images) - {"x_init", "known", "mask", "noise"}
  if unknown:
    raise ValueError(f"unknown edit inputs {sorted(unknown)}; valid: x_init, known, mask, noise.")
  if edit_kind(images) != spec.edit:
    raise ValueError(f"spec.edit={spec.edit!r} but the images make {edit_kind(images)!r}.")
  shape = tuple(int(d) for d in shape)
  edit = loop.make_edit(
    shape,
    images.get("x_init"),
    options.strength,
    images.get("known"),
    images.get("mask"),
    images.get("noise"),
  )
  before_run = _BEFORE_RUN.get()
  if before_run is not None:
    _sample_jit.lower(rng, args, options, edit, spec=spec, model_fn=model_fn, shape=shape).compile()
    before_run()
  return _sample_jit(rng, args, options, edit, spec=spec, model_fn=model_fn, shape=shape)
