"""Tests for imagen_jax.diffusion.sampling: the DDPM and DDIM update rules.

The correctness tests use data x0 ~ N(MU, S^2), i.i.d. per pixel, whose exact
denoiser is known in closed form: E[x0 | x_t] = MU + alpha S^2 / (alpha^2 S^2 +
sigma^2) (x_t - alpha MU). Fed that denoiser, a correct sampler's output has
mean MU and std S up to its discretization error, which shrinks with the step
count; the step counts below were chosen so that error is about 2% (the exact
variance recursion of each sampler predicts the same numbers).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import losses
from imagen_jax.diffusion import rules_ancestral
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion import sampling
from imagen_jax.diffusion import schedules

MU, S = 0.3, 0.2
SHAPE = (8, 32, 32, 1)  # 8192 independent pixels: sampling error ~0.8%.
ALPHAS_CUMPROD = schedules.alphas_cumprod(schedules.betas_squaredcos_cap_v2())


def _posterior(x_t, alpha, sigma):
  """(x0_hat, eps_hat) of the exact Gaussian denoiser."""
  alpha = losses.expand_to(alpha, x_t)
  sigma = losses.expand_to(sigma, x_t)
  x0_hat = MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x_t - alpha * MU)
  return x0_hat, (x_t - alpha * x0_hat) / sigma


def run_sampler(
  name,
  model_fn,
  shape,
  rng,
  args,
  *,
  discrete=False,
  prediction="eps",
  threshold="static",
  schedule=None,
  variance="fixed_small",
  guidance_scale=None,
  x_init=None,
  known=None,
  mask=None,
  **numbers,
):
  """One call of the one entry point: spec and options from keyword arguments.

  Discrete calls use IF's squaredcos_cap_v2 table unless numbers give one.
  """
  images = {k: v for k, v in dict(x_init=x_init, known=known, mask=mask).items() if v is not None}
  spec = sampling.SamplerSpec(
    name,
    prediction=prediction,
    threshold=threshold,
    schedule="discrete" if discrete else "continuous",
    logsnr_fn=schedule,
    edit=sampling.edit_kind(images),
    variance=variance,
    guided=guidance_scale is not None,
  )
  if discrete:
    numbers.setdefault("alphas_cumprod", ALPHAS_CUMPROD)
  options = sampling.make_options(spec, guidance_scale=guidance_scale, **numbers)
  return sampling.sample(spec, model_fn, shape, rng, args, options, images)


def _continuous_denoiser(kind):
  def model_fn(x_t, t, args):
    del args
    logsnr = schedules.logsnr_cosine(t)
    alpha, sigma = schedules.alpha_sigma(logsnr)
    x0_hat, eps_hat = _posterior(x_t, alpha, sigma)
    a, s = losses.expand_to(alpha, x_t), losses.expand_to(sigma, x_t)
    return {"eps": eps_hat, "x0": x0_hat, "v": a * eps_hat - s * x0_hat}[kind]

  return model_fn


DENOISERS = {kind: _continuous_denoiser(kind) for kind in ("eps", "x0", "v")}


def if_denoiser(x_t, t, args):
  """Exact eps for the discrete schedule, plus v = -1 (variance = beta_tilde)."""
  del args
  abar = jnp.asarray(ALPHAS_CUMPROD)[t]
  _, eps_hat = _posterior(x_t, jnp.sqrt(abar), jnp.sqrt(1.0 - abar))
  return jnp.concatenate([eps_hat, -jnp.ones_like(eps_hat)], axis=-1)


def _assert_gaussian_stats(x, label):
  x = np.asarray(x, np.float64)
  assert x.shape == SHAPE
  assert abs(x.mean() / MU - 1.0) < 0.05, (label, x.mean())
  assert abs(x.std() / S - 1.0) < 0.05, (label, x.std())


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_continuous_samplers_on_gaussian_data(kind):
  rng = jax.random.key(0)
  common = dict(prediction=kind, threshold="none")
  model_fn = DENOISERS[kind]
  x_ddpm = run_sampler("ddpm", model_fn, SHAPE, rng, (), steps=400, **common)
  _assert_gaussian_stats(x_ddpm, "ddpm")
  x_ddim = run_sampler("ddim", model_fn, SHAPE, rng, (), steps=200, eta=0.0, **common)
  _assert_gaussian_stats(x_ddim, "ddim eta=0")
  # eta = 1 is the ancestral sampler: same draws, same result.
  x_eta1 = run_sampler("ddim", model_fn, SHAPE, rng, (), steps=400, eta=1.0, **common)
  _assert_gaussian_stats(x_eta1, "ddim eta=1")
  np.testing.assert_allclose(x_eta1, x_ddpm, atol=1e-3)


def test_ddim_error_shrinks_with_steps():
  errors = []
  for num_steps in (10, 200):
    x = run_sampler(
      "ddim",
      DENOISERS["v"],
      SHAPE,
      jax.random.key(1),
      (),
      steps=num_steps,
      prediction="v",
      threshold="none",
    )
    errors.append(abs(float(jnp.std(x)) / S - 1.0))
  assert errors[0] > 0.1 > 0.05 > errors[1]


@pytest.mark.parametrize("variance", ["learned_range", "fixed_small"])
def test_if_sampler_on_gaussian_data(variance):
  x = run_sampler(
    "ddpm",
    if_denoiser,
    SHAPE,
    jax.random.key(2),
    (),
    timesteps=schedules.if_timesteps(1000),
    threshold="none",
    variance=variance,
    discrete=True,
  )
  _assert_gaussian_stats(x, variance)


def test_thresholding_bounds_output():
  def wild_x0(x_t, t, args):
    del t, args
    return 5.0 * x_t

  for threshold in ("static", "dynamic"):
    x = run_sampler(
      "ddim",
      wild_x0,
      (2, 8, 8, 1),
      jax.random.key(3),
      (),
      steps=8,
      prediction="x0",
      threshold=threshold,
      quantile=0.9,
    )
    assert float(jnp.max(jnp.abs(x))) <= 1.0 + 1e-3, threshold


def _offset_model(x_t, t, args):
  """Pulls x0 toward a per-row offset: args['offset'] is [N]."""
  del t
  return 0.5 * x_t + losses.expand_to(args["offset"], x_t)


def test_guidance_scale_one_equals_conditional_model():
  b = 2
  rng = jax.random.key(4)
  cond = {"offset": jnp.full((b,), 0.5)}
  both = {"offset": jnp.concatenate([jnp.full((b,), -0.5), cond["offset"]])}
  opts = dict(steps=6, prediction="x0", threshold="none")
  plain = run_sampler("ddim", _offset_model, (b, 4, 4, 1), rng, cond, **opts)
  guided = run_sampler("ddim", _offset_model, (b, 4, 4, 1), rng, both, guidance_scale=1.0, **opts)
  np.testing.assert_allclose(guided, plain, atol=1e-5)
  stronger = run_sampler("ddim", _offset_model, (b, 4, 4, 1), rng, both, guidance_scale=3.0, **opts)
  assert float(jnp.mean(stronger)) > float(jnp.mean(plain)) + 0.1


class _TraceCounter:
  """A model function that counts how often JAX traces it."""

  def __init__(self, channels_out=1):
    self.traces = 0
    self.channels_out = channels_out

  def __call__(self, x_t, t, args):
    self.traces += 1
    out = 0.9 * x_t + losses.expand_to(args["offset"], x_t)
    return jnp.concatenate([out] * self.channels_out, axis=-1)


# Each call: (step count or timesteps, guidance, quantile, max_value, eta, strength).
_RETRACE_CALLS = [
  (10, 2.0, 0.9, 1.5, 0.0, 1.0),
  (25, 5.0, 0.99, None, 0.7, 0.6),
  (7, jnp.float32(7.0), jnp.float32(0.5), 3, 1, 0.0),
]


@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "discrete"])
@pytest.mark.parametrize("name", sampling.SAMPLERS)
def test_no_recompile_across_steps_timesteps_and_numbers(name, discrete):
  """One compile serves every step count, timestep list, scale, eta and strength."""
  model_fn = _TraceCounter(channels_out=2 if discrete else 1)
  args = {"offset": jnp.array([0.1, 0.2, -0.1, -0.2])}
  shape = (2, 4, 4, 1)
  x_init = jnp.full(shape, 0.3)
  spec = sampling.SamplerSpec(
    name,
    prediction="eps" if discrete else "v",
    threshold="dynamic",
    schedule="discrete" if discrete else "continuous",
    edit="img2img",
    variance="learned_range" if discrete else "fixed_small",
    guided=True,
  )
  per_compile = 2 if name == "heun" else 1  # Heun's corrector: a second call site.
  outs = []
  for k, (steps, w, q, m, eta, strength) in enumerate(_RETRACE_CALLS):
    grid = dict(steps=steps)
    if discrete:  # Timestep lists of different lengths and spacings.
      grid = dict(
        timesteps=("fast27", schedules.if_timesteps(steps), (999, 500, 20))[k],
        alphas_cumprod=ALPHAS_CUMPROD,
      )
    options = sampling.make_options(
      spec, guidance_scale=w, quantile=q, max_value=m, eta=eta, strength=strength, **grid
    )
    outs.append(
      sampling.sample(spec, model_fn, shape, jax.random.key(5), args, options, {"x_init": x_init})
    )
    assert model_fn.traces == per_compile, (k, model_fn.traces)  # Traced once: not unrolled.
  assert not np.allclose(outs[0], outs[1])
  np.testing.assert_array_equal(outs[2], x_init)  # Strength 0.
  # The jitted loop itself compiled once for the three calls.
  other = dataclasses.replace(spec, threshold="static")
  before = sampling._sample_jit._cache_size()  # pylint: disable=protected-access
  grid = dict(timesteps=(999, 0), alphas_cumprod=ALPHAS_CUMPROD) if discrete else dict(steps=3)
  options = sampling.make_options(spec, **grid)
  sampling.sample(spec, model_fn, shape, jax.random.key(6), args, options, {"x_init": x_init})
  assert sampling._sample_jit._cache_size() == before  # pylint: disable=protected-access
  # A static field does recompile (the counter can tell).
  sampling.sample(
    other,
    model_fn,
    shape,
    jax.random.key(6),
    args,
    sampling.make_options(other, **grid),
    {"x_init": x_init},
  )
  assert model_fn.traces == 2 * per_compile


def test_beta_schedules_and_v_prediction_on_a_discrete_table():
  """A linear-beta table with v prediction (an SD-style stage) samples the Gaussian.

  (SD's scaled_linear table ends at alpha_bar ~ 0.005, far enough from pure
  noise that a start from N(0, 1) is off by several percent: not testable here.)
  """
  ac = schedules.alphas_cumprod(schedules.get_betas("linear", 1000))
  table = jnp.asarray(ac)

  def v_denoiser(x_t, t, args):
    del args
    abar = table[t]
    alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    x0_hat, eps_hat = _posterior(x_t, alpha, sigma)
    return losses.expand_to(alpha, x_t) * eps_hat - losses.expand_to(sigma, x_t) * x0_hat

  for name, steps in (("ddim", 200), ("dpmpp_2m", 100), ("ddpm", 1000)):
    x = run_sampler(
      name,
      v_denoiser,
      SHAPE,
      jax.random.key(11),
      (),
      discrete=True,
      prediction="v",
      threshold="none",
      timesteps=schedules.if_timesteps(steps, spacing="trailing"),
      alphas_cumprod=ac,
    )
    _assert_gaussian_stats(x, f"linear v {name}")
  np.testing.assert_allclose(schedules.betas_linear(1000)[[0, -1]], [1e-4, 0.02])
  np.testing.assert_allclose(
    schedules.betas_scaled_linear(1000)[[0, -1]], [0.00085, 0.012], rtol=1e-6
  )
  with pytest.raises(ValueError, match="bogus_betas"):
    schedules.get_betas("bogus_betas")


def test_old_call_style_forwards_to_the_entry_point():
  rng = jax.random.key(12)
  args = {"offset": jnp.array([0.2])}
  old = samplers.get_sampler("ddim")(
    _offset_model, (1, 4, 4, 1), rng, args, num_steps=5, prediction="x0", eta=0.5
  )
  new = run_sampler(
    "ddim", _offset_model, (1, 4, 4, 1), rng, args, steps=5, prediction="x0", eta=0.5
  )
  np.testing.assert_array_equal(old, new)
  old = samplers.get_discrete_sampler("ddpm")(if_denoiser, SHAPE, rng, (), timesteps="fast27")
  new = run_sampler(
    "ddpm",
    if_denoiser,
    SHAPE,
    rng,
    (),
    discrete=True,
    threshold="dynamic",
    quantile=0.95,
    max_value=1.5,
    variance="learned_range",
    timesteps="fast27",
  )
  np.testing.assert_array_equal(old, new)


def _reference_if_step(out, t, prev_t, x_t, noise, ac, ratio, max_value):
  """diffusers DDPMScheduler.step (epsilon, learned_range, thresholding)."""
  out, x_t, noise = (np.asarray(a, np.float64) for a in (out, x_t, noise))
  ac = np.asarray(ac, np.float64)
  c = x_t.shape[-1]
  eps, v = out[..., :c], out[..., c:]
  abar_t = ac[t]
  abar_prev = ac[prev_t] if prev_t >= 0 else 1.0
  beta_t = 1.0 - abar_t / abar_prev
  x0 = (x_t - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)
  s = np.quantile(np.abs(x0.reshape(len(x0), -1)), ratio, axis=1)
  s = np.minimum(np.maximum(s, 1.0), max_value)[:, None, None, None]
  x0 = np.clip(x0, -s, s) / s
  mean = (
    math.sqrt(abar_prev) * beta_t / (1.0 - abar_t) * x0
    + math.sqrt(1.0 - beta_t) * (1.0 - abar_prev) / (1.0 - abar_t) * x_t
  )
  if t == 0:
    return mean, x0
  beta_tilde = max((1.0 - abar_prev) / (1.0 - abar_t) * beta_t, 1e-20)
  frac = (v + 1.0) / 2.0
  logvar = frac * math.log(beta_t) + (1.0 - frac) * math.log(beta_tilde)
  return mean + np.exp(0.5 * logvar) * noise, x0


@pytest.mark.parametrize(
  "t,prev_t,max_value",
  [(999, 800, 1.5), (500, 480, 1.5), (500, 480, 4.0), (44, 0, 1.0), (0, -1, 1.5)],
)
def test_if_ddpm_step_matches_reference(t, prev_t, max_value):
  keys = jax.random.split(jax.random.key(6), 4)
  x_t = 1.5 * jax.random.normal(keys[0], (2, 4, 4, 3))
  out = jnp.concatenate(
    [
      jax.random.normal(keys[1], (2, 4, 4, 3)),
      jax.random.uniform(keys[2], (2, 4, 4, 3), minval=-1.0, maxval=1.0),
    ],
    -1,
  )
  noise = jax.random.normal(keys[3], (2, 4, 4, 3))
  step = jax.jit(rules_ancestral.if_ddpm_step)
  x_prev, x0_hat = step(out, t, prev_t, x_t, noise, ALPHAS_CUMPROD, 0.95, max_value)
  want_prev, want_x0 = _reference_if_step(
    out, t, prev_t, x_t, noise, ALPHAS_CUMPROD, 0.95, max_value
  )
  np.testing.assert_allclose(x0_hat, want_x0, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(x_prev, want_prev, rtol=1e-4, atol=1e-5)


def test_if_ddpm_step_needs_variance_channels():
  x = jnp.zeros((1, 2, 2, 3))
  with pytest.raises(ValueError, match="6 output channels"):
    rules_ancestral.if_ddpm_step(x, 5, 4, x, x, ALPHAS_CUMPROD)
  x_prev, _ = rules_ancestral.if_ddpm_step(x, 5, 4, x, x, ALPHAS_CUMPROD, variance="fixed_small")
  assert x_prev.shape == x.shape


def test_bad_options_raise():
  model_fn = DENOISERS["eps"]
  shape = (1, 2, 2, 1)
  rng = jax.random.key(0)
  spec = sampling.SamplerSpec("ddim")
  options = sampling.make_options(spec, steps=2)
  cases = [
    (
      "bogus_pred",
      lambda: run_sampler("ddpm", model_fn, shape, rng, (), steps=2, prediction="bogus_pred"),
    ),
    (
      "bogus_thr",
      lambda: run_sampler("ddim", model_fn, shape, rng, (), steps=2, threshold="bogus_thr"),
    ),
    (
      "bogus_sched",
      lambda: run_sampler("ddim", model_fn, shape, rng, (), steps=2, schedule="bogus_sched"),
    ),
    ("0", lambda: run_sampler("ddpm", model_fn, shape, rng, (), steps=0)),
    (
      "bogus_var",
      lambda: run_sampler(
        "ddpm", if_denoiser, shape, rng, (), timesteps=(1, 0), variance="bogus_var", discrete=True
      ),
    ),
    (
      "bogus_thr",
      lambda: run_sampler(
        "ddpm", if_denoiser, shape, rng, (), timesteps=(1, 0), threshold="bogus_thr", discrete=True
      ),
    ),
    (
      "smart9",
      lambda: run_sampler("ddpm", if_denoiser, shape, rng, (), timesteps="smart9", discrete=True),
    ),
    (
      "1000",
      lambda: run_sampler("ddpm", if_denoiser, shape, rng, (), timesteps=(1000, 0), discrete=True),
    ),
    ("bogus_sampler", lambda: samplers.get_sampler("bogus_sampler")),
    ("bogus_sampler", lambda: sampling.SamplerSpec("bogus_sampler")),
    ("needs a discrete", lambda: sampling.SamplerSpec("ddpm", variance="learned_range")),
    (
      "alphas_cumprod",
      lambda: sampling.make_options(sampling.SamplerSpec("ddim", schedule="discrete"), steps=2),
    ),
    (
      "spec.edit",
      lambda: sampling.sample(
        spec, model_fn, shape, rng, (), options, {"x_init": jnp.zeros(shape)}
      ),
    ),
  ]
  for name, fn in cases:
    with pytest.raises(ValueError, match=name):
      fn()


def test_schedule_callable_or_name():
  opts = dict(steps=5, prediction="x0", threshold="static")
  rng = jax.random.key(7)
  args = {"offset": jnp.array([0.2])}
  by_name = run_sampler("ddpm", _offset_model, (1, 4, 4, 1), rng, args, schedule="linear", **opts)
  by_fn = run_sampler(
    "ddpm",
    _offset_model,
    (1, 4, 4, 1),
    rng,
    args,
    schedule=schedules.get_logsnr_fn("linear"),
    **opts,
  )
  np.testing.assert_array_equal(by_name, by_fn)
  shifted = run_sampler(
    "ddpm",
    _offset_model,
    (1, 4, 4, 1),
    rng,
    args,
    schedule=schedules.get_logsnr_fn("cosine", shift=-1.0),
    **opts,
  )
  assert shifted.shape == (1, 4, 4, 1) and np.all(np.isfinite(shifted))
