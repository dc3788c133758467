"""Tests for the ODE solvers and for image-to-image and inpainting.

The Gaussian tests reuse test_diffusion_samplers' exact denoiser for data
x0 ~ N(MU, S^2). Its probability-flow ODE has a closed form: on
x~ = x / alpha with sigma~ = sigma / alpha, (x~ - MU) / sqrt(S^2 + sigma~^2)
is constant, so the exact deterministic sample from a start x_T is known and
solvers can be compared by their distance to it. The fixture test replays
diffusers' DPMSolverMultistepScheduler (tools/make_dpm_fixtures.py).
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import grids
from imagen_jax.diffusion import loop
from imagen_jax.diffusion import rules_ode
from imagen_jax.diffusion import schedules
from test_diffusion_samplers import ALPHAS_CUMPROD
from test_diffusion_samplers import DENOISERS
from test_diffusion_samplers import MU
from test_diffusion_samplers import S
from test_diffusion_samplers import SHAPE
from test_diffusion_samplers import _assert_gaussian_stats
from test_diffusion_samplers import if_denoiser
from test_diffusion_samplers import run_sampler

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "dpm_solver.npz")


def _exact_ode_sample(x_start, logsnr_start, logsnr_end):
  """The probability-flow ODE's exact end point for the Gaussian data."""
  x_start = np.asarray(x_start, np.float64)
  alpha_start = math.sqrt(1.0 / (1.0 + math.exp(-logsnr_start)))
  alpha_end = math.sqrt(1.0 / (1.0 + math.exp(-logsnr_end)))
  sigma_start = math.exp(-0.5 * logsnr_start)
  sigma_end = math.exp(-0.5 * logsnr_end)
  ratio = math.sqrt(S**2 + sigma_end**2) / math.sqrt(S**2 + sigma_start**2)
  return alpha_end * (MU + (x_start / alpha_start - MU) * ratio)


def _start_noise(rng, shape):
  """The noise every sampler starts from (loop.run's documented draw)."""
  return jax.random.normal(jax.random.split(rng)[0], shape, jnp.float32)


@pytest.mark.parametrize(
  "name,kind,num_steps",
  [("dpmpp_2m", "v", 30), ("dpmpp_2m", "eps", 30), ("heun", "x0", 40), ("euler", "eps", 200)],
)
def test_continuous_solvers_on_gaussian_data(name, kind, num_steps):
  x = run_sampler(
    name,
    DENOISERS[kind],
    SHAPE,
    jax.random.key(0),
    (),
    steps=num_steps,
    prediction=kind,
    threshold="none",
  )
  _assert_gaussian_stats(x, f"{name} {kind} {num_steps}")


@pytest.mark.parametrize("name,num_steps", [("dpmpp_2m", 30), ("heun", 40)])
def test_if_solvers_on_gaussian_data(name, num_steps):
  steps = dict(timesteps=schedules.if_timesteps(num_steps, spacing="trailing"))
  x = run_sampler(
    name, if_denoiser, SHAPE, jax.random.key(0), (), discrete=True, threshold="none", **steps
  )
  _assert_gaussian_stats(x, f"if {name} {num_steps}")


def test_dpmpp_closer_to_exact_ode_than_ddim():
  rng = jax.random.key(1)
  exact = _exact_ode_sample(
    _start_noise(rng, SHAPE),
    float(schedules.logsnr_cosine(1.0)),
    float(schedules.logsnr_cosine(0.0)),
  )
  errors = {}
  for name in ("ddim", "dpmpp_2m"):
    x = run_sampler(
      name, DENOISERS["eps"], SHAPE, rng, (), steps=10, prediction="eps", threshold="none"
    )
    errors[name] = float(np.mean(np.abs(np.asarray(x, np.float64) - exact)))
  assert errors["dpmpp_2m"] < 0.9 * errors["ddim"], errors
  # Second order: 20 steps cut DPM-Solver++'s error by far more than 2x.
  x20 = run_sampler(
    "dpmpp_2m", DENOISERS["eps"], SHAPE, rng, (), steps=20, prediction="eps", threshold="none"
  )
  err20 = float(np.mean(np.abs(np.asarray(x20, np.float64) - exact)))
  assert err20 < errors["dpmpp_2m"] / 3.0, (err20, errors)


def test_heun_is_second_order():
  rng = jax.random.key(2)
  # EDM grid: the ODE starts at sigma~ = 80 (clipped sigma_max).
  exact = _exact_ode_sample(_start_noise(rng, SHAPE), -2.0 * math.log(80.0), 60.0)
  errors = {}
  for name, num_steps in (("heun", 20), ("heun", 40), ("euler", 40)):
    x = run_sampler(
      name, DENOISERS["eps"], SHAPE, rng, (), steps=num_steps, prediction="eps", threshold="none"
    )
    errors[name, num_steps] = float(np.max(np.abs(np.asarray(x, np.float64) - exact)))
  assert errors["heun", 40] < errors["heun", 20] / 3.0, errors
  assert errors["heun", 40] < errors["euler", 40] / 3.0, errors


