"""diffusers IF UNet tensors ↔ our UNet parameter tree: names, layouts, checks.

Every parameter of our UNet (from ``jax.eval_shape`` of its init) has exactly
one diffusers tensor (``diffusers_name``); the converter walks OUR tree, so a
checkpoint tensor that no parameter claims, or a parameter whose tensor is
absent, is an error, as is any shape that does not fit.

Layouts (PyTorch → Flax):
  conv weight  [O, I, kh, kw] → kernel [kh, kw, I, O]
  linear       [out, in]      → kernel [in, out] (reshaped when our kernel
               splits heads: q/k/v [C, heads, dh], out [heads, dh, C])
  biases, norm weights/biases, the pooling position embedding: as stored
  (biases reshaped to our bias shape).
``to_torch`` is the exact inverse of ``to_flax`` (the export direction).
"""

import math
import re
from typing import Any, Iterator

import numpy as np

_TOP = {
  "conv_in": "conv_in",
  "time_embed": "time_embedding",
  "aug_embed": "class_embedding",
  "text_proj": "encoder_hid_proj",
  "norm_out": "conv_norm_out",
  "conv_out": "conv_out",
}
_POOL = {
  "norm_in": "norm1",
  "norm_out": "norm2",
  "proj": "proj",
  "q": "pool.q_proj",
  "k": "pool.k_proj",
  "v": "pool.v_proj",
}
_RES = {
  "norm1": "norm1",
  "conv1": "conv1",
  "time_proj": "time_emb_proj",
  "norm2": "norm2",
  "conv2": "conv2",
  "skip": "conv_shortcut",
}
_ATTN = {
  "norm": "group_norm",
  "text_norm": "norm_cross",
  "q": "to_q",
  "k": "to_k",
  "v": "to_v",
  "text_k": "add_k_proj",
  "text_v": "add_v_proj",
  "out": "to_out.0",
}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _block_prefix(module: str, num_levels: int) -> tuple[str, dict]:
  """Our block module name → (diffusers prefix, sub-module name table)."""
  m = re.fullmatch(r"(down|up)(\d+)_(\d+)_(res|attn)", module)
  if m:
    side, lvl, i, kind = m.groups()
    block = int(lvl) if side == "down" else num_levels - 1 - int(lvl)
    sub = "resnets" if kind == "res" else "attentions"
    return f"{side}_blocks.{block}.{sub}.{i}", _RES if kind == "res" else _ATTN
  m = re.fullmatch(r"(down|up)(\d+)_(downsample|upsample)", module)
  if m:
    side, lvl, which = m.groups()
    block = int(lvl) if side == "down" else num_levels - 1 - int(lvl)
    return f"{side}_blocks.{block}.{which}rs.0", _RES
  named = {
    "mid_res0": ("mid_block.resnets.0", _RES),
    "mid_res1": ("mid_block.resnets.1", _RES),
    "mid_attn": ("mid_block.attentions.0", _ATTN),
  }
  if module in named:
    return named[module]
  raise KeyError(module)


def diffusers_name(path: tuple[str, ...], num_levels: int) -> str:
  """The diffusers tensor name of one of our parameters.

  Args:
    path: our parameter path, e.g. ('down1_0_attn', 'text_k', 'kernel').
    num_levels: len(config.channels) (diffusers numbers up blocks from the bottom).

  Raises:
    KeyError: a parameter with no diffusers counterpart (a UNet option the
      converter does not know).
  """
  try:
    head, rest = path[0], path[1:]
    if head == "text_pool":
      if rest == ("pos_embed",):
        return "add_embedding.pool.positional_embedding"
      return f"add_embedding.{_POOL[rest[0]]}.{_LEAF[rest[1]]}"
    if head in _TOP:
      if head in ("time_embed", "aug_embed"):
        return f"{_TOP[head]}.{rest[0]}.{_LEAF[rest[1]]}"
      return f"{_TOP[head]}.{_LEAF[rest[0]]}"
    prefix, table = _block_prefix(head, num_levels)
    return f"{prefix}.{table[rest[0]]}.{_LEAF[rest[1]]}"
  except (KeyError, IndexError):
    raise KeyError(
      f"our UNet parameter {'/'.join(path)} has no diffusers counterpart known to the converter"
    ) from None


def _is_conv(path: tuple[str, ...], shape: tuple[int, ...]) -> bool:
  return path[-1] == "kernel" and len(shape) == 4


def torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape that converts to our parameter ``shape``."""
  if _is_conv(path, shape):
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  if path[-1] == "kernel":
    if len(shape) == 3 and path[-2] == "out":  # [heads, dh, C] ← [C, heads·dh]
      return (shape[2], shape[0] * shape[1])
    if len(shape) == 3:  # [C, heads, dh] ← [heads·dh, C]
      return (shape[1] * shape[2], shape[0])
    return (shape[1], shape[0])
  if path[-1] == "bias":
    return (math.prod(shape),)
  return tuple(shape)


def to_flax(path: tuple[str, ...], tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Converts one diffusers tensor (already shape-checked) to our layout."""
  if _is_conv(path, shape):
    return np.transpose(tensor, (2, 3, 1, 0))
  if path[-1] == "kernel":
    return np.transpose(tensor).reshape(shape)
  return tensor.reshape(shape)


def to_torch(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  """Converts one of our parameters back to its diffusers layout (``to_flax``⁻¹).

  Args:
    path: our parameter path (decides conv / linear / other).
    array: the parameter in our layout.

  Returns:
    The tensor in PyTorch layout, of shape ``torch_shape(path, array.shape)``.
  """
  shape = torch_shape(path, tuple(array.shape))
  if _is_conv(path, array.shape):
    return np.transpose(array, (3, 2, 0, 1))
  if path[-1] == "kernel":
    return np.transpose(array.reshape(shape[::-1]))
  return array.reshape(shape)


def flat_params(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
  """(path, leaf) pairs of a nested dict, depth first in insertion order."""
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      yield from flat_params(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def plan(abstract: Any, num_levels: int, keys: set[str], shape_of) -> list:
  """Matches our parameters to checkpoint tensors before anything is read.

  Args:
    abstract: our unboxed abstract parameter tree (ShapeDtypeStructs).
    num_levels: len(config.channels).
    keys: the checkpoint's tensor names.
    shape_of: name → stored shape (header only).

  Returns:
    [(our path, diffusers name, our shape)] in tree order.

  Raises:
    KeyError: tensors missing from the checkpoint, or checkpoint tensors that
      map to no parameter (all named).
    ValueError: a tensor whose shape does not fit (tensor and both shapes named).
  """
  items = [(p, diffusers_name(p, num_levels), tuple(a.shape)) for p, a in flat_params(abstract)]
  wanted = {name for _, name, _ in items}
  missing = sorted(wanted - keys)
  if missing:
    raise KeyError(
      f"{len(missing)} tensor(s) missing from the checkpoint: "
      f"{missing[:20]}{' ...' if len(missing) > 20 else ''}"
    )
  unmapped = sorted(keys - wanted)
  if unmapped:
    raise KeyError(
      f"{len(unmapped)} checkpoint tensor(s) map to no parameter of the UNet "
      f"built from unet/config.json: {unmapped[:20]}"
      f"{' ...' if len(unmapped) > 20 else ''}"
    )
  for path, name, shape in items:
    stored, expected = tuple(shape_of(name)), torch_shape(path, shape)
    if stored != expected:
      raise ValueError(
        f"shape mismatch: tensor {name!r} has shape {stored} in the "
        f"checkpoint, but unet/config.json implies {expected} (our "
        f"parameter {'/'.join(path)} {shape})"
      )
  return items
