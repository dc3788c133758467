"""Tests for imagen_jax.diffusion.samplers.

The correctness tests use data x0 ~ N(MU, S^2), i.i.d. per pixel, whose exact
denoiser is known in closed form: E[x0 | x_t] = MU + alpha S^2 / (alpha^2 S^2 +
sigma^2) (x_t - alpha MU). Fed that denoiser, a correct sampler's output has
mean MU and std S up to its discretization error, which shrinks with the step
count; the step counts below were chosen so that error is about 2% (the exact
variance recursion of each sampler predicts the same numbers).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import losses
from imagen_jax.diffusion import samplers
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
  x_ddpm = samplers.ddpm_sample(model_fn, SHAPE, rng, (), num_steps=400, **common)
  _assert_gaussian_stats(x_ddpm, "ddpm")
  x_ddim = samplers.ddim_sample(model_fn, SHAPE, rng, (), num_steps=200, eta=0.0, **common)
  _assert_gaussian_stats(x_ddim, "ddim eta=0")
  # eta = 1 is the ancestral sampler: same draws, same result.
  x_eta1 = samplers.ddim_sample(model_fn, SHAPE, rng, (), num_steps=400, eta=1.0, **common)
  _assert_gaussian_stats(x_eta1, "ddim eta=1")
  np.testing.assert_allclose(x_eta1, x_ddpm, atol=1e-3)


def test_ddim_error_shrinks_with_steps():
  errors = []
  for num_steps in (10, 200):
    x = samplers.ddim_sample(
      DENOISERS["v"],
      SHAPE,
      jax.random.key(1),
      (),
      num_steps=num_steps,
      prediction="v",
      threshold="none",
    )
    errors.append(abs(float(jnp.std(x)) / S - 1.0))
  assert errors[0] > 0.1 > 0.05 > errors[1]


@pytest.mark.parametrize("variance", ["learned_range", "fixed_small"])
def test_if_sampler_on_gaussian_data(variance):
  x = samplers.if_ddpm_sample(
    if_denoiser,
    SHAPE,
    jax.random.key(2),
    (),
    timesteps=schedules.if_timesteps(1000),
    threshold="none",
    variance=variance,
  )
  _assert_gaussian_stats(x, variance)


def test_thresholding_bounds_output():
  def wild_x0(x_t, t, args):
    del t, args
    return 5.0 * x_t

  for threshold in ("static", "dynamic"):
    x = samplers.ddim_sample(
      wild_x0,
      (2, 8, 8, 1),
      jax.random.key(3),
      (),
      num_steps=8,
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
  opts = dict(num_steps=6, prediction="x0", threshold="none")
  plain = samplers.ddim_sample(_offset_model, (b, 4, 4, 1), rng, cond, **opts)
  guided = samplers.ddim_sample(_offset_model, (b, 4, 4, 1), rng, both, guidance_scale=1.0, **opts)
  np.testing.assert_allclose(guided, plain, atol=1e-5)
  stronger = samplers.ddim_sample(
    _offset_model, (b, 4, 4, 1), rng, both, guidance_scale=3.0, **opts
  )
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


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "if_ddpm"])
def test_no_retrace_when_numbers_change(sampler):
  model_fn = _TraceCounter(channels_out=2 if sampler == "if_ddpm" else 1)
  args = {"offset": jnp.array([0.1, 0.2, -0.1, -0.2])}
  shape = (2, 4, 4, 1)
  if sampler == "if_ddpm":

    def run(w, q, m, eta):
      del eta
      return samplers.if_ddpm_sample(
        model_fn,
        shape,
        jax.random.key(5),
        args,
        timesteps="fast27",
        guidance_scale=w,
        quantile=q,
        max_value=m,
      )
  else:
    fn = samplers.get_sampler(sampler)
    extra = {} if sampler == "ddpm" else {"eta": None}

    def run(w, q, m, eta):
      if extra:
        extra["eta"] = eta
      return fn(
        model_fn,
        shape,
        jax.random.key(5),
        args,
        num_steps=50,
        prediction="v",
        guidance_scale=w,
        threshold="dynamic",
        quantile=q,
        max_value=m,
        **extra,
      )

  first = run(2.0, 0.9, 1.5, 0.0)
  assert model_fn.traces == 1  # One trace for all 50 steps: not unrolled.
  second = run(5.0, 0.99, None, 0.7)
  third = run(jnp.float32(7.0), jnp.float32(0.5), 3, 1)
  assert model_fn.traces == 1
  assert not np.allclose(first, second)
  assert np.all(np.isfinite(third))


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
  step = jax.jit(samplers.if_ddpm_step)
  x_prev, x0_hat = step(out, t, prev_t, x_t, noise, ALPHAS_CUMPROD, 0.95, max_value)
  want_prev, want_x0 = _reference_if_step(
    out, t, prev_t, x_t, noise, ALPHAS_CUMPROD, 0.95, max_value
  )
  np.testing.assert_allclose(x0_hat, want_x0, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(x_prev, want_prev, rtol=1e-4, atol=1e-5)


def test_if_ddpm_step_needs_variance_channels():
  x = jnp.zeros((1, 2, 2, 3))
  with pytest.raises(ValueError, match="6 output channels"):
    samplers.if_ddpm_step(x, 5, 4, x, x, ALPHAS_CUMPROD)
  x_prev, _ = samplers.if_ddpm_step(x, 5, 4, x, x, ALPHAS_CUMPROD, variance="fixed_small")
  assert x_prev.shape == x.shape


def test_bad_options_raise():
  model_fn = DENOISERS["eps"]
  shape = (1, 2, 2, 1)
  rng = jax.random.key(0)
  cases = [
    (
      "bogus_pred",
      lambda: samplers.ddpm_sample(model_fn, shape, rng, (), num_steps=2, prediction="bogus_pred"),
    ),
    (
      "bogus_thr",
      lambda: samplers.ddim_sample(model_fn, shape, rng, (), num_steps=2, threshold="bogus_thr"),
    ),
    (
      "bogus_sched",
      lambda: samplers.ddim_sample(model_fn, shape, rng, (), num_steps=2, schedule="bogus_sched"),
    ),
    ("0", lambda: samplers.ddpm_sample(model_fn, shape, rng, (), num_steps=0)),
    (
      "bogus_var",
      lambda: samplers.if_ddpm_sample(
        if_denoiser, shape, rng, (), timesteps=(1, 0), variance="bogus_var"
      ),
    ),
    (
      "bogus_thr",
      lambda: samplers.if_ddpm_sample(
        if_denoiser, shape, rng, (), timesteps=(1, 0), threshold="bogus_thr"
      ),
    ),
    ("smart9", lambda: samplers.if_ddpm_sample(if_denoiser, shape, rng, (), timesteps="smart9")),
    ("1000", lambda: samplers.if_ddpm_sample(if_denoiser, shape, rng, (), timesteps=(1000, 0))),
    ("bogus_sampler", lambda: samplers.get_sampler("bogus_sampler")),
  ]
  for name, fn in cases:
    with pytest.raises(ValueError, match=name):
      fn()


def test_schedule_callable_or_name():
  opts = dict(num_steps=5, prediction="x0", threshold="static")
  rng = jax.random.key(7)
  args = {"offset": jnp.array([0.2])}
  by_name = samplers.ddpm_sample(_offset_model, (1, 4, 4, 1), rng, args, schedule="linear", **opts)
  by_fn = samplers.ddpm_sample(
    _offset_model, (1, 4, 4, 1), rng, args, schedule=schedules.get_logsnr_fn("linear"), **opts
  )
  np.testing.assert_array_equal(by_name, by_fn)
  shifted = samplers.ddpm_sample(
    _offset_model,
    (1, 4, 4, 1),
    rng,
    args,
    schedule=schedules.get_logsnr_fn("cosine", shift=-1.0),
    **opts,
  )
  assert shifted.shape == (1, 4, 4, 1) and np.all(np.isfinite(shifted))