class _CountingModel:
  """Counts traces; its output pulls x0 toward a per-row offset."""

  def __init__(self, channels_out):
    self.traces = 0
    self.channels_out = channels_out

  def __call__(self, x_t, t, args):
    self.traces += 1
    out = 0.9 * x_t + args["offset"].reshape(-1, 1, 1, 1)
    return jnp.concatenate([out] * self.channels_out, axis=-1)


def _call(name, discrete, model_fn, shape, rng, args, num_steps, **kwargs):
  """Runs sampler `name` with num_steps steps, whatever its step argument."""
  if not discrete:
    return run_sampler(name, model_fn, shape, rng, args, steps=num_steps, **kwargs)
  return run_sampler(
    name,
    model_fn,
    shape,
    rng,
    args,
    discrete=True,
    timesteps=schedules.if_timesteps(num_steps, spacing="trailing"),
    **kwargs,
  )


@pytest.mark.parametrize("name,discrete", [("dpmpp_2m", False), ("heun", True)])
def test_no_retrace_across_steps_strength_and_scales(name, discrete):
  model_fn = _CountingModel(channels_out=2 if discrete else 1)
  args = {"offset": jnp.array([0.1, 0.2, -0.1, -0.2])}
  shape = (2, 4, 4, 1)
  x_init = jnp.full(shape, 0.3)
  outs = []
  for num_steps, scale, strength in ((5, 2.0, 1.0), (12, 5.0, 0.4), (7, 3.0, 0.0)):
    outs.append(
      _call(
        name,
        discrete,
        model_fn,
        shape,
        jax.random.key(5),
        args,
        num_steps,
        guidance_scale=scale,
        threshold="dynamic",
        quantile=0.9,
        x_init=x_init,
        strength=strength,
      )
    )
    if num_steps == 5:
      traces = model_fn.traces
      assert traces <= 2  # Heun's corrector is a second call site.
  assert model_fn.traces == traces
  assert not np.allclose(outs[0], outs[1])
  np.testing.assert_array_equal(outs[2], x_init)


# Every sampler's editing runs through loop.run inside the one jitted loop;
# these six cover each update rule family on both schedule kinds.
EDIT_SAMPLERS = [
  ("ddim", False),
  ("dpmpp_2m", False),
  ("heun", False),
  ("ddpm", True),
  ("dpmpp_2m", True),
  ("euler", True),
]


def _gaussian_call(name, discrete, rng, num_steps=8, **kwargs):
  model_fn = if_denoiser if discrete else DENOISERS["eps"]
  extra = {} if discrete else {"prediction": "eps"}
  return _call(
    name, discrete, model_fn, SHAPE, rng, (), num_steps, threshold="none", **extra, **kwargs
  )


@pytest.mark.parametrize("name,discrete", EDIT_SAMPLERS)
def test_image_to_image_ends(name, discrete):
  rng = jax.random.key(3)
  x_init = MU + S * jax.random.normal(jax.random.key(9), SHAPE)
  txt2img = _gaussian_call(name, discrete, rng)
  full = _gaussian_call(name, discrete, rng, x_init=x_init, strength=1.0)
  np.testing.assert_array_equal(full, txt2img)
  # A quarter of the steps from the noised x_init keeps much of it.
  part = _gaussian_call(name, discrete, rng, x_init=x_init, strength=0.25)
  corr = lambda x: float(np.corrcoef(np.ravel(x), np.ravel(x_init))[0, 1])
  assert corr(part) > 0.3 > 0.1 > abs(corr(txt2img)), (corr(part), corr(txt2img))
  # Strength 0: x_init exactly (the loop runs no step).
  zero = _gaussian_call(name, discrete, rng, x_init=x_init, strength=0.0)
  np.testing.assert_array_equal(zero, x_init)


@pytest.mark.parametrize("name,discrete", EDIT_SAMPLERS)
def test_inpainting_keeps_known_pixels(name, discrete):
  rng = jax.random.key(4)
  known = jnp.clip(0.5 * jax.random.normal(jax.random.key(8), SHAPE), -1, 1)
  mask = jnp.zeros(SHAPE[:3] + (1,)).at[:, :, 16:].set(1.0)
  x = np.asarray(_gaussian_call(name, discrete, rng, known=known, mask=mask))
  np.testing.assert_array_equal(x[:, :, :16], np.asarray(known)[:, :, :16])
  assert np.all(np.isfinite(x))
  assert not np.allclose(x[:, :, 16:], np.asarray(known)[:, :, 16:])
  # A mask of ones regenerates everything: text-to-image, bit for bit.
  ones = _gaussian_call(name, discrete, rng, known=known, mask=jnp.ones_like(mask))
  np.testing.assert_array_equal(ones, _gaussian_call(name, discrete, rng))


