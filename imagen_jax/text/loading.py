"""Reading Hugging Face T5 checkpoint directories without PyTorch.

A checkpoint directory holds ``config.json`` and either ``model.safetensors``
or a sharded ``model.safetensors.index.json`` with its shard files. Tensors are
read one at a time (safetensors with numpy), converted to the Flax layout,
cast, and placed on device with their target sharding before the next one is
read, so a T5-XXL checkpoint never has two copies in host memory. Decoder
tensors are never read.
"""

import json
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from imagen_jax.safetensors_dir import WeightsReader
from imagen_jax.text.t5 import T5Config

CONFIG_FILE = "config.json"
WEIGHTS_NAME = "model"  # model[.fp16].safetensors or its sharded index
# Hugging Face model types whose encoder is the plain T5 encoder.
T5_MODEL_TYPES = ("t5", "mt5")
# transformers' `T5Config` defaults, for keys an (old) config.json leaves out.
HF_DEFAULTS = dict(
  vocab_size=32128,
  d_model=512,
  d_kv=64,
  d_ff=2048,
  num_layers=6,
  num_heads=8,
  relative_attention_num_buckets=32,
  relative_attention_max_distance=128,
  layer_norm_epsilon=1e-6,
  feed_forward_proj="relu",
)
_POSITIVE_INTS = (
  "vocab_size",
  "d_model",
  "d_kv",
  "d_ff",
  "num_layers",
  "num_heads",
  "relative_attention_num_buckets",
  "relative_attention_max_distance",
)


def read_config(path: str) -> T5Config:
  """Reads and validates ``config.json`` of a Hugging Face T5 directory.

  Args:
    path: the checkpoint directory.

  Returns:
    The encoder's `T5Config`.

  Raises:
    FileNotFoundError: no directory or no config.json.
    ValueError: the config is not a T5 config.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"T5 checkpoint directory {path!r} does not exist")
  config_file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(
      f"{config_file} not found: a Hugging Face T5 directory needs config.json"
    )
  try:
    with open(config_file) as f:
      raw = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{config_file} is not valid JSON: {' '.join(str(e).split())}") from None
  if not isinstance(raw, dict):
    raise ValueError(f"{config_file} holds a JSON {type(raw).__name__}, not a config object")
  model_type = raw.get("model_type")
  if model_type not in T5_MODEL_TYPES:
    raise ValueError(
      f"{config_file}: model_type={model_type!r} is not a T5 "
      f"encoder (expected one of {T5_MODEL_TYPES})"
    )
  merged = {**HF_DEFAULTS, **raw}
  bad = [
    f"{k}={merged[k]!r}"
    for k in _POSITIVE_INTS
    if not isinstance(merged[k], int) or isinstance(merged[k], bool) or merged[k] < 1
  ]
  if not isinstance(merged["layer_norm_epsilon"], (int, float)):
    bad.append(f"layer_norm_epsilon={merged['layer_norm_epsilon']!r}")
  if not isinstance(merged["feed_forward_proj"], str):
    bad.append(f"feed_forward_proj={merged['feed_forward_proj']!r}")
  if bad:
    raise ValueError(
      f"{config_file}: invalid T5 settings {', '.join(bad)} (sizes must be positive integers)"
    )
  try:
    return T5Config.from_dict(merged)
  except (TypeError, ValueError, KeyError) as e:
    raise ValueError(f"{config_file}: {' '.join(str(e).split())}") from None


# Converters from a Hugging Face tensor to the Flax layout, given the config.
def _linear_in(c: T5Config) -> Callable[[np.ndarray], np.ndarray]:
  # q/k/v: torch [H*K, D] -> [D, H, K].
  return lambda w: w.T.reshape(c.d_model, c.num_heads, c.d_kv)


def _linear_out(c: T5Config) -> Callable[[np.ndarray], np.ndarray]:
  # o: torch [D, H*K] -> [H, K, D].
  return lambda w: w.T.reshape(c.num_heads, c.d_kv, c.d_model)


def _identity(w: np.ndarray) -> np.ndarray:
  return w


def _transpose(w: np.ndarray) -> np.ndarray:
  return w.T


def hf_name_map(c: T5Config) -> dict[tuple[str, ...], tuple[tuple[str, ...], Callable]]:
  """Maps each Flax parameter path to (HF tensor name candidates, converter).

  Args:
    c: the encoder config.

  Returns:
    ``{flax_path: (names, fn)}``; the first name present in the checkpoint is
    read and ``fn`` turns it into the Flax layout.
  """
  m = {
    ("token_embed",): (("encoder.embed_tokens.weight", "shared.weight"), _identity),
    ("relpos_bias",): (
      ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
      _identity,
    ),
    ("final_norm", "scale"): (("encoder.final_layer_norm.weight",), _identity),
  }
  wis = ("wi_0", "wi_1") if c.is_gated_act else ("wi",)
  for i in range(c.num_layers):
    pre = f"encoder.block.{i}.layer"
    blk = f"block_{i}"
    for p in ("q", "k", "v"):
      m[(blk, "attn", p)] = ((f"{pre}.0.SelfAttention.{p}.weight",), _linear_in(c))
    m[(blk, "attn", "o")] = ((f"{pre}.0.SelfAttention.o.weight",), _linear_out(c))
    m[(blk, "attn_norm", "scale")] = ((f"{pre}.0.layer_norm.weight",), _identity)
    m[(blk, "mlp_norm", "scale")] = ((f"{pre}.1.layer_norm.weight",), _identity)
    for p in wis + ("wo",):
      m[(blk, "mlp", p)] = ((f"{pre}.1.DenseReluDense.{p}.weight",), _transpose)
  return m


def _flat_items(tree: Mapping[str, Any], prefix=()) -> Iterator:
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flat_items(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def load_params(
  path: str, config: T5Config, abstract_params: Any, shardings: Any, param_dtype: Any
) -> dict:
  """Streams encoder weights from a checkpoint into (sharded) device arrays.

  Args:
    path: the checkpoint directory.
    config: its config (decides the name map and reshapes).
    abstract_params: unboxed ``{'params': ...}`` ShapeDtypeStructs.
    shardings: matching pytree of shardings (or None: default device).
    param_dtype: storage dtype of the loaded parameters.

  Returns:
    ``{'params': ...}`` with one device array per parameter.

  Raises:
    KeyError: a needed encoder tensor is missing (named in the message).
    ValueError: a tensor has the wrong shape for the config, or a weights file
      is damaged (the file named).
  """
  names = hf_name_map(config)
  flat_shard = dict(_flat_items(shardings["params"])) if shardings else {}
  out = {}
  with WeightsReader(path, weights_name=WEIGHTS_NAME) as reader:
    keys = reader.keys()
    for fpath, abstract in _flat_items(abstract_params["params"]):
      candidates, convert = names[fpath]
      found = [n for n in candidates if n in keys]
      if not found:
        raise KeyError(f"encoder tensor {candidates[0]!r} is missing from {reader.source}")
      stored = reader.get(found[0])
      try:
        w = convert(stored)
      except ValueError:  # a reshape that cannot fit
        w = None
      if w is None or w.shape != abstract.shape:
        raise ValueError(
          f"tensor {found[0]!r} in {reader.source} has shape "
          f"{tuple(stored.shape)}, which does not convert to the "
          f"{tuple(abstract.shape)} that config.json implies"
        )
      w = np.ascontiguousarray(w.astype(np.dtype(param_dtype)))
      _set(out, fpath, jax.device_put(w, flat_shard.get(fpath)))
      del w
  return {"params": out}
