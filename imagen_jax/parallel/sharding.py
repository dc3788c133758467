"""The device mesh and the logical-axis rule presets (dp, fsdp, tp, fsdp_tp).

Parameters and activations carry logical axis names (``imagen_jax.axes``); a
strategy is a rules table mapping those names to the mesh axes
``('data', 'fsdp', 'tensor')``. The same model code runs under every strategy;
only the table changes.
"""

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from imagen_jax import axes

MESH_AXES = ("data", "fsdp", "tensor")
# The mesh axes that split the batch (activations, data, samples) by default.
BATCH_MESH_AXES = ("data", "fsdp")

_BATCH_RULES = ((axes.BATCH, BATCH_MESH_AXES),)
_NEVER_SHARDED = (
  (axes.LENGTH, None),
  (axes.HEIGHT, None),
  (axes.WIDTH, None),
  (axes.KERNEL, None),
  (axes.NORM, None),
  (axes.KV, None),
  (axes.RELPOS, None),
)

STRATEGIES = {
  # Parameters and optimizer state replicated on every device.
  "dp": (),
  # Parameters and optimizer state split along their widest model axis.
  "fsdp": (
    (axes.EMBED, "fsdp"),
    (axes.TEXT_EMBED, "fsdp"),
    (axes.VOCAB, "fsdp"),
    (axes.MLP, "fsdp"),
    (axes.HEADS, "fsdp"),
  ),
  # Megatron-style: hidden channels, heads and vocabulary split over `tensor`.
  "tp": ((axes.MLP, "tensor"), (axes.HEADS, "tensor"), (axes.VOCAB, "tensor")),
  "fsdp_tp": (
    (axes.MLP, "tensor"),
    (axes.HEADS, "tensor"),
    (axes.VOCAB, "tensor"),
    (axes.EMBED, "fsdp"),
    (axes.TEXT_EMBED, "fsdp"),
  ),
}


def logical_rules(strategy: str) -> tuple[tuple[str, Any], ...]:
  """Returns the logical-axis → mesh-axis rules of a named strategy.

  Args:
    strategy: one of ``STRATEGIES`` ('dp', 'fsdp', 'tp', 'fsdp_tp').

  Returns:
    A tuple of ``(logical_name, mesh_axis or None)`` pairs for
    ``nn.logical_axis_rules`` / ``nn.logical_to_mesh_sharding``. A logical name
    listed several times takes the first rule whose mesh axis is still free
    inside one array (flax's semantics), so fallbacks come after preferences.
  """
  if strategy not in STRATEGIES:
    raise ValueError(
      f"unknown sharding strategy {strategy!r}; expected one of {sorted(STRATEGIES)}"
    )
  return _BATCH_RULES + STRATEGIES[strategy] + _NEVER_SHARDED


def _parse_mesh_axes(value: Any, name: str) -> Any:
  """A rule's right-hand side from a config: None/'' → None, 'a,b' → ('a', 'b')."""
  if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
    return None
  names = tuple(v.strip() for v in value.split(",")) if isinstance(value, str) else tuple(value)
  bad = [n for n in names if n not in MESH_AXES]
  if bad:
    raise ValueError(
      f"config.mesh.rules.{name}: unknown mesh axes {bad}; expected names from {MESH_AXES}"
    )
  return names[0] if len(names) == 1 else names


def config_rules(mesh_config: Any) -> tuple[tuple[str, Any], ...]:
  """The rules of ``config.mesh``: its strategy's preset, with ``mesh.rules`` first.

  ``config.mesh.rules`` maps logical names to mesh axes and overrides the
  preset: a string ``'mlp=tensor;embed=none'`` (several axes: ``'batch=data,fsdp'``),
  as given on the command line with ``--config.mesh.rules=...``, or a mapping.
  """
  overrides = mesh_config.get("rules", None) or {}
  if isinstance(overrides, str):
    items = [r.split("=", 1) for r in overrides.split(";") if r.strip()]
    if any(len(i) != 2 for i in items):
      raise ValueError(
        f"config.mesh.rules={overrides!r}: expected 'name=axes;name=axes', "
        "e.g. 'mlp=tensor;embed=none'"
      )
    overrides = {k.strip(): v for k, v in items}
  overrides = dict(overrides)
  unknown = [k for k in overrides if k not in axes.ALL]
  if unknown:
    raise ValueError(
      f"config.mesh.rules: unknown logical axes {unknown}; expected names from {axes.ALL}"
    )
  first = tuple((k, _parse_mesh_axes(v, k)) for k, v in overrides.items())
  return first + logical_rules(mesh_config.strategy)