def _fake_if_model(x, t, args):
  """tools/make_dpm_fixtures.py's fake UNet, NHWC."""
  del args
  t = t.astype(jnp.float32).reshape(-1, 1, 1, 1)
  c = jnp.arange(x.shape[-1], dtype=jnp.float32)
  eps = (0.8 + 0.2 * jnp.cos(t / 250.0)) * x + 0.1 * (c + 1.0) * jnp.sin(t / 150.0)
  return jnp.concatenate([eps, 0.5 * x], axis=-1)


FIXTURE_CASES = ("leading10", "trailing20", "smart27")
IF_OPTS = dict(threshold="dynamic", quantile=0.95, max_value=1.5)


@pytest.fixture(scope="module")
def dpm_fixture():
  data = dict(np.load(FIXTURE))
  rng = jax.random.key(int(data["seed"]))
  np.testing.assert_array_equal(_start_noise(rng, data["x_start"].shape), data["x_start"])
  return data


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_if_dpmpp_matches_diffusers(dpm_fixture, case):
  timesteps = tuple(dpm_fixture[f"{case}_timesteps"])
  want = dpm_fixture[f"{case}_samples"]
  rng = jax.random.key(int(dpm_fixture["seed"]))
  x = run_sampler(
    "dpmpp_2m",
    _fake_if_model,
    want.shape[1:],
    rng,
    (),
    discrete=True,
    timesteps=timesteps,
    **IF_OPTS,
  )
  np.testing.assert_allclose(x, want[-1], atol=2e-5)
  # First order everywhere (DDIM) is a different solver: the test can tell.
  ddim = run_sampler(
    "ddim", _fake_if_model, want.shape[1:], rng, (), discrete=True, timesteps=timesteps, **IF_OPTS
  )
  assert np.max(np.abs(np.asarray(ddim) - want[-1])) > 1e-2


@jax.jit
def _replay_step(x_t, x0_prev, t, logsnr_prev, logsnr_t, logsnr_s, first):
  """One DPM-Solver++ step of our own from a fixture sample."""
  x0_hat, _ = loop.predict_x0_eps(
    _fake_if_model,
    x_t,
    jnp.full((x_t.shape[0],), t),
    jnp.full((x_t.shape[0],), logsnr_t),
    (),
    prediction="eps",
    threshold="dynamic",
    quantile=0.95,
    max_value=1.5,
  )
  return rules_ode.dpmpp_2m_update(
    x_t, x0_hat, x0_prev, logsnr_prev, logsnr_t, logsnr_s, first
  ), x0_hat


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_dpmpp_steps_match_diffusers(dpm_fixture, case):
  """Every step of diffusers' trajectory, from its own previous sample."""
  timesteps = dpm_fixture[f"{case}_timesteps"]
  want = dpm_fixture[f"{case}_samples"]
  n = len(timesteps)
  table = grids.discrete_logsnr_table(ALPHAS_CUMPROD)
  logsnr = [table[t] for t in timesteps] + [np.inf]
  x0_prev = np.zeros_like(want[0])
  for i in range(n):
    x_next, x0_prev = _replay_step(
      want[i],
      x0_prev,
      timesteps[i],
      logsnr[max(i - 1, 0)],
      logsnr[i],
      logsnr[i + 1],
      i in (0, n - 1),
    )
    np.testing.assert_allclose(
      x_next, want[i + 1], rtol=1e-4, atol=2e-5, err_msg=f"{case} step {i}"
    )


def test_bad_edit_options_raise():
  rng = jax.random.key(0)
  shape = (1, 4, 4, 1)
  x = jnp.zeros(shape)
  opts = dict(steps=2, prediction="eps")

  def fn(*args, **kwargs):
    return run_sampler("dpmpp_2m", *args, **kwargs)

  cases = [
    ("strength", lambda: fn(DENOISERS["eps"], shape, rng, (), x_init=x, strength=1.5, **opts)),
    (
      "x_init has shape",
      lambda: fn(DENOISERS["eps"], shape, rng, (), x_init=jnp.zeros((1, 8, 8, 1)), **opts),
    ),
    ("together", lambda: fn(DENOISERS["eps"], shape, rng, (), known=x, **opts)),
    (
      "mask has shape",
      lambda: fn(DENOISERS["eps"], shape, rng, (), known=x, mask=jnp.zeros((1, 4, 4, 2)), **opts),
    ),
    ("bogus_if", lambda: run_sampler("bogus_if", if_denoiser, shape, rng, (), discrete=True)),
    ("0", lambda: run_sampler("heun", if_denoiser, shape, rng, (), discrete=True, steps=0)),
    (
      "1000",
      lambda: run_sampler(
        "dpmpp_2m", if_denoiser, shape, rng, (), discrete=True, timesteps=(1000, 0)
      ),
    ),
  ]
  for name, call in cases:
    with pytest.raises(ValueError, match=name):
      call()
