"""Attention backends (imagen_jax.models.attention) against plain XLA, and remat policies.

Every backend that runs on a CPU (xla, chunked, auto; splash through Pallas'
interpreter) matches ``xla_attention`` within 1e-5 in values and gradients, with
text-padding masks, self_cross's concatenated keys and lengths that are not
multiples of the chunk sizes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.models import UNet, UNetConfig, attention, layers

TOL = 1e-5


def _qkv(b, t, s, n, d, seed=0, text=None):
  """Random q (pre-scaled), k, v; mask True on the image keys and on the first
  ``text[i]`` of the text keys (which come first, as in self_cross)."""
  rs = np.random.RandomState(seed)
  q = rs.randn(b, t, n, d).astype(np.float32) * d**-0.5
  k, v = (rs.randn(b, s, n, d).astype(np.float32) for _ in range(2))
  mask = None
  if text is not None:
    length = len(text[0]) if isinstance(text[0], list) else max(text)
    text_mask = np.arange(length)[None, :] < np.asarray(text)[:, None]
    mask = np.concatenate([text_mask, np.ones((b, s - length), bool)], axis=1)
    mask = jnp.asarray(mask)
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask


def _value_and_grads(fn, q, k, v, mask):
  loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask)))
  out = jax.jit(lambda q, k, v: fn(q, k, v, mask))(q, k, v)
  return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _assert_matches_xla(fn, q, k, v, mask):
  out, grads = _value_and_grads(fn, q, k, v, mask)
  ref, ref_grads = _value_and_grads(attention.xla_attention, q, k, v, mask)
  np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
  for name, g, r in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=TOL, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("q_chunk,k_chunk", [(16, 2048), (32, 24)])
def test_chunked_matches_xla_with_masks_and_ragged_lengths(q_chunk, k_chunk):
  # 45 queries, 45 image + 7 text keys: neither divides the chunks; with k_chunk
  # 24 the online softmax runs over 3 key blocks, the last one mostly padding.
  q, k, v, mask = _qkv(3, 45, 52, 2, 8, text=[7, 3, 0])
  fn = functools.partial(attention.chunked_attention, q_chunk=q_chunk, k_chunk=k_chunk)
  _assert_matches_xla(fn, q, k, v, mask)
  _assert_matches_xla(fn, q, k, v, None)


def test_chunked_fully_masked_rows_match_xla():
  # 'cross' attention with an empty caption: every key masked. XLA's softmax of
  # equal logits is uniform; the chunked backend must agree, gradients included.
  q, k, v, mask = _qkv(2, 20, 9, 1, 8, text=[0, 5])
  fn = functools.partial(attention.chunked_attention, q_chunk=8, k_chunk=4)
  _assert_matches_xla(fn, q, k, v, mask)


def test_auto_picks_by_platform_shape_and_dtype():
  spec = jax.ShapeDtypeStruct  # the choice reads shapes and dtypes only
  f32 = spec((1, 1024, 2, 64), jnp.float32)
  bf16 = spec((1, 1024, 2, 64), jnp.bfloat16)
  small = spec((1, 16, 2, 64), jnp.float32)
  assert attention.resolve_impl("auto", f32, f32, "cpu") == "chunked"
  assert attention.resolve_impl("auto", small, small, "cpu") == "xla"
  assert attention.resolve_impl("auto", bf16, bf16, "gpu") == "cudnn"
  assert attention.resolve_impl("auto", f32, f32, "gpu") == "xla"  # cuDNN: no fp32
  huge = spec((64, 4096, 8, 64), jnp.float32)  # 32 GiB of logits
  assert attention.resolve_impl("auto", huge, huge, "gpu") == "chunked"
  assert attention.resolve_impl("cudnn", small, small, "gpu") == "xla"
  assert attention.resolve_impl("auto", f32, f32, "tpu") == "splash"
  assert attention.resolve_impl("auto", small, small, "tpu") == "xla"


def test_auto_matches_xla_on_a_long_sequence():
  q, k, v, mask = _qkv(1, 512, 520, 1, 8, text=[5])
  assert attention.resolve_impl("auto", q, k) == "chunked"
  _assert_matches_xla(functools.partial(attention.attention, impl="auto"), q, k, v, mask)


def test_splash_in_pallas_interpreter_matches_xla():
  # The TPU kernel's math, run by Pallas' interpreter on the CPU; T and S are
  # padded to its 128-blocks, the mask goes in as segment ids.
  q, k, v, mask = _qkv(1, 64, 75, 2, 8, text=[4])
  # pylint: disable-next=protected-access
  fn = functools.partial(attention._splash_attention, interpret=True)
  _assert_matches_xla(fn, q, k, v, mask)


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_backend_missing_on_this_platform_is_a_config_error(impl):
  with pytest.raises(ValueError, match=f"attention_impl '{impl}' needs a .*platform is 'cpu'"):
    UNetConfig(attention_impl=impl)
  with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
    attention.check_impl("flash")


@pytest.mark.parametrize("kind", ["self_cross", "cross"])
def test_attention_block_backends_agree(kind):
  # Image tokens 6×6 and 5 text tokens (one caption fully padded): the block's
  # output and parameter gradients are the same through the chunked backend as
  # through XLA (the auto choice at this size).
  rs = np.random.RandomState(1)
  x = jnp.asarray(rs.randn(2, 6, 6, 16), jnp.float32)
  text = jnp.asarray(rs.randn(2, 5, 12), jnp.float32)
  text_mask = jnp.asarray([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], bool)
  block = lambda impl: layers.AttentionBlock(kind, head_dim=8, groups=4, attention_impl=impl)
  params = block("xla").init(jax.random.PRNGKey(0), x, text, text_mask)
  # The output projection starts at zero; give it weights so gradients reach q, k, v.
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)

  def run(impl):
    loss = lambda p: jnp.mean(jnp.sin(block(impl).apply(p, x, text, text_mask)))
    return jax.jit(jax.value_and_grad(loss))(params)

  ref, ref_grads = run("xla")
  value, grads = run("chunked")
  np.testing.assert_allclose(value, ref, atol=TOL, rtol=0)
  jax.tree_util.tree_map(
    lambda g, r: np.testing.assert_allclose(g, r, atol=TOL, rtol=0), grads, ref_grads
  )


def test_remat_policies_match_no_remat():
  # The UNet's remat wrapper around one attention block (the block whose output
  # carries the 'attention_out' name): the same gradients under every policy.
  rs = np.random.RandomState(2)
  x = jnp.asarray(rs.randn(1, 4, 4, 16), jnp.float32)
  text = jnp.asarray(rs.randn(1, 3, 12), jnp.float32)
  mask = jnp.asarray([[1, 1, 0]], bool)

  def grads(remat):
    # pylint: disable-next=protected-access
    cls = UNet(UNetConfig(remat=remat))._remat(layers.AttentionBlock)
    block = cls("self_cross", head_dim=8, groups=4)
    params = jax.tree_util.tree_map(
      lambda p: p + 0.1, block.init(jax.random.PRNGKey(0), x, text, mask)
    )
    loss = lambda p: jnp.mean(jnp.sin(block.apply(p, x, text, mask)))
    return jax.jit(jax.grad(loss))(params)

  ref = grads("none")
  for policy in ("full", "dots_saveable", "save_attention_out"):
    jax.tree_util.tree_map(
      lambda g, r: np.testing.assert_allclose(g, r, atol=TOL, rtol=0), grads(policy), ref
    )


def test_remat_bools_and_bad_names():
  assert UNetConfig(remat=True).remat == "full"
  assert UNetConfig(remat=False).remat == "none"
  assert UNetConfig.from_config({"remat": "dots_saveable"}).remat == "dots_saveable"
  with pytest.raises(ValueError, match="unknown model.remat 'most'"):
    UNetConfig(remat="most")


def test_sharding_benchmark_sets_the_remat_policy():
  # benchmarks.sharding --remat: a config copy per policy, also over an old bool key.
  from benchmarks import sharding  # pylint: disable=import-outside-toplevel
  from imagen_jax import config as config_lib  # pylint: disable=import-outside-toplevel

  config = config_lib.load_config("configs/demo.py:tiny")
  with config.unlocked():
    config.stages.base.model.remat = True
  cfg = sharding.with_remat(config, "base", "save_attention_out")
  assert cfg.stages.base.model.remat == "save_attention_out"
  assert config.stages.base.model.remat is True  # the original is untouched
  assert UNetConfig.from_config(cfg.stages.base.model).remat == "save_attention_out"
  with pytest.raises(ValueError, match="unknown remat policy 'most'"):
    sharding.with_remat(config, "base", "most")
