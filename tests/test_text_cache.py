"""The on-disk embedding cache returns what the encoder computed."""

import numpy as np
import pytest

from imagen_jax.text import EmbeddingCache, TextEncoder, write_embedding_cache

CAPTIONS = [
  "a red cube",
  "",
  "two blue spheres",
  "a green cone on the left",
  "yellow star",
  "a big purple square",
  "tiny orange circle",
]


@pytest.fixture(scope="module")
def encoder():
  return TextEncoder.random_init(
    dict(vocab_size=384, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2), seed=0
  )


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-5), ("bfloat16", 0.05)])
def test_cache_roundtrip(tmp_path, encoder, dtype, atol):
  write_embedding_cache(
    encoder, CAPTIONS, str(tmp_path), max_length=12, batch_size=2, shard_size=4, dtype=dtype
  )
  cache = EmbeddingCache(str(tmp_path))
  assert len(cache) == len(CAPTIONS) and cache.captions() == CAPTIONS
  assert (cache.max_length, cache.dim, cache.dtype) == (12, 16, dtype)
  want_emb, want_mask = encoder.encode(CAPTIONS, 12)
  idx = [6, 0, 4, 3]  # Across both shards, out of order.
  emb, mask = cache.get(idx)
  assert emb.shape == (4, 12, 16) and mask.dtype == bool
  np.testing.assert_array_equal(mask, np.asarray(want_mask)[idx])
  np.testing.assert_allclose(emb.astype(np.float32), np.asarray(want_emb)[idx], atol=atol, rtol=0)
  one_emb, one_mask = cache[1]  # The empty caption: just EOS.
  assert one_emb.shape == (12, 16) and one_mask.sum() == 1


def test_cache_errors(tmp_path, encoder):
  with pytest.raises(ValueError, match="captions is empty"):
    write_embedding_cache(encoder, [], str(tmp_path), 8)
  with pytest.raises(ValueError, match="cache dtype"):
    write_embedding_cache(encoder, ["a"], str(tmp_path), 8, dtype="int8")
  with pytest.raises(FileNotFoundError, match="index.json"):
    EmbeddingCache(str(tmp_path / "none"))
  write_embedding_cache(encoder, ["a"], str(tmp_path), 8, batch_size=1, shard_size=1)
  with pytest.raises(IndexError):
    EmbeddingCache(str(tmp_path)).get([1])
