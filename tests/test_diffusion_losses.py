"""Tests for imagen_jax.diffusion.losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import losses
from imagen_jax.diffusion import schedules

KINDS = ("eps", "x0", "v")


def _batch(seed=0, shape=(4, 3, 5, 2)):
  k_x, k_eps = jax.random.split(jax.random.key(seed))
  x0 = jax.random.uniform(k_x, shape, minval=-1.0, maxval=1.0)
  eps = jax.random.normal(k_eps, shape)
  logsnr = jnp.array([-8.0, -1.0, 2.5, 9.0])
  return x0, eps, logsnr


def test_q_sample_broadcasts_per_example():
  x0, eps, logsnr = _batch()
  x_t = losses.q_sample(x0, eps, logsnr)
  alpha, sigma = schedules.alpha_sigma(logsnr)
  for b in range(4):
    np.testing.assert_allclose(x_t[b], alpha[b] * x0[b] + sigma[b] * eps[b], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_target_round_trip(kind):
  x0, eps, logsnr = _batch()
  x_t = losses.q_sample(x0, eps, logsnr)
  target = losses.get_target(kind, x0, eps, logsnr)
  np.testing.assert_allclose(losses.x0_from_pred(kind, x_t, target, logsnr), x0, atol=2e-4)
  np.testing.assert_allclose(losses.eps_from_pred(kind, x_t, target, logsnr), eps, atol=2e-4)


def test_v_target_definition():
  x0, eps, logsnr = _batch()
  alpha, sigma = schedules.alpha_sigma(logsnr)
  v = losses.get_target("v", x0, eps, logsnr)
  expected = alpha[:, None, None, None] * eps - sigma[:, None, None, None] * x0
  np.testing.assert_allclose(v, expected, rtol=1e-6, atol=1e-6)


def test_min_snr_weight():
  logsnr = jnp.array([-3.0, 0.0, np.log(5.0), 4.0])
  snr = np.exp(np.asarray(logsnr, np.float64))
  clipped = np.minimum(snr, 5.0)
  np.testing.assert_allclose(losses.min_snr_weight(logsnr, "eps"), clipped / snr, rtol=1e-5)
  np.testing.assert_allclose(losses.min_snr_weight(logsnr, "x0"), clipped, rtol=1e-5)
  np.testing.assert_allclose(losses.min_snr_weight(logsnr, "v"), clipped / (snr + 1), rtol=1e-5)
  extreme = jnp.array([-20.0, 20.0])
  for kind in KINDS:
    assert np.all(np.isfinite(losses.min_snr_weight(extreme, kind)))


def test_diffusion_loss():
  pred = jnp.zeros((2, 2, 2, 1))
  target = jnp.stack([jnp.ones((2, 2, 1)), 2 * jnp.ones((2, 2, 1))])
  np.testing.assert_allclose(losses.diffusion_loss(pred, target), [1.0, 4.0])
  np.testing.assert_allclose(losses.diffusion_loss(pred, target, jnp.array([0.5, 2.0])), [0.5, 8.0])


def test_noise_augment():
  x0, eps, _ = _batch()
  aug_t = jnp.array([0.0, 0.1, 0.5, 1.0])
  logsnr_fn = schedules.get_logsnr_fn("linear")
  x_aug = losses.noise_augment(x0, aug_t, eps, logsnr_fn)
  np.testing.assert_allclose(x_aug, losses.q_sample(x0, eps, logsnr_fn(aug_t)), rtol=1e-6)
  # t = 0: logsnr 20, sigma ~ 4.5e-5: clean up to a few sigma.
  np.testing.assert_allclose(x_aug[0], x0[0], atol=5e-4)


def test_unknown_kind():
  x0, eps, logsnr = _batch()
  for fn in (
    lambda k: losses.get_target(k, x0, eps, logsnr),
    lambda k: losses.x0_from_pred(k, x0, eps, logsnr),
    lambda k: losses.eps_from_pred(k, x0, eps, logsnr),
    lambda k: losses.min_snr_weight(logsnr, k),
  ):
    with pytest.raises(ValueError, match="score") as info:
      fn("score")
    assert "eps" in str(info.value)
