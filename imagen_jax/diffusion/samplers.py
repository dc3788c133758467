"""The old per-sampler call style, forwarded to the one entry point.

New code builds a `sampling.SamplerSpec` and `sampling.make_options` and
calls `sampling.sample`. These names stay for callers written against the
earlier modules: `get_sampler(name)` (continuous schedules) and
`get_discrete_sampler(name)` (DeepFloyd IF's squaredcos_cap_v2 table) return
functions

    fn(model_fn, shape, rng, args, *, num_steps= | timesteps=, prediction,
       schedule (continuous), num_train_steps / variance (discrete),
       guidance_scale=None (no guidance), threshold, quantile, max_value,
       eta, sigma_min, sigma_max, rho, x_init, strength, known, mask) -> x0

whose defaults are the old ones (continuous: static thresholding, quantile
0.995; discrete: IF's dynamic thresholding, 0.95, max_value 1.5,
learned_range variance). Every call is `sampling.sample`: nothing here
compiles on its own.
"""

import functools
from typing import Callable

import jax

from imagen_jax.diffusion import loop
from imagen_jax.diffusion import rules_ancestral
from imagen_jax.diffusion import sampling
from imagen_jax.diffusion import schedules

__all__ = [
  "DISCRETE_SAMPLERS",
  "SAMPLERS",
  "VARIANCE_KINDS",
  "ancestral_step",
  "ddim_step",
  "get_discrete_sampler",
  "get_sampler",
  "if_ddpm_step",
  "predict_x0_eps",
]

SAMPLERS = sampling.SAMPLERS
DISCRETE_SAMPLERS = sampling.SAMPLERS
VARIANCE_KINDS = sampling.VARIANCE_KINDS
ancestral_step = rules_ancestral.ancestral_step
ddim_step = rules_ancestral.ddim_step
if_ddpm_step = rules_ancestral.if_ddpm_step
predict_x0_eps = loop.predict_x0_eps

_DEFAULTS = {
  "continuous": dict(threshold="static", quantile=0.995, max_value=None),
  "discrete": dict(threshold="dynamic", quantile=0.95, max_value=1.5),
}


def _forward(sampler, kind, model_fn, shape, rng, args, **kwargs):
  """Maps the old keyword arguments onto a spec and options; runs them."""
  kw = {**_DEFAULTS[kind], **kwargs}
  images = {k: kw.pop(k) for k in ("x_init", "known", "mask") if kw.get(k) is not None}
  for k in ("x_init", "known", "mask"):
    kw.pop(k, None)
  guidance_scale = kw.pop("guidance_scale", None)
  spec = dict(
    prediction=kw.pop("prediction", "eps"),
    threshold=kw.pop("threshold"),
    edit=sampling.edit_kind(images),
    guided=guidance_scale is not None,
  )
  if kind == "discrete":
    n_train = kw.pop("num_train_steps", 1000)
    variance = kw.pop("variance", "learned_range")
    spec.update(schedule="discrete", variance=variance if sampler == "ddpm" else "fixed_small")
    kw["alphas_cumprod"] = schedules.alphas_cumprod(schedules.betas_squaredcos_cap_v2(n_train))
  else:
    spec["logsnr_fn"] = kw.pop("schedule", "cosine")
  spec = sampling.SamplerSpec(sampler, **spec)
  kw["steps"] = kw.pop("num_steps", None)
  options = sampling.make_options(spec, guidance_scale=guidance_scale, **kw)
  return sampling.sample(spec, model_fn, shape, rng, args, options, images)


def _lookup(name: str, kind: str) -> Callable[..., jax.Array]:
  if name not in sampling.SAMPLERS:
    raise ValueError(f"Unknown {kind} sampler {name!r}; valid: {list(sampling.SAMPLERS)}.")
  return functools.partial(_forward, name, kind)


def get_sampler(name: str) -> Callable[..., jax.Array]:
  """The continuous-schedule sampler `name` (see the module docstring).

  Raises:
    ValueError: for an unknown name.
  """
  return _lookup(name, "continuous")


def get_discrete_sampler(name: str) -> Callable[..., jax.Array]:
  """The DeepFloyd IF (discrete schedule) sampler `name`.

  Raises:
    ValueError: for an unknown name.
  """
  return _lookup(name, "discrete")
