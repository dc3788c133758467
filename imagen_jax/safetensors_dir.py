"""Tensor-by-tensor reading of the safetensors weights of a Hugging Face folder.

A diffusers model folder (e.g. ``unet/``) holds its weights as one of

  diffusion_pytorch_model.safetensors                 single file
  diffusion_pytorch_model.safetensors.index.json      sharded (+ the shard files)
  diffusion_pytorch_model.fp16.safetensors            the "fp16" variant
  diffusion_pytorch_model.safetensors.index.fp16.json its sharded form

and a transformers checkpoint (e.g. T5) the same with ``model`` for
``diffusion_pytorch_model`` (``weights_name``). A dependency-free leaf: the text
encoder and the DeepFloyd IF converter both read through it.

``WeightsReader`` finds them, reads headers only until a tensor is asked for,
and returns one NumPy array at a time. bfloat16 tensors come back as
``ml_dtypes.bfloat16`` arrays (NumPy has no bfloat16 of its own).
"""

import json
import os
from typing import Optional

import ml_dtypes
import numpy as np
from safetensors import safe_open

WEIGHTS_NAME = "diffusion_pytorch_model"


def _candidates(variant: Optional[str], weights_name: str) -> list[tuple[str, str]]:
  """(kind, file name) pairs to look for, in order of preference."""
  names = []
  for v in ([variant] if variant else [None, "fp16"]):
    infix = f".{v}" if v else ""
    names.append(("single", f"{weights_name}{infix}.safetensors"))
    names.append(("index", f"{weights_name}.safetensors.index{infix}.json"))
  return names


class WeightsReader:
  """Lazy access to the safetensors weights of one model folder.

  Use as a context manager; each file is opened (memory-mapped) on first use.
  """

  def __init__(self, path: str, variant: Optional[str] = None,
               weights_name: str = WEIGHTS_NAME):
    """Finds the weight files.

    Args:
      path: the model folder (e.g. ``<pipeline>/unet``).
      variant: None (full precision, falling back to the fp16 variant) or a
        variant name such as 'fp16' (only that variant).
      weights_name: the files' stem: 'diffusion_pytorch_model' (diffusers) or
        'model' (transformers).

    Raises:
      FileNotFoundError: no safetensors weights, or the index names a missing shard.
    """
    self.path = path
    self._weight_map = None
    for kind, name in _candidates(variant, weights_name):
      file = os.path.join(path, name)
      if not os.path.isfile(file):
        continue
      self.source = file
      if kind == "single":
        self._files = [file]
      else:
        with open(file) as f:
          self._weight_map = {k: os.path.join(path, v)
                              for k, v in json.load(f)["weight_map"].items()}
        self._files = sorted(set(self._weight_map.values()))
        for shard in self._files:
          if not os.path.isfile(shard):
            raise FileNotFoundError(f"{file} names shard {shard}, which is missing")
      break
    else:
      found = sorted(os.listdir(path)) if os.path.isdir(path) else []
      others = [f for f in found if f.endswith((".bin", ".pt", ".ckpt", ".h5", ".msgpack"))]
      hint = f"; found {others}, but only safetensors is supported" if others else ""
      wanted = [n for _, n in _candidates(variant, weights_name)]
      raise FileNotFoundError(f"no safetensors weights in {path}: expected one of "
                              f"{wanted}{hint}")
    self._handles = {}
    self._keys = None

  def __enter__(self) -> "WeightsReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Closes every open file."""
    for h in self._handles.values():
      h.__exit__(None, None, None)
    self._handles = {}

  def _handle(self, file: str):
    if file not in self._handles:
      self._handles[file] = safe_open(file, framework="numpy").__enter__()
    return self._handles[file]

  def _file_of(self, name: str) -> str:
    if name not in self.keys():
      raise KeyError(f"tensor {name!r} not found in {self.source}")
    return self._files[0] if self._weight_map is None else self._weight_map[name]

  def keys(self) -> set[str]:
    """All tensor names (from the headers / index only)."""
    if self._keys is None:
      if self._weight_map is not None:
        self._keys = set(self._weight_map)
      else:
        self._keys = set(self._handle(self._files[0]).keys())
    return self._keys

  def shape(self, name: str) -> tuple[int, ...]:
    """A tensor's shape, read from its file's header (no data is read)."""
    return tuple(self._handle(self._file_of(name)).get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    """Reads one tensor into host memory in its stored dtype.

    Returns:
      A NumPy array; BF16 tensors as ``ml_dtypes.bfloat16``.
    """
    handle = self._handle(self._file_of(name))
    array = handle.get_tensor(name)
    if handle.get_slice(name).get_dtype() == "BF16" and array.dtype != ml_dtypes.bfloat16:
      # Older safetensors return the raw 16-bit words for BF16.
      array = array.view(ml_dtypes.bfloat16)
    return array
