"""TPU topologies on any machine: names, their devices (no TPU needed) and chip specs.

``devices('v5p:4x4x4')`` returns the 64 chips of that slice as the TPU compiler
sees them, through ``jax.experimental.topologies`` and the ``libtpu`` wheel
(``pip install "jax[tpu]==<our jax>"``): nothing runs on them, but
``jax.jit(...).lower(...).compile()`` on a mesh of them runs the real TPU
compiler (``imagen_jax.train.aot``).

One device is one chip: v4 asks for the megacore chip config (one device per
chip, both TensorCores; as MaxText does), v5p chips are two-core devices by
default, v5e and v6e chips have one core. A topology smaller than a host (e.g.
``v5e:1x1``) gets host bounds of its own size.

Names: ``GEN:AxB`` or ``GEN:AxBxC``, GEN one of ``CHIPS`` (v4, v5e, v5p, v6e).
Everything here that can be checked without libtpu is (``parse``), so a bad
name is one line before anything loads.
"""

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip figures of a TPU generation."""

  name: str
  hbm_bytes: int  # HBM per chip
  peak_bf16_flops: float  # dense bf16 peak, FLOP/s per chip
  hbm_bytes_per_s: float  # HBM bandwidth per chip
  host_bounds: tuple  # chips per host (the topology API's default)
  chip_config: str = "default"  # 'megacore': one device per two-core chip (v4)


_GiB = 1 << 30
# Sources (Google Cloud TPU documentation, system architecture pages, read 2026-12):
# cloud.google.com/tpu/docs/v4 (32 GiB HBM2 at 1200 GB/s, 275 bf16 TFLOPs per chip),
# cloud.google.com/tpu/docs/v5e (16 GB HBM2 at 819 GB/s, 197 bf16 TFLOPs),
# cloud.google.com/tpu/docs/v5p (95 GB HBM2e at 2765 GB/s, 459 bf16 TFLOPs),
# cloud.google.com/tpu/docs/v6e (32 GB HBM at 1640 GB/s, 918 bf16 TFLOPs). The pages write GB
# for the HBM of v5e/v5p/v6e; the runtime reports it in GiB (16 GiB per v5e
# chip), so GiB is used throughout.
CHIPS = {
  "v4": Chip("v4", 32 * _GiB, 275e12, 1200e9, (2, 2, 1), "megacore"),
  "v5e": Chip("v5e", 16 * _GiB, 197e12, 819e9, (2, 2, 1)),
  "v5p": Chip("v5p", 95 * _GiB, 459e12, 2765e9, (2, 2, 1)),
  "v6e": Chip("v6e", 32 * _GiB, 918e12, 1640e9, (2, 2, 1)),
}

_NAME_RE = re.compile(r"^(v[0-9a-z]+):([0-9]+(?:x[0-9]+){1,2})$")


class TopologyError(ValueError):
  """A topology name or a mesh/batch that does not fit it (one line)."""


@dataclasses.dataclass(frozen=True)
class Topology:
  """A parsed topology name: ``chip`` generation, ``dims`` (3 ints), ``num_slices``."""

  name: str
  chip: Chip
  dims: tuple
  num_slices: int = 1

  @property
  def chips(self) -> int:
    """Chips in all slices together (= devices of ``devices``)."""
    return int(np.prod(self.dims)) * self.num_slices


def parse(name: str, num_slices: int = 1) -> Topology:
  """``'v5p:4x4x4'`` → Topology; TopologyError naming the value and what is accepted."""
  m = _NAME_RE.match(str(name).strip())
  accepted = f"GEN:AxB or GEN:AxBxC with GEN one of {sorted(CHIPS)}, e.g. v5p:4x4x4 or v5e:2x2"
  if not m:
    raise TopologyError(f"--topology={name!r} is not a topology name; expected {accepted}")
  gen, dims_text = m.groups()
  if gen not in CHIPS:
    raise TopologyError(f"--topology={name!r}: unknown TPU generation {gen!r}; expected {accepted}")
  dims = tuple(int(d) for d in dims_text.split("x"))
  if min(dims) < 1:
    raise TopologyError(f"--topology={name!r}: every dimension must be >= 1; expected {accepted}")
  if num_slices < 1:
    raise TopologyError(f"--num_slices={num_slices} must be >= 1")
  dims = dims + (1,) * (3 - len(dims))
  return Topology(str(name).strip(), CHIPS[gen], dims, int(num_slices))


def libtpu_available() -> bool:
  """Whether the TPU compiler (the ``libtpu`` package) is installed."""
  return importlib.util.find_spec("libtpu") is not None


def require_libtpu() -> None:
  """TopologyError (one line) where libtpu is absent."""
  if not libtpu_available():
    raise TopologyError(
      "compiling for a TPU topology needs libtpu, which is not installed; "
      'install it with: pip install "jax[tpu]==<the installed jax version>"'
    )


# libtpu, loaded for a compile-only topology on a machine without TPUs: without a
# worker list it prints an error line; and it takes a machine-wide lock file unless
# told that several processes may load it (nothing here owns a TPU).
_QUIET_ENV = {"TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def devices(topology: Topology) -> list:
  """The topology's devices (one per chip), in slice order; no TPU needed.

  Raises TopologyError where libtpu is absent or the TPU runtime refuses the shape.
  """
  require_libtpu()
  # Set only for this call: a TPU_WORKER_HOSTNAMES left in the environment reads as a
  # Cloud TPU pod to parallel.distributed (and to every train.py this process starts).
  added = [k for k in _QUIET_ENV if k not in os.environ]
  os.environ.update({k: _QUIET_ENV[k] for k in added})
  try:
    return _devices(topology)
  finally:
    for k in added:
      os.environ.pop(k, None)


def _devices(topology: Topology) -> list:
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  kwargs = {"chip_config_name": topology.chip.chip_config}
  bounds = tuple(min(d, b) for d, b in zip(topology.dims, topology.chip.host_bounds))
  if bounds != topology.chip.host_bounds:
    kwargs["chips_per_host_bounds"] = bounds
  if topology.num_slices > 1:
    kwargs["num_slices"] = topology.num_slices
  shape = "x".join(str(d) for d in topology.dims)
  try:
    desc = topologies.get_topology_desc(
      topology_name=f"{topology.chip.name}:{shape}", platform="tpu", **kwargs
    )
  except Exception as err:  # pylint: disable=broad-except
    raise TopologyError(
      f"--topology={topology.name!r}: the TPU runtime refuses it: {str(err).splitlines()[0]}"
    ) from None
  devs = list(desc.devices)
  return sorted(devs, key=lambda d: (getattr(d, "slice_index", 0), d.id))


def check_mesh(mesh_shape: dict, topology: Topology) -> None:
  """TopologyError unless the mesh axes multiply to the topology's chips."""
  sizes = [int(v) for v in mesh_shape.values()]
  if any(s < 1 for s in sizes) or math.prod(sizes) != topology.chips:
    raise TopologyError(
      f"mesh {dict(mesh_shape)} does not divide the {topology.chips} chips of "
      f"{topology.name}"
      + (f" × {topology.num_slices} slices" if topology.num_slices > 1 else "")
      + f"; its axis sizes must multiply to {topology.chips}"
    )


