"""An on-disk cache of text embeddings, so training need not run T5 every step.

Layout of a cache directory:

    index.json          {"num": N, "max_length": L, "dim": D, "dtype": ...,
                         "shards": [{"emb": "emb_00000.npy",
                                     "mask": "mask_00000.npy", "num": n}, ...]}
    captions.jsonl      one JSON string per line, in cache order
    emb_XXXXX.npy       [n, L, D] embeddings (bfloat16 stored as uint16 bits)
    mask_XXXXX.npy      [n, L] bool

Shards are plain .npy files read with memory mapping, so random access costs
one small read per example.
"""

import json
import os
from typing import Any, Sequence

import numpy as np

INDEX_FILE = "index.json"
CAPTIONS_FILE = "captions.jsonl"
_STORE_DTYPES = ("float32", "float16", "bfloat16")


def _bf16():
  import ml_dtypes  # pylint: disable=g-import-not-at-top

  return ml_dtypes.bfloat16


def _to_storage(emb: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "bfloat16":
    return np.asarray(emb).astype(_bf16()).view(np.uint16)
  return np.asarray(emb).astype(dtype)


def write_embedding_cache(
  encoder: Any,
  captions: Sequence[str],
  out_dir: str,
  max_length: int,
  *,
  batch_size: int = 64,
  shard_size: int = 4096,
  dtype: str = "float32",
) -> str:
  """Encodes every caption once and writes embeddings + masks to `out_dir`.

  Args:
    encoder: a `TextEncoder` (anything with ``encode(prompts, max_length)``
      and ``embed_dim``).
    captions: the N captions, in the order the cache will index them.
    out_dir: output directory (created; existing cache files are overwritten).
    max_length: L, tokens per caption.
    batch_size: captions per encoder call (the last batch is padded to keep
      one compiled shape).
    shard_size: captions per .npy shard.
    dtype: storage dtype: 'float32', 'float16' or 'bfloat16'.

  Returns:
    `out_dir`.
  """
  if dtype not in _STORE_DTYPES:
    raise ValueError(f"unknown cache dtype {dtype!r}; expected one of {_STORE_DTYPES}")
  captions = list(captions)
  if not captions:
    raise ValueError("captions is empty: nothing to cache")
  if shard_size % batch_size:
    raise ValueError(f"shard_size={shard_size} must be a multiple of batch_size={batch_size}")
  os.makedirs(out_dir, exist_ok=True)
  shards = []
  for start in range(0, len(captions), shard_size):
    chunk = captions[start : start + shard_size]
    embs, masks = [], []
    for b in range(0, len(chunk), batch_size):
      batch = chunk[b : b + batch_size]
      emb, mask = encoder.encode(batch + [""] * (batch_size - len(batch)), max_length)
      embs.append(_to_storage(np.asarray(emb)[: len(batch)], dtype))
      masks.append(np.asarray(mask)[: len(batch)])
    k = len(shards)
    entry = {"emb": f"emb_{k:05d}.npy", "mask": f"mask_{k:05d}.npy", "num": len(chunk)}
    np.save(os.path.join(out_dir, entry["emb"]), np.concatenate(embs))
    np.save(os.path.join(out_dir, entry["mask"]), np.concatenate(masks))
    shards.append(entry)
  with open(os.path.join(out_dir, CAPTIONS_FILE), "w") as f:
    for c in captions:
      f.write(json.dumps(c) + "\n")
  index = {
    "num": len(captions),
    "max_length": max_length,
    "dim": int(encoder.embed_dim),
    "dtype": dtype,
    "shards": shards,
  }
  with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
    json.dump(index, f, indent=1)
  return out_dir


class EmbeddingCache:
  """Random access to a cache written by `write_embedding_cache`.

  Attributes:
    path: the cache directory.
    max_length: L.
    dim: D.
    dtype: the storage dtype name.
  """

  def __init__(self, path: str):
    """Opens a cache directory (reads index.json only)."""
    index_file = os.path.join(path, INDEX_FILE)
    if not os.path.isfile(index_file):
      raise FileNotFoundError(f"{index_file} not found: not an embedding cache")
    with open(index_file) as f:
      index = json.load(f)
    self.path = path
    self.max_length = int(index["max_length"])
    self.dim = int(index["dim"])
    self.dtype = index["dtype"]
    self._shards = index["shards"]
    self._starts = np.cumsum([0] + [s["num"] for s in self._shards])
    self._arrays = {}

  def __len__(self) -> int:
    return int(self._starts[-1])

  def captions(self) -> list[str]:
    """All N captions, in cache order."""
    with open(os.path.join(self.path, CAPTIONS_FILE)) as f:
      return [json.loads(line) for line in f]

  def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    if k not in self._arrays:
      s = self._shards[k]
      self._arrays[k] = (
        np.load(os.path.join(self.path, s["emb"]), mmap_mode="r"),
        np.load(os.path.join(self.path, s["mask"]), mmap_mode="r"),
      )
    return self._arrays[k]

  def get(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Gathers examples.

    Args:
      indices: n example indices in [0, N).

    Returns:
      (emb [n, L, D] in the storage dtype (bfloat16 as ml_dtypes.bfloat16),
       mask [n, L] bool).
    """
    idx = np.asarray(indices, np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
      raise IndexError(f"cache index out of range [0, {len(self)})")
    shard_of = np.searchsorted(self._starts, idx, side="right") - 1
    embs, masks = [], []
    for i, k in zip(idx, shard_of):
      emb, mask = self._shard(int(k))
      j = int(i - self._starts[k])
      embs.append(emb[j])
      masks.append(mask[j])
    emb = np.stack(embs) if embs else np.zeros((0, self.max_length, self.dim))
    mask = np.stack(masks) if masks else np.zeros((0, self.max_length), bool)
    if self.dtype == "bfloat16":
      emb = emb.view(_bf16())
    return emb, mask

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """One example: (emb [L, D], mask [L] bool)."""
    emb, mask = self.get([i])
    return emb[0], mask[0]
