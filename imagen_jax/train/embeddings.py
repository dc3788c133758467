"""Precomputed caption embeddings for training (``config.text.precomputed=True``).

  python -m imagen_jax.train.embeddings --config configs/demo.py [--config.data.data_dir=D]

encodes every distinct caption of the training split, and the empty caption,
once with the config's frozen T5, and writes them as an embedding cache
(``imagen_jax.text.cache``) to ``embed_dir(config)``. A run with
``--config.text.precomputed=True`` then looks its captions up there instead of
running the encoder in the train step (cheaper steps, for users who prefer to
pay the encoder once). It lives above ``data/`` and ``text/`` (both leaves),
since it needs both.
"""

import argparse
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np

from imagen_jax import cli
from imagen_jax.data import datasets
from imagen_jax.text import TextEncoder
from imagen_jax.text import cache as cache_lib


def embed_dir(config: Any) -> str:
  """``config.text.embed_dir``, or DATA_DIR/embeddings/NAME/SPLIT by default."""
  return config.text.get("embed_dir") or os.path.join(
    os.fspath(config.data.data_dir), "embeddings", config.data.name, config.data.split
  )


def dataset_captions(config: Any) -> list[str]:
  """The distinct captions of the training split, sorted, plus '' (unconditional)."""
  d = config.data
  builder = datasets.load_builder(d.name, d.data_dir, **dict(d.builder_kwargs))
  datasets.require_prepared(builder)
  source = builder.as_data_source(split=d.split)
  captions = {""}
  for i in range(len(source)):
    c = source[i]["caption"]
    captions.add(c.decode("utf-8") if isinstance(c, bytes) else str(c))
  return sorted(captions)


def write(config: Any, encoder: Any = None) -> str:
  """Encodes the dataset's captions and writes the cache; returns its directory."""
  encoder = encoder or TextEncoder.from_config(config.text)
  return cache_lib.write_embedding_cache(
    encoder, dataset_captions(config), embed_dir(config), int(config.text.max_length)
  )


class CaptionEmbeddings:
  """Caption → (embedding [L, D], mask [L]) from a cache written by ``write``."""

  def __init__(self, config: Any):
    directory = embed_dir(config)
    try:
      self._cache = cache_lib.EmbeddingCache(directory)
    except FileNotFoundError:
      raise FileNotFoundError(
        f"config.text.precomputed=True but {directory} holds no embedding cache; write "
        f"it with: python -m imagen_jax.train.embeddings --config <config>"
      ) from None
    want = (int(config.text.max_length), int(config.text.dim))
    if (self._cache.max_length, self._cache.dim) != want:
      raise ValueError(
        f"{directory} holds embeddings of length {self._cache.max_length} "
        f"and width {self._cache.dim}, config.text asks for {want}: "
        "re-run python -m imagen_jax.train.embeddings"
      )
    self.directory = directory
    self._index = {c: i for i, c in enumerate(self._cache.captions())}

  def lookup(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(emb [B, L, D] float32, mask [B, L] bool) of the captions."""
    missing = [c for c in captions if c not in self._index]
    if missing:
      raise KeyError(
        f"{len(missing)} captions are not in the embedding cache "
        f"{self.directory} (first: {missing[0]!r}); re-run python -m "
        "imagen_jax.train.embeddings"
      )
    emb, mask = self._cache.get([self._index[c] for c in captions])
    return np.asarray(emb, np.float32), np.asarray(mask, bool)


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m imagen_jax.train.embeddings",
    description="Caches the caption embeddings of a config's data.",
  )
  cli.add_config_arg(p)
  try:
    args, rest = p.parse_known_args(argv)
    out = write(cli.config_from_args(args, rest))
  except cli.UsageError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  except (FileNotFoundError, ValueError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  print(f"wrote {out}; train with --config.text.precomputed=True")
  return 0


if __name__ == "__main__":
  sys.exit(main())