def check_batch(batch: int, data_parallel: int, grad_accum: int = 1) -> None:
  """TopologyError unless the global batch splits over dp × microbatches."""
  if batch < 1 or batch % (data_parallel * grad_accum):
    raise TopologyError(
      f"--batch={batch} does not divide over the data-parallel size {data_parallel}"
      + (f" × {grad_accum} microbatches" if grad_accum > 1 else "")
      + f"; use a multiple of {data_parallel * grad_accum}"
    )


def make_mesh(mesh_shape: dict, devs: Sequence) -> "object":
  """A ('data', 'fsdp', 'tensor') mesh over the topology's devices, laid out by
  ``jax.experimental.mesh_utils`` (physical neighbours on the inner axes)."""
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
  from imagen_jax import parallel  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel

  sizes = [int(mesh_shape.get(a, 1)) for a in parallel.MESH_AXES]
  try:
    arr = mesh_utils.create_device_mesh(sizes, list(devs), allow_split_physical_axes=True)
  except Exception:  # pylint: disable=broad-except
    return parallel.make_mesh({"shape": dict(zip(parallel.MESH_AXES, sizes))}, devs)
  return jax.sharding.Mesh(arr, parallel.MESH_AXES)


STRATEGY_NAMES = ("dp", "fsdp", "tp", "fsdp_tp")


def strategy_mesh(strategy: str, chips: int, tensor: int = 2) -> dict:
  """The mesh of a strategy on N chips: dp = (data N), fsdp = (fsdp N),
  tp = (data N/T, tensor T), fsdp_tp = (fsdp N/T, tensor T)."""
  if strategy not in STRATEGY_NAMES:
    raise TopologyError(f"unknown strategy {strategy!r}; expected some of {STRATEGY_NAMES}")
  if strategy == "dp":
    return {"data": chips}
  if strategy == "fsdp":
    return {"fsdp": chips}
  if tensor < 1 or chips % tensor:
    raise TopologyError(f"--tensor={tensor} does not divide the {chips} chips")
  return {("data" if strategy == "tp" else "fsdp"): chips // tensor, "tensor": tensor}


def config_mesh(mesh_config: Any, topology: Topology) -> dict:
  """``config.mesh.shape`` on the topology's chips (one size may be -1: the rest);
  TopologyError naming the mesh and the chips when it does not divide them."""
  shape = {k: int(v) for k, v in dict(mesh_config.get("shape", None) or {"data": -1}).items()}
  fixed = math.prod(v for v in shape.values() if v != -1)
  free = [k for k, v in shape.items() if v == -1]
  if len(free) > 1 or fixed < 1 or topology.chips % fixed:
    raise TopologyError(
      f"config.mesh.shape={shape} does not divide the {topology.chips} chips of "
      f"{topology.name}; its sizes (at most one -1) must multiply to a divisor of {topology.chips}"
    )
  if free:
    shape[free[0]] = topology.chips // fixed
  check_mesh(shape, topology)
  return shape
