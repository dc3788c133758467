"""Parity of the Flax T5 encoder with transformers' golden fixtures.

The fixtures (tests/fixtures/t5_*/) come from tools/make_t5_fixtures.py: a
T5 v1.0 (ReLU, full encoder-decoder checkpoint, Unigram tokenizer) and a T5
v1.1 (gated tanh-GELU, encoder-only checkpoint, ByT5 tokenizer).
"""

import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from safetensors import safe_open

from imagen_jax.text import TextEncoder
from imagen_jax.text import loading
from imagen_jax.text.t5 import relative_position_buckets

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NAMES = ("t5_v1_0", "t5_v1_1")


def _ref(name):
  return dict(np.load(os.path.join(FIXTURES, name, "reference.npz")))


@pytest.fixture(scope="module", params=NAMES)
def fp32(request):
  return request.param, TextEncoder.from_pretrained(
    os.path.join(FIXTURES, request.param), dtype=jnp.float32
  )


def test_buckets_match_transformers():
  ref = np.load(os.path.join(FIXTURES, "t5_buckets", "buckets.npz"))
  n = len(ref["relative_position"]) // 2  # positions -n..n
  for key in ref.files:
    if not key.startswith("buckets_"):
      continue
    num_buckets, max_distance = map(int, key.split("_")[1:])
    b = relative_position_buckets(n + 1, n + 1, num_buckets, max_distance)
    # Row n holds relative positions -n..0, row 0 holds 0..n.
    mine = np.concatenate([b[n, :], b[0, 1:]])
    np.testing.assert_array_equal(mine, ref[key], err_msg=key)


def test_tokens_match_reference(fp32):
  name, enc = fp32
  ref = _ref(name)
  ids, mask = enc.tokenize(list(ref["prompts"]), int(ref["max_length"]))
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_float32_parity(fp32):
  name, enc = fp32
  ref = _ref(name)
  emb, mask = enc.encode(list(ref["prompts"]), int(ref["max_length"]))
  assert emb.dtype == jnp.float32 and mask.dtype == jnp.bool_
  assert emb.shape == ref["hidden_fp32"].shape
  err = float(np.max(np.abs(np.asarray(emb) - ref["hidden_fp32"])))
  print(f"{name} float32 max abs error: {err:.3g}")
  assert err <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_parity(name):
  ref = _ref(name)
  enc = TextEncoder.from_pretrained(os.path.join(FIXTURES, name), dtype="bfloat16")
  assert enc.params["params"]["token_embed"].dtype == jnp.bfloat16
  emb, _ = enc.encode(list(ref["prompts"]), int(ref["max_length"]))
  assert emb.dtype == jnp.bfloat16
  emb = np.asarray(emb, np.float32)
  err32 = float(np.max(np.abs(emb - ref["hidden_fp32"])))
  err16 = float(np.max(np.abs(emb - ref["hidden_bf16"])))
  ref_err = float(np.max(np.abs(ref["hidden_bf16"] - ref["hidden_fp32"])))
  scale = float(np.max(np.abs(ref["hidden_fp32"])))
  print(
    f"{name} bfloat16 max abs error: {err32:.3g} vs fp32 reference, "
    f"{err16:.3g} vs transformers bf16 (which is {ref_err:.3g} off fp32; "
    f"max |h| {scale:.3g})"
  )
  # bfloat16 keeps 8 mantissa bits: a few ulps at the largest magnitude.
  assert err32 <= 0.03 * scale
  assert err32 <= 2 * ref_err + 1e-2


def test_truncation_warns_once(fp32, caplog):
  _, enc = fp32
  with caplog.at_level(logging.WARNING, logger="imagen_jax.text.encoder"):
    enc.encode(["a red cube " * 20, "a", "two blue cones " * 20], max_length=8)
  msgs = [r.getMessage() for r in caplog.records]
  assert len(msgs) == 1 and msgs[0].startswith("2 of 3 prompts")


def test_decoder_not_read(monkeypatch):
  read = []
  get = loading.WeightsReader.get

  def spy(self, name):
    read.append(name)
    return get(self, name)

  monkeypatch.setattr(loading.WeightsReader, "get", spy)
  TextEncoder.from_pretrained(os.path.join(FIXTURES, "t5_v1_0"))
  assert read and not [n for n in read if n.startswith("decoder.")]


def test_sharded_index_checkpoint(tmp_path, fp32):
  """model.safetensors.index.json + shards load to the same embeddings."""
  name, enc = fp32
  src = os.path.join(FIXTURES, name)
  for f in os.listdir(src):
    if f != "model.safetensors":
      os.symlink(os.path.join(src, f), tmp_path / f)
  with safe_open(os.path.join(src, "model.safetensors"), "numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  keys = sorted(tensors)
  weight_map = {}
  for i, part in enumerate((keys[::2], keys[1::2])):
    shard = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({k: tensors[k] for k in part}, str(tmp_path / shard))
    weight_map.update({k: shard for k in part})
  with open(tmp_path / "model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  sharded = TextEncoder.from_pretrained(str(tmp_path))
  ref = _ref(name)
  a, _ = enc.encode(list(ref["prompts"]), int(ref["max_length"]))
  b, _ = sharded.encode(list(ref["prompts"]), int(ref["max_length"]))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
