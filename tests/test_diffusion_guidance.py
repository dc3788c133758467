"""Tests for imagen_jax.diffusion.guidance (thresholding and CFG)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import guidance


def test_static_threshold():
  x = jnp.array([[-3.0, -1.0, 0.25, 1.5]])
  np.testing.assert_array_equal(guidance.static_threshold(x), [[-1.0, -1.0, 0.25, 1.0]])


def test_dynamic_threshold_below_one_is_identity():
  x = jnp.array([[0.5, -0.2, 0.1, 0.9]]).reshape(1, 2, 2, 1)
  np.testing.assert_allclose(guidance.dynamic_threshold(x, 0.995), x)


def test_dynamic_threshold_clips_and_divides():
  # |x| = 1, 2, 3, 4: the 0.5 quantile (linear interpolation) is 2.5.
  x = jnp.array([1.0, -2.0, 3.0, -4.0]).reshape(1, 2, 2, 1)
  out = guidance.dynamic_threshold(x, 0.5)
  np.testing.assert_allclose(out.reshape(-1), [0.4, -0.8, 1.0, -1.0], rtol=1e-6)
  # max_value caps s at 2.
  out = guidance.dynamic_threshold(x, 0.5, max_value=2.0)
  np.testing.assert_allclose(out.reshape(-1), [0.5, -1.0, 1.0, -1.0], rtol=1e-6)
  # A cap above s changes nothing; +inf means no cap.
  for cap in (10.0, jnp.inf):
    np.testing.assert_allclose(
      guidance.dynamic_threshold(x, 0.5, max_value=cap).reshape(-1),
      [0.4, -0.8, 1.0, -1.0],
      rtol=1e-6,
    )


def test_dynamic_threshold_per_example_and_traced():
  x = jnp.array([[1.0, -2.0, 3.0, -4.0], [0.1, 0.2, -0.3, 0.4]])
  fn = jax.jit(guidance.dynamic_threshold)
  out = fn(x, jnp.float32(0.5), jnp.float32(100.0))
  np.testing.assert_allclose(out[0], [0.4, -0.8, 1.0, -1.0], rtol=1e-6)
  np.testing.assert_allclose(out[1], x[1], rtol=1e-6)  # s < 1 -> s = 1.
  # quantile 1 is the max |x| (4): plain rescaling.
  np.testing.assert_allclose(fn(x, 1.0, 100.0)[0], x[0] / 4.0, rtol=1e-6)


def test_apply_threshold_modes():
  x = jnp.array([1.0, -2.0, 3.0, -4.0]).reshape(1, 4)
  np.testing.assert_array_equal(guidance.apply_threshold(x, "none"), x)
  np.testing.assert_array_equal(guidance.apply_threshold(x, "static"), [[1.0, -1.0, 1.0, -1.0]])
  np.testing.assert_allclose(
    guidance.apply_threshold(x, "dynamic", 0.5, None), [[0.4, -0.8, 1.0, -1.0]], rtol=1e-6
  )
  with pytest.raises(ValueError, match="adaptive") as info:
    guidance.apply_threshold(x, "adaptive")
  assert "dynamic" in str(info.value)


def test_cfg_predict_one_call_and_channels():
  calls = []

  def model_fn(x, t, args):
    calls.append((x.shape, t.shape))
    # Channel 0: depends on cond flag; channel 1 ("variance"): flag-coded.
    flag = args["cond"][:, None, None, None]
    return jnp.concatenate(
      [x * (1.0 + flag) + t[:, None, None, None], jnp.broadcast_to(10.0 * flag + 1.0, x.shape)],
      axis=-1,
    )

  b = 3
  x_t = jnp.arange(b * 4, dtype=jnp.float32).reshape(b, 2, 2, 1)
  t = jnp.full((b,), 0.5)
  args = {"cond": jnp.array([0.0] * b + [1.0] * b)}
  out = guidance.cfg_predict(model_fn, x_t, t, args, 3.0)
  assert calls == [((2 * b, 2, 2, 1), (2 * b,))]
  assert out.shape == (b, 2, 2, 2)
  uncond, cond = x_t + 0.5, 2.0 * x_t + 0.5
  np.testing.assert_allclose(out[..., :1], uncond + 3.0 * (cond - uncond))
  np.testing.assert_allclose(out[..., 1:], 11.0)  # From the cond half.
  # w = 1 is the conditional model; w = 0 the unconditional one.
  np.testing.assert_allclose(guidance.cfg_predict(model_fn, x_t, t, args, 1.0)[..., :1], cond)
  np.testing.assert_allclose(guidance.cfg_predict(model_fn, x_t, t, args, 0.0)[..., :1], uncond)
