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
``ml_dtypes.bfloat16`` arrays (NumPy has no bfloat16 of its own). A damaged
file (zero bytes, truncated, a bad index) is a one-line ``ValueError`` naming
the file. ``write_safetensors`` is the other direction: it streams tensors into
one file without holding them all in memory.
"""

import json
import os
from typing import Iterable, Optional, Sequence

import ml_dtypes
import numpy as np
from safetensors import safe_open

WEIGHTS_NAME = "diffusion_pytorch_model"


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def _size(file: str) -> str:
  try:
    return str(os.path.getsize(file))
  except OSError:
    return "unknown"


def _read_index(file: str) -> dict[str, str]:
  """A sharded checkpoint's ``weight_map`` (tensor name → shard path), validated."""
  path = os.path.dirname(file)
  try:
    with open(file) as f:
      index = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{file}: not valid JSON ({_one_line(e)})") from None
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{file}: no 'weight_map' (tensor name -> shard file) in the index")
  bad = [k for k, v in weight_map.items() if not isinstance(v, str)]
  if bad:
    raise ValueError(f"{file}: weight_map entries that name no file: {bad[:5]}")
  return {k: os.path.join(path, v) for k, v in weight_map.items()}


def _candidates(variant: Optional[str], weights_name: str) -> list[tuple[str, str]]:
  """(kind, file name) pairs to look for, in order of preference."""
  names = []
  for v in [variant] if variant else [None, "fp16"]:
    infix = f".{v}" if v else ""
    names.append(("single", f"{weights_name}{infix}.safetensors"))
    names.append(("index", f"{weights_name}.safetensors.index{infix}.json"))
  return names


class WeightsReader:
  """Lazy access to the safetensors weights of one model folder.

  Use as a context manager; each file is opened (memory-mapped) on first use.
  """

  def __init__(self, path: str, variant: Optional[str] = None, weights_name: str = WEIGHTS_NAME):
    """Finds the weight files.

    Args:
      path: the model folder (e.g. ``<pipeline>/unet``).
      variant: None (full precision, falling back to the fp16 variant) or a
        variant name such as 'fp16' (only that variant).
      weights_name: the files' stem: 'diffusion_pytorch_model' (diffusers) or
        'model' (transformers).

    Raises:
      FileNotFoundError: no safetensors weights, or the index names a missing shard.
      ValueError: an index that is not JSON or has no ``weight_map``.
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
        self._weight_map = _read_index(file)
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
      raise FileNotFoundError(f"no safetensors weights in {path}: expected one of {wanted}{hint}")
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
      try:
        self._handles[file] = safe_open(file, framework="numpy").__enter__()
      except Exception as e:  # SafetensorError (not importable by name), OSError
        raise ValueError(
          f"{file}: not a readable safetensors file ({_one_line(e)}; size {_size(file)} bytes)"
        ) from None
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

  def _open_for(self, name: str):
    """(file, open handle) of the file holding ``name``."""
    file = self._file_of(name)
    handle = self._handle(file)
    if self._weight_map is not None and name not in handle.keys():
      raise KeyError(f"{self.source} maps tensor {name!r} to {file}, which does not hold it")
    return file, handle

  def shape(self, name: str) -> tuple[int, ...]:
    """A tensor's shape, read from its file's header (no data is read)."""
    return tuple(self._open_for(name)[1].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    """Reads one tensor into host memory in its stored dtype.

    Returns:
      A NumPy array; BF16 tensors as ``ml_dtypes.bfloat16``.
    """
    file, handle = self._open_for(name)
    try:
      array = handle.get_tensor(name)
    except Exception as e:  # a file changed or damaged after it was opened
      raise ValueError(f"{file}: cannot read tensor {name!r} ({_one_line(e)})") from None
    if handle.get_slice(name).get_dtype() == "BF16" and array.dtype != ml_dtypes.bfloat16:
      # Older safetensors return the raw 16-bit words for BF16.
      array = array.view(ml_dtypes.bfloat16)
    return array


# safetensors dtype names of the NumPy dtypes we write.
_DTYPE_NAMES = {
  np.dtype(np.float32): "F32",
  np.dtype(np.float16): "F16",
  np.dtype(ml_dtypes.bfloat16): "BF16",
  np.dtype(np.float64): "F64",
  np.dtype(np.int64): "I64",
  np.dtype(np.int32): "I32",
}


def write_safetensors(
  file: str,
  specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
  tensors: Iterable[np.ndarray],
  metadata: Optional[dict] = None,
) -> int:
  """Writes one safetensors file, one tensor at a time.

  The format is an 8-byte little-endian header length, a JSON header (dtype,
  shape and byte range of every tensor), then the raw little-endian bytes, in
  header order. Knowing every shape up front lets the header go first, so only
  one tensor is ever held here.

  Args:
    file: the output path (overwritten).
    specs: [(name, shape, dtype)] in the order ``tensors`` yields them.
    tensors: the arrays, matching ``specs`` exactly (checked).
    metadata: optional string → string ``__metadata__``.

  Returns:
    The number of bytes written.

  Raises:
    ValueError: a tensor whose shape or dtype differs from its spec, or too few.
  """
  header, offset = {}, 0
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  for name, shape, dtype in specs:
    dtype = np.dtype(dtype)
    end = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {
      "dtype": _DTYPE_NAMES[dtype],
      "shape": [int(d) for d in shape],
      "data_offsets": [offset, end],
    }
    offset = end
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the reference writer aligns the data to 8 bytes
  with open(file, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    count = 0
    for (name, shape, dtype), array in zip(specs, tensors, strict=False):  # counted below
      array = np.asarray(array)
      if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
        raise ValueError(
          f"{file}: tensor {name!r} is {array.dtype}{list(array.shape)}, "
          f"expected {np.dtype(dtype)}{list(shape)}"
        )
      f.write(
        np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
      )
      count += 1
    if count != len(specs):
      raise ValueError(f"{file}: {len(specs)} tensors announced, {count} written")
  return 8 + len(blob) + offset
