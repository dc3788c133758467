"""TextEncoder behaviour: random init, encode contract, retracing, bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.text import T5Config, TextEncoder

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = dict(
  vocab_size=384,
  d_model=32,
  d_kv=8,
  d_ff=64,
  num_layers=2,
  num_heads=4,
  relative_attention_num_buckets=16,
  relative_attention_max_distance=32,
)


@pytest.fixture(scope="module")
def tiny():
  return TextEncoder.random_init(TINY, seed=0)


def test_random_init_is_deterministic(tiny):
  again = TextEncoder.random_init(T5Config(**TINY), seed=0)
  other = TextEncoder.random_init(TINY, seed=1)
  a, _ = tiny.encode(["a red cube"], 12)
  b, _ = again.encode(["a red cube"], 12)
  c, _ = other.encode(["a red cube"], 12)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_default_random_init_shapes():
  enc = TextEncoder.random_init()
  assert enc.embed_dim == 128 and enc.config.num_layers == 4
  emb, mask = enc.encode(["x"], 4)
  assert emb.shape == (1, 4, 128)


def test_encode_contract(tiny):
  emb, mask = tiny.encode(["a red cube", ""], max_length=16)
  assert emb.shape == (2, 16, 32) and emb.dtype == jnp.float32
  assert mask.shape == (2, 16) and mask.dtype == jnp.bool_
  # ByT5: one token per byte plus EOS; "" is just EOS (the uncond prompt).
  np.testing.assert_array_equal(np.asarray(mask).sum(1), [11, 1])
  assert np.all(np.isfinite(np.asarray(emb)))
  # Prompts are encoded independently of their batch mates.
  alone, _ = tiny.encode(["a red cube"], max_length=16)
  np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(emb[0]), atol=1e-5)


def test_no_retrace_for_same_shape(tiny):
  tiny.encode(["one", "two"], 10)
  count = tiny.trace_count
  tiny.encode(["three", "four"], 10)
  tiny.encode(["a much longer prompt", ""], 10)
  assert tiny.trace_count == count
  tiny.encode(["one", "two", "three"], 10)  # New batch size: one new trace.
  assert tiny.trace_count == count + 1


def test_bfloat16_random_init(tiny):
  enc = TextEncoder.random_init(TINY, seed=0, dtype=jnp.bfloat16)
  emb, _ = enc.encode(["a red cube"], 12)
  ref, _ = tiny.encode(["a red cube"], 12)
  assert emb.dtype == jnp.bfloat16
  err = np.max(np.abs(np.asarray(emb, np.float32) - np.asarray(ref)))
  assert err < 0.1


@pytest.mark.parametrize(
  "prompts, error", [([], ValueError), ("a string", TypeError), ([1, 2], TypeError)]
)
def test_bad_prompts(tiny, prompts, error):
  with pytest.raises(error, match="prompt"):
    tiny.encode(prompts, 8)


@pytest.mark.parametrize("dtype", ["float16", jnp.int32, "fp64", None])
def test_unknown_dtype(dtype):
  with pytest.raises(ValueError, match="unknown dtype"):
    TextEncoder.random_init(TINY, dtype=dtype)


def _copy(tmp_path, name="t5_v1_0"):
  dst = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), dst)
  return dst


def test_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    TextEncoder.from_pretrained(str(tmp_path / "nope"))


def test_missing_config(tmp_path):
  d = _copy(tmp_path)
  os.remove(d / "config.json")
  with pytest.raises(FileNotFoundError, match="config.json"):
    TextEncoder.from_pretrained(str(d))


def test_not_t5_config(tmp_path):
  d = _copy(tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["model_type"] = "bert"
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"config.json.*'bert'"):
    TextEncoder.from_pretrained(str(d))


def test_missing_weights(tmp_path):
  d = _copy(tmp_path)
  os.rename(d / "model.safetensors", d / "pytorch_model.bin")
  with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model"):
    TextEncoder.from_pretrained(str(d))


def test_missing_encoder_tensor(tmp_path):
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  d = _copy(tmp_path)
  with safe_open(str(d / "model.safetensors"), "numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  missing = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
  del tensors[missing]
  save_file(tensors, str(d / "model.safetensors"))
  with pytest.raises(KeyError, match=missing.replace(".", r"\.")):
    TextEncoder.from_pretrained(str(d))


def test_wrong_tensor_shape(tmp_path):
  d = _copy(tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["d_ff"] = 32
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="DenseReluDense.wi.weight.*shape"):
    TextEncoder.from_pretrained(str(d))


def test_missing_tokenizer(tmp_path):
  d = _copy(tmp_path)
  for f in ("tokenizer.json", "tokenizer_config.json"):
    os.remove(d / f)
  with pytest.raises(FileNotFoundError, match="tokenizer"):
    TextEncoder.from_pretrained(str(d))


def test_config_defaults_follow_transformers(tmp_path):
  """A config.json without feed_forward_proj is T5 v1.0 (ReLU), as in HF."""
  d = _copy(tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  for key in ("feed_forward_proj", "dense_act_fn", "is_gated_act", "layer_norm_epsilon"):
    cfg.pop(key)
  (d / "config.json").write_text(json.dumps(cfg))
  enc = TextEncoder.from_pretrained(str(d))
  assert not enc.config.is_gated_act and enc.config.dense_act_fn == "relu"
  assert enc.config.layer_norm_epsilon == 1e-6


def test_import_is_light():
  """Importing the package pulls in neither transformers nor torch."""
  code = (
    "import sys, imagen_jax.text; "
    "assert 'transformers' not in sys.modules, 'transformers'; "
    "assert 'torch' not in sys.modules, 'torch'"
  )
  subprocess.run([sys.executable, "-c", code], check=True)


def test_random_init_rejects_unknown_fields():
  with pytest.raises(ValueError, match="d_modle"):
    TextEncoder.random_init(dict(d_modle=64))
