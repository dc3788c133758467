"""Tests for imagen_jax.diffusion.schedules (continuous and discrete)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import if_schedules, schedules


def _cosine_reference(t, logsnr_min=-20.0, logsnr_max=20.0):
  """The textbook formula in float64, for comparison."""
  b = math.atan(math.exp(-logsnr_max / 2))
  a = math.atan(math.exp(-logsnr_min / 2)) - b
  return -2.0 * np.log(np.tan(a * np.asarray(t, np.float64) + b))


def test_alpha_sigma_variance_preserving():
  logsnr = jnp.linspace(-20.0, 20.0, 401)
  alpha, sigma = schedules.alpha_sigma(logsnr)
  assert alpha.dtype == jnp.float32
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  np.testing.assert_allclose(np.log(alpha**2) - np.log(sigma**2), logsnr, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_logsnr_monotone_finite_and_alpha_sigma(name):
  t = jnp.linspace(0.0, 1.0, 1001)
  logsnr = schedules.get_logsnr_fn(name)(t)
  assert logsnr.shape == t.shape
  assert np.all(np.isfinite(logsnr))
  assert np.all(np.diff(np.asarray(logsnr)) <= 0.0)
  alpha, sigma = schedules.alpha_sigma(logsnr)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)


def test_cosine_end_points_and_reference():
  np.testing.assert_allclose(schedules.logsnr_cosine(0.0), 20.0, atol=1e-3)
  np.testing.assert_allclose(schedules.logsnr_cosine(1.0), -20.0, atol=1e-3)
  np.testing.assert_allclose(
    schedules.logsnr_cosine(jnp.array([0.0, 1.0]), -10.0, 15.0), [15.0, -10.0], atol=1e-3
  )
  t = np.linspace(0.0, 0.98, 99)
  np.testing.assert_allclose(schedules.logsnr_cosine(t), _cosine_reference(t), rtol=1e-4, atol=1e-4)
  # Strictly decreasing across the branch switch at logsnr = 0.
  t_mid = jnp.linspace(0.45, 0.55, 2001)
  assert np.all(np.diff(np.asarray(schedules.logsnr_cosine(t_mid))) < 0.0)


def test_cosine_shift_and_shapes():
  t = jnp.linspace(0.0, 1.0, 12).reshape(3, 4)
  shift = 2.0 * math.log(64 / 256)
  base = schedules.logsnr_cosine(t)
  shifted = schedules.get_logsnr_fn("cosine", shift=shift)(t)
  assert shifted.shape == (3, 4)
  np.testing.assert_allclose(shifted - base, shift, atol=1e-5)


def test_linear_values():
  fn = schedules.get_logsnr_fn("linear")
  np.testing.assert_allclose(fn(1.0), -math.log(math.expm1(0.1 + 0.5 * 19.9)), rtol=1e-5)
  np.testing.assert_allclose(
    fn(0.25), -math.log(math.expm1(0.1 * 0.25 + 0.5 * 19.9 * 0.0625)), rtol=1e-5
  )
  np.testing.assert_allclose(fn(0.0), 20.0)  # Clamped: +inf at t = 0.


def test_unknown_schedule_name():
  with pytest.raises(ValueError, match="warp") as info:
    schedules.get_logsnr_fn("warp")
  assert "cosine" in str(info.value) and "linear" in str(info.value)


def test_betas_squaredcos_cap_v2_independent():
  n = 1000

  def alpha_bar(s):
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

  expected = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
  betas = schedules.betas_squaredcos_cap_v2()
  assert betas.shape == (1000,)
  np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=1e-15)
  assert np.all(betas <= 0.999) and np.all(betas > 0.0)
  assert betas[-1] == 0.999  # alpha_bar(1) = cos^2(pi / 2) ~ 0: capped.

  ac = schedules.alphas_cumprod(betas)
  assert ac.dtype == np.float32 and ac.shape == (1000,)
  # alpha_bar telescopes: cumprod(1 - beta)[i] = alpha_bar((i+1)/N)/alpha_bar(0)
  # wherever the cap is inactive.
  telescoped = [alpha_bar((i + 1) / n) / alpha_bar(0.0) for i in range(n - 1)]
  np.testing.assert_allclose(ac[:-1], telescoped, rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(
    schedules.alphas_cumprod(betas, np.float64), np.cumprod(1 - betas), rtol=1e-12
  )


def test_if_timesteps_spacings():
  leading = schedules.if_timesteps(100)
  assert leading == tuple(range(990, -1, -10))
  assert schedules.if_timesteps(27)[:3] == (962, 925, 888)  # 1000 // 27 = 37.
  assert schedules.if_timesteps(27)[-1] == 0
  assert schedules.if_timesteps(4, steps_offset=1) == (751, 501, 251, 1)
  assert schedules.if_timesteps(1000) == tuple(range(999, -1, -1))
  assert schedules.if_timesteps(3, spacing="trailing") == (999, 666, 332)
  assert schedules.if_timesteps(10, spacing="trailing") == tuple(range(999, 0, -100))
  assert schedules.if_timesteps(4, spacing="linspace") == (999, 666, 333, 0)
  assert all(isinstance(s, int) for s in leading)


def test_if_timesteps_bad_input():
  with pytest.raises(ValueError, match="middle"):
    schedules.if_timesteps(10, spacing="middle")
  with pytest.raises(ValueError, match="0"):
    schedules.if_timesteps(0)


def test_if_named_schedules():
  expected_lengths = {
    "fast27": 27,
    "smart27": 27,
    "smart50": 50,
    "smart100": 100,
    "smart185": 185,
    "super27": 27,
    "super40": 40,
    "super100": 100,
  }
  assert set(if_schedules.IF_SCHEDULES) == set(expected_lengths)
  for name, length in expected_lengths.items():
    steps = if_schedules.named_if_timesteps(name)
    assert len(steps) == length, name
    assert steps[0] == 999 and steps[-1] == 0, name
    assert all(a > b for a, b in zip(steps, steps[1:])), name
  assert if_schedules.IF_SCHEDULES["fast27"][:5] == (999, 800, 799, 600, 599)
  assert if_schedules.IF_SCHEDULES["smart50"][-3:] == (22, 11, 0)
  with pytest.raises(ValueError, match="smart7"):
    if_schedules.named_if_timesteps("smart7")


def test_previous_timesteps():
  assert schedules.previous_timesteps((999, 500, 0)) == (500, 0, -1)
  assert schedules.previous_timesteps([7]) == (-1,)
