"""Sharded encode on the 8 fake CPU devices of conftest.py: same embeddings."""

import os

import jax
import numpy as np
import pytest

from imagen_jax import parallel
from imagen_jax.parallel import offload
from imagen_jax.text import TextEncoder

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
V11 = os.path.join(FIXTURES, "t5_v1_1")


def _spec(x):
  return tuple(x.sharding.spec)


@pytest.fixture(scope="module")
def reference():
  ref = dict(np.load(os.path.join(V11, "reference.npz")))
  return list(ref["prompts"]), int(ref["max_length"]), ref["hidden_fp32"]


@pytest.mark.parametrize(
  "strategy, shape",
  [
    ("fsdp_tp", {"data": 2, "fsdp": 2, "tensor": 2}),
    ("fsdp", {"data": 1, "fsdp": 8, "tensor": 1}),
    # 4-way tensor parallel over 2 heads: heads stay replicated, MLP splits.
    ("tp", {"data": 2, "fsdp": 1, "tensor": 4}),
  ],
)
def test_sharded_from_pretrained_matches(reference, strategy, shape):
  assert jax.device_count() == 8
  prompts, max_length, hidden = reference
  mesh = parallel.make_mesh({"shape": shape})
  enc = TextEncoder.from_pretrained(V11, mesh=mesh, rules=parallel.logical_rules(strategy))
  p = enc.params["params"]
  wi = p["block_0"]["mlp"]["wi_0"]
  if strategy == "fsdp":
    assert "fsdp" in _spec(p["token_embed"])
    assert "fsdp" in _spec(wi)
  else:
    assert "tensor" in _spec(wi)
  if strategy == "fsdp_tp":
    assert _spec(p["block_0"]["attn"]["q"])[:2] == ("fsdp", "tensor")
  # 5 prompts over 4 or 8 batch shards: padded inside, cut on the way out.
  emb, mask = enc.encode(prompts, max_length)
  assert emb.shape == hidden.shape and mask.shape == hidden.shape[:2]
  np.testing.assert_allclose(np.asarray(emb), hidden, atol=1e-5, rtol=0)


def test_sharded_random_init_matches_single_device():
  mesh = parallel.make_mesh({"shape": {"data": 2, "fsdp": 2, "tensor": 2}})
  config = dict(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
  single = TextEncoder.random_init(config, seed=3)
  sharded = TextEncoder.random_init(
    config, seed=3, mesh=mesh, rules=parallel.logical_rules("fsdp_tp")
  )
  q = sharded.params["params"]["block_1"]["attn"]["q"]
  assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
  for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  prompts = ["a red cube", "", "two blue spheres left of a green cone"]
  a, _ = single.encode(prompts, 24)
  b, _ = sharded.encode(prompts, 24)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # To host memory and back (sample.py --offload): the same shards, the same embeddings.
  resident = offload.device_bytes(sharded.params)
  host = offload.to_host(sharded.params)
  assert resident > 0 and offload.on_host(host) and offload.device_bytes(host) == 0
  assert not offload.on_host(sharded.params)
  q_host = host["params"]["block_1"]["attn"]["q"]
  assert q_host.sharding.memory_kind == offload.HOST
  assert q_host.sharding.spec == q.sharding.spec and q_host.sharding.mesh == mesh
  sharded.params = offload.to_device(host)
  assert offload.device_bytes(sharded.params) == resident
  c, _ = sharded.encode(prompts, 24)
  np.testing.assert_array_equal(np.asarray(b), np.asarray(c))