def batch_axes(mesh: Optional[jax.sharding.Mesh], rules: Sequence = ()) -> tuple:
  """(mesh axes the batch is split over, their total size) under the rules.

  Without rules, the default ``BATCH_MESH_AXES``; without a mesh, ((), 1).
  """
  if mesh is None:
    return (), 1
  entry = nn.logical_to_mesh_axes((axes.BATCH,), tuple(rules or _BATCH_RULES))[0]
  names = (entry,) if isinstance(entry, str) else tuple(entry or ())
  return names, int(np.prod([mesh.shape[a] for a in names]))


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  """Pads [b, ...] to [size, ...] by repeating the last row (a batch that must split
  evenly over the mesh's batch axes; the caller cuts the extra rows off)."""
  if len(x) == size:
    return x
  return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


def batch_sharding(mesh: Optional[jax.sharding.Mesh], rules: Sequence = ()) -> Any:
  """The NamedSharding that splits an array's leading (batch) axis; None without a mesh."""
  if mesh is None:
    return None
  names, _ = batch_axes(mesh, rules)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(names))


def _resolve_shape(shape: Mapping[str, int], num_devices: int) -> list[int]:
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  unknown = [a for a in shape if a not in MESH_AXES]
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; expected a subset of {MESH_AXES}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(shape)}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
        f"{num_devices} devices do not divide by the fixed mesh "
        f"axes {dict(shape)} (product {known})"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs "
      f"{int(np.prod(sizes))} devices, {num_devices} are present"
    )
  return sizes


def make_mesh(
  mesh_config: Any = None, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh.

  Args:
    mesh_config: a mapping or ConfigDict with ``shape`` ({axis: size}, one size
      may be -1 for "the rest"); missing axes have size 1. ``None`` puts every
      device on ``data`` (plain data parallelism).
    devices: devices to use (default: all of ``jax.devices()``).

  Returns:
    A ``jax.sharding.Mesh`` with axis names ``MESH_AXES``.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = {"data": -1}
  if mesh_config is not None:
    shape = dict(mesh_config.get("shape", None) or shape)
  sizes = _resolve_shape(shape, len(devices))
  device_array = np.asarray(devices, dtype=object).reshape(sizes)
  return jax.sharding.Mesh(device_array, MESH_AXES)


def fit_sharding(sharding: Any, shape: tuple[int, ...]) -> Any:
  """Drops mesh axes from the dimensions they do not divide (those replicate).

  A 3-channel conv or a 12-wide test embedding cannot split 8 ways; replicating
  that one dimension is better than failing the whole placement.
  """
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  for dim, entry in enumerate(spec):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    size = int(np.prod([sharding.mesh.shape[n] for n in names]))
    if names and shape[dim] % size:
      spec[dim] = None
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def logical_shardings(abstract: Any, mesh: Optional[jax.sharding.Mesh], rules) -> Any:
  """Per-leaf ``NamedSharding``s from the logical names of a boxed abstract tree.

  Args:
    abstract: a pytree whose leaves may be ``nn.Partitioned`` boxes (e.g. from
      ``jax.eval_shape`` of an init that returns boxed params); unboxed leaves
      are replicated.
    mesh: the device mesh, or None.
    rules: logical-axis rules, e.g. ``logical_rules('fsdp')``.

  Returns:
    A pytree with the structure of ``nn.unbox(abstract)`` holding shardings
    (None everywhere when ``mesh`` is None).
  """
  plain = nn.unbox(abstract)
  if mesh is None:
    return jax.tree.map(lambda _: None, plain)
  specs = nn.get_partition_spec(abstract)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, tuple(rules or ()))
  return jax.tree.map(lambda s, a: fit_sharding(s, a.shape), shardings, plain)


# XLA:CPU spends seconds optimizing run-once init programs (threefry hashes);
# unoptimized code compiles several times faster and draws the same numbers.
_CPU_INIT_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_init(
  init_fn, rng: jax.Array, out_shardings: Any = None, mesh: Optional[jax.sharding.Mesh] = None
) -> Any:
  """Runs a one-off init function jitted with ``out_shardings`` (created sharded).

  On CPU it compiles with optimizations off: init runs once, compiles dominate.
  """
  jitted = jax.jit(init_fn, out_shardings=out_shardings)
  devices = list(mesh.devices.flat) if mesh is not None else jax.devices()
  opts = _CPU_INIT_OPTIONS if all(d.platform == "cpu" for d in devices) else {}
  return jitted.lower(rng).compile(compiler_options=opts)(rng)
