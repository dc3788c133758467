"""Batched, jitted feature extraction split over a device mesh (Inception, CLIP).

``FeatureExtractor(apply_fn, variables, mesh=..., rules=...)`` runs
``apply_fn(variables, *arrays) -> [b, D]`` in fixed-size chunks (one compile),
each chunk's rows split over the mesh's batch axes as the cascade sampler
splits its batch (``parallel.batch_axes``) and the variables replicated. The
last chunk is padded by repeating its last row; padded rows are dropped.
"""

from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from imagen_jax import parallel


class FeatureExtractor:
  """Features of many inputs in fixed-size chunks under one jit, sharded by rows.

  Attributes:
    batch_size: rows per jitted call (a multiple of the mesh's batch split).
    num_shards: how many ways each chunk splits (1 without a mesh).
  """

  def __init__(
    self,
    apply_fn: Callable,
    variables: Any,
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    rules: Optional[Sequence] = None,
    batch_size: int = 64,
  ):
    """Builds the jitted extractor.

    Args:
      apply_fn: (variables, *arrays [b, ...]) -> features [b, D]; pure, jittable.
      variables: its weights (host arrays or jax Arrays); replicated on the mesh.
      mesh: optional mesh; rows split over its batch axes under ``rules``
        (default: ``parallel.BATCH_MESH_AXES``).
      rules: logical-axis rules (``parallel.logical_rules``).
      batch_size: rows per call, rounded up to a multiple of the split.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    axes, self.num_shards = parallel.batch_axes(mesh, rules)
    self.batch_size = -(-batch_size // self.num_shards) * self.num_shards
    self.mesh = mesh
    if mesh is None:
      self._rows = None
      self.variables = jax.device_put(variables)
      self._fn = jax.jit(apply_fn)
    else:
      replicated = NamedSharding(mesh, P())
      self._rows = NamedSharding(mesh, P(axes))
      self.variables = jax.device_put(variables, replicated)
      self._fn = jax.jit(apply_fn, out_shardings=self._rows)

  def _put(self, x: np.ndarray) -> jax.Array:
    return jax.device_put(x) if self._rows is None else jax.device_put(x, self._rows)

  def __call__(
    self, *arrays: np.ndarray, progress: bool = False, desc: str = "features"
  ) -> np.ndarray:
    """Features of every row.

    Args:
      *arrays: host arrays with the same leading size N (e.g. uint8 images
        [N, H, W, 3], or token ids [N, L] and a mask [N, L]).
      progress: a tqdm bar over chunks.
      desc: the bar's label.

    Returns:
      float32 [N, D] on the host.
    """
    n = len(arrays[0])
    if n == 0:
      raise ValueError("no inputs to extract features from")
    out = []
    for start in tqdm(range(0, n, self.batch_size), desc=desc, unit="batch", disable=not progress):
      chunk = [
        self._put(
          parallel.pad_rows(np.asarray(a[start : start + self.batch_size]), self.batch_size)
        )
        for a in arrays
      ]
      feats = self._fn(self.variables, *chunk)
      out.append(np.asarray(feats, np.float32)[: min(self.batch_size, n - start)])
    return np.concatenate(out)
