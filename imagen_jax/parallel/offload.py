"""Moving a params pytree between accelerator memory and host memory, sharding kept.

JAX places an array in one of its devices' memory kinds: ``device`` (HBM) or
``pinned_host`` (host RAM the accelerator reads by DMA). ``to_host`` moves every
array of a tree to its devices' host memory under the same sharding (each process
keeps its own shards: multi-process meshes work unchanged); ``to_device`` moves it
back. The device buffers are freed once nothing else refers to the old arrays.

What it is for: a cascade whose text encoder and stages do not fit one chip together
(T5-XXL beside the paper's three UNets on a 16 GiB v5e, benchmarks.sampling's
``one_chip`` line) keeps the encoder in host memory except while it encodes
(``sample.py --offload text``).
"""

from typing import Any

import jax
import jax.numpy as jnp

HOST = "pinned_host"


def _device_kind(a: jax.Array) -> str:
  """The default memory kind of the devices an array lives on (``device`` on TPU/GPU/CPU)."""
  return next(iter(a.sharding.device_set)).default_memory().kind


def _move(tree: Any, kind_of) -> Any:
  def move(a):
    a = a if isinstance(a, jax.Array) else jnp.asarray(a)
    kind = kind_of(a)
    if a.sharding.memory_kind == kind:
      return a
    return jax.device_put(a, a.sharding.with_memory_kind(kind))

  return jax.block_until_ready(jax.tree.map(move, tree))


def to_host(tree: Any) -> Any:
  """Every array of ``tree`` in its devices' host memory, the same sharding (numpy leaves
  are first placed on the default device)."""
  return _move(tree, lambda a: HOST)


def to_device(tree: Any) -> Any:
  """Every array of ``tree`` back in its devices' own memory, the same sharding."""
  return _move(tree, _device_kind)


def on_host(tree: Any) -> bool:
  """Whether every array of ``tree`` is in host memory (True for an empty tree)."""
  leaves = jax.tree.leaves(tree)
  return all(isinstance(a, jax.Array) and a.sharding.memory_kind == HOST for a in leaves)


def device_bytes(tree: Any) -> int:
  """Bytes of ``tree``'s arrays held in accelerator memory (host-memory ones not counted),
  over all shards this process addresses."""
  total = 0
  for a in jax.tree.leaves(tree):
    if isinstance(a, jax.Array) and a.sharding.memory_kind != HOST:
      total += sum(s.data.nbytes for s in a.addressable_shards)
  return total
