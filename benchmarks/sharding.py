"""Sharding strategies compared on one cascade stage's real, jitted train step.

(Over 400 lines: one benchmark: its row, the per-strategy compile-and-run, the table
and the CLI; the TPU-topology mode goes through ``imagen_jax.train.aot``.)

  python -m benchmarks.sharding --config configs/demo.py --stage base --devices 8 \\
      --strategies dp,fsdp,tp,fsdp_tp [--batch 32] [--grad_accum 1,2,4] [--json out.json] \\
      [--remat none,full,dots_saveable,save_attention_out] \\
      [--config.stages.base.model.dtype=bfloat16]

For each strategy the stage's train step (``imagen_jax.train.step``, the one
``train.py`` runs) is compiled ahead of time on a mesh of the first N devices,
then run on random data. One row per strategy (per strategy and remat policy
with ``--remat``: the stage's ``model.remat`` set to each policy in turn):

* step time: the median of ``--steps`` steps after ``--warmup`` steps, and images/s;
* per-device bytes: params + EMA + optimizer state as placed (exact, from the
  shardings), and the compiled program's argument / temporary bytes and peak
  estimate (XLA's memory analysis);
* collective bytes per step and device: the operand sizes of every all-gather,
  reduce-scatter, all-reduce, all-to-all and collective-permute in the compiled
  HLO module, found by opcode in its instructions (``imagen_jax.parallel.hlo``;
  each instruction counted once: ops inside a loop body are not multiplied by
  the trip count);
* compile time (lowering + XLA);
* model FLOPs per step (XLA's cost analysis of the unpartitioned step with
  rematerialization off, so recomputation is not counted) → achieved TFLOP/s,
  and MFU when the device's peak is known (bf16 dense peaks; see ``PEAK_FLOPS``).

``--grad_accum K1,K2,...`` runs every strategy once per K (``train.grad_accum``:
the batch in K microbatches inside the step), to show the per-device memory
falling with K; a batch that does not split over dp × K is an error row.

Meshes: dp = (data N), fsdp = (fsdp N), tp = (data N/T, tensor T),
fsdp_tp = (fsdp N/T, tensor T), T = ``--tensor`` (default 2). A strategy whose
compiled program exceeds the device memory, or whose run fails with an
out-of-memory error, is reported as such; the other rows still run.

``--topology v5p:4x4x4 [--num_slices N] [--attention_impl xla]`` (needs libtpu)
compiles every row for that TPU topology's chips instead and runs nothing: per
chip the state bytes, the TPU compiler's argument / temporary / peak bytes
against the chip's HBM (a row that does not fit says by how much), collective
bytes, model FLOPs, and the compiler's estimated step time, images/s per chip
and MFU (``imagen_jax.train.aot``; ``benchmarks.topology_rows`` prints them).

On a CPU, ``--devices N`` makes N host devices (XLA's
``--xla_force_host_platform_device_count``); they share the machine's cores, so
their step times compare the strategies' overheads, not a pod's speed.
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import sys
import time
import types
from typing import Any, Optional, Sequence


def _requested_devices(argv: Sequence[str]) -> Optional[int]:
  for i, arg in enumerate(argv):
    if arg.startswith("--devices="):
      return int(arg.split("=", 1)[1])
    if arg == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
  return None


if __name__ == "__main__":
  # Must happen before jax is imported: N fake host devices on a CPU.
  _n = _requested_devices(sys.argv[1:])
  if _n:
    _flags = re.sub(
      r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    )
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={_n}".strip()

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks.common import cpu_model, markdown_table  # noqa: E402
from imagen_jax import cli  # noqa: E402
from imagen_jax import config as config_lib  # noqa: E402
from imagen_jax import parallel  # noqa: E402
from imagen_jax.parallel import hlo  # noqa: E402
from imagen_jax.models.unet import REMAT_POLICIES  # noqa: E402
from imagen_jax.stages import Stage, build_stage  # noqa: E402
from imagen_jax.train import optim, state as state_lib, step as step_lib  # noqa: E402

STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp")

# Dense bf16 peak FLOP/s per chip, by a substring of ``device.device_kind``
# (first match wins, so the more specific names come first).
PEAK_FLOPS = (
  ("H100 PCIe", 756e12),
  ("H100", 989.4e12),
  ("H200", 989.4e12),
  ("GH200", 989.4e12),
  ("B200", 2250e12),
  ("A100", 312e12),
  ("L4", 121e12),
  ("TPU v4", 275e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
  ("TPU v5", 459e12),
  ("TPU v6 lite", 918e12),
  ("TPU v6e", 918e12),
)


def peak_flops(device_kind: str) -> Optional[float]:
  """The known dense bf16 peak of one chip, or None (CPUs, unknown chips)."""
  for name, flops in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return flops
  return None


def mesh_shape(strategy: str, num_devices: int, tensor: int) -> dict[str, int]:
  """The mesh of a strategy on N devices (see the module docstring)."""
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown strategy {strategy!r}; expected some of {STRATEGIES}")
  if strategy == "dp":
    return {"data": num_devices}
  if strategy == "fsdp":
    return {"fsdp": num_devices}
  if tensor < 1 or num_devices % tensor:
    raise ValueError(f"--tensor={tensor} does not divide {num_devices} devices")
  outer = "data" if strategy == "tp" else "fsdp"
  return {outer: num_devices // tensor, "tensor": tensor}


@dataclasses.dataclass
class Row:
  """One strategy's measurements (bytes per device unless named total)."""

  strategy: str
  mesh: dict
  remat: Optional[str] = None  # the stage's remat policy when --remat was given
  status: str = "ok"  # 'ok', 'does not fit: ...', 'OOM: ...', 'error: ...'
  batch: int = 0
  grad_accum: int = 1
  step_s: Optional[float] = None  # median step time
  step_s_min: Optional[float] = None
  images_per_s: Optional[float] = None
  compile_s: Optional[float] = None
  state_bytes: int = 0  # params + EMA + optimizer state on one device
  state_bytes_total: int = 0  # the same, whole (all devices together)
  state_ratio: Optional[float] = None  # state_bytes / (total / N); 1.0 = perfectly split
  argument_bytes: Optional[int] = None
  temp_bytes: Optional[int] = None
  peak_bytes: Optional[int] = None  # argument + output - aliased + temporaries
  collective_bytes: dict = dataclasses.field(default_factory=dict)
  model_flops: Optional[float] = None  # per step, all devices together
  tflops_per_s: Optional[float] = None  # achieved model TFLOP/s, all devices
  mfu: Optional[float] = None


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
  )


def _batch_abstract(batch: int, stage: Stage, text_len: int, text_dim: int, shardings: Any) -> dict:
  r = stage.resolution
  return {
    "image": jax.ShapeDtypeStruct((batch, r, r, 3), jnp.uint8, sharding=shardings["image"]),
    "text_emb": jax.ShapeDtypeStruct(
      (batch, text_len, text_dim), jnp.float32, sharding=shardings["text_emb"]
    ),
    "text_mask": jax.ShapeDtypeStruct(
      (batch, text_len), jnp.bool_, sharding=shardings["text_mask"]
    ),
  }


def _random_batch(abstract: dict, seed: int = 0) -> dict:
  rs = np.random.RandomState(seed)
  image = abstract["image"]
  b, l = abstract["text_mask"].shape
  host = {
    "image": rs.randint(0, 256, image.shape).astype(np.uint8),
    "text_emb": rs.randn(*abstract["text_emb"].shape).astype(np.float32),
    "text_mask": np.arange(l)[None, :].repeat(b, 0) < rs.randint(1, l + 1, (b, 1)),
  }
  return {k: jax.device_put(v, abstract[k].sharding) for k, v in host.items()}


def _uncond(text_len: int, text_dim: int, sharding) -> dict:
  return {
    "text_emb": jax.device_put(np.zeros((text_len, text_dim), np.float32), sharding),
    "text_mask": jax.device_put(np.arange(text_len) < 1, sharding),
  }


def _step_setup(
  config: Any, stage_name: str, batch: int, mesh, rules, seed: int = 0
) -> types.SimpleNamespace:
  """The stage's jitted train step and the arguments to lower it with (abstract
  state and batch, concrete rng and empty-caption text), on ``mesh`` or on none."""
  stage = build_stage(config.stages[stage_name])
  tc = config_lib.stage_train_config(config, stage_name)
  tx = optim.make_optimizer(tc)
  text_len, text_dim = int(config.text.max_length), int(config.text.dim)
  shardings, abstract = state_lib.state_shardings(stage, tx, mesh, rules, text_len)
  step_fn = step_lib.jit_train_step(stage, tx, tc, shardings, mesh, rules, optim.lr_schedule(tc))
  replicated = None if mesh is None else NamedSharding(mesh, P())
  batch_shardings = step_lib.batch_shardings(mesh) or dict.fromkeys(
    ("image", "text_emb", "text_mask")
  )
  batch_abs = _batch_abstract(batch, stage, text_len, text_dim, batch_shardings)
  rng = jax.device_put(jax.random.PRNGKey(seed), replicated)
  uncond = _uncond(text_len, text_dim, replicated)
  return types.SimpleNamespace(
    stage=stage,
    tx=tx,
    text_len=text_len,
    abstract=abstract,
    shardings=shardings,
    step_fn=step_fn,
    batch=batch_abs,
    rng=rng,
    uncond=uncond,
    args=(abstract if mesh is None else _abstract(abstract, shardings), batch_abs, rng, uncond),
  )


def with_remat(config: Any, stage_name: str, policy: str) -> Any:
  """A copy of ``config`` whose stage rematerializes with ``policy`` (a
  ``imagen_jax.models.unet.REMAT_POLICIES`` name)."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {policy!r}; expected some of {sorted(REMAT_POLICIES)}")
  cfg = config.copy_and_resolve_references()
  model = cfg.stages[stage_name].model
  with cfg.unlocked():
    if "remat" in model:  # the key may hold a bool (older configs): retype it
      del model["remat"]
    model.remat = policy
  return cfg


def model_flops(config: Any, stage_name: str, batch: int) -> Optional[float]:
  """FLOPs of one train step of the whole batch, rematerialization off (XLA cost model)."""
  setup = _step_setup(with_remat(config, stage_name, "none"), stage_name, batch, None, None)
  cost = setup.step_fn.lower(*setup.args).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def bench_strategy(
  config: Any,
  stage_name: str,
  strategy: str,
  devices: Sequence[jax.Device],
  *,
  batch: int,
  tensor: int = 2,
  steps: int = 5,
  warmup: int = 2,
  flops: Optional[float] = None,
  seed: int = 0,
  remat: Optional[str] = None,
  grad_accum: int = 1,
) -> Row:
  """Compiles and runs the stage's train step under one strategy (and remat
  policy, when given) with K microbatches; never raises for OOM."""
  n = len(devices)
  row = Row(
    strategy=strategy,
    mesh=mesh_shape(strategy, n, tensor),
    batch=batch,
    remat=remat,
    grad_accum=grad_accum,
  )
  if remat is not None:
    config = with_remat(config, stage_name, remat)
  mesh = parallel.make_mesh({"shape": row.mesh}, devices)
  _, dp = parallel.batch_axes(mesh)
  if batch % (dp * grad_accum):
    row.status = (
      f"error: batch {batch} does not split over the {dp} data-parallel "
      f"devices × {grad_accum} microbatches"
    )
    return row
  if grad_accum != 1:
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.train.grad_accum = grad_accum
  rules = parallel.logical_rules(strategy)
  setup = _step_setup(config, stage_name, batch, mesh, rules, seed)
  row.state_bytes = hlo.tree_bytes(setup.abstract, setup.shardings)
  row.state_bytes_total = hlo.tree_bytes(setup.abstract)
  row.state_ratio = row.state_bytes / (row.state_bytes_total / n)
  try:
    t0 = time.perf_counter()
    compiled = setup.step_fn.lower(*setup.args).compile()
    row.compile_s = time.perf_counter() - t0
  except Exception as err:  # pylint: disable=broad-except
    row.status = ("OOM at compile: " if hlo.is_oom(err) else "error at compile: ") + str(
      err
    ).splitlines()[0][:200]
    return row
  mem = hlo.memory(compiled)
  if mem is not None:
    row.argument_bytes, row.temp_bytes, row.peak_bytes = mem["argument"], mem["temp"], mem["peak"]
  row.collective_bytes = hlo.collective_bytes(compiled)
  limit = _memory_limit(devices[0], n)
  if limit and row.peak_bytes and row.peak_bytes > limit:
    row.status = (
      f"does not fit: needs ~{row.peak_bytes / 2**30:.1f} GiB per device, "
      f"{limit / 2**30:.1f} GiB available"
    )
    return row
  try:
    state, _ = state_lib.create_train_state(
      jax.random.PRNGKey(seed), setup.stage, setup.tx, mesh, rules, setup.text_len
    )
    data = _random_batch(setup.batch, seed)
    times = []
    for i in range(warmup + steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, data, setup.rng, setup.uncond, None)
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        times.append(time.perf_counter() - t0)
    if not np.isfinite(float(metrics["loss"])):
      row.status = "error: non-finite loss"
    del state
  except Exception as err:  # pylint: disable=broad-except
    if not hlo.is_oom(err):
      raise
    row.status = "OOM at run: " + str(err).splitlines()[0][:200]
    return row
  row.step_s = float(np.median(times))
  row.step_s_min = float(np.min(times))
  row.images_per_s = batch / row.step_s
  if flops:
    row.model_flops = flops
    row.tflops_per_s = flops / row.step_s / 1e12
    peak = peak_flops(devices[0].device_kind)
    if peak:
      row.mfu = flops / row.step_s / (peak * n)
  return row


def _memory_limit(device: jax.Device, num_devices: int = 1) -> Optional[int]:
  """Bytes one device may use: its allocator's limit, or for host (CPU) devices,
  which share the machine's memory, MemAvailable / num_devices."""
  if device.platform == "cpu":
    try:
      with open("/proc/meminfo") as f:
        for line in f:
          if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 // max(num_devices, 1)
    except OSError:
      return None
    return None
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def machine_description(devices: Sequence[jax.Device]) -> str:
  d = devices[0]
  if d.platform == "cpu":
    return f"{len(devices)} host devices (fake) on {cpu_model()}, {os.cpu_count()} cores"
  return f"{len(devices)} × {d.device_kind}"


def _mib(x: Optional[int]) -> str:
  return "—" if x is None else f"{x / 2**20:.1f}"


def format_table(rows: Sequence[Row]) -> str:
  with_remat_col = any(r.remat is not None for r in rows)
  head = (
    ("strategy",)
    + (("remat",) if with_remat_col else ())
    + (
      "mesh",
      "accum",
      "step ms",
      "img/s",
      "compile s",
      "state MiB/dev",
      "state ×(total/N)",
      "temp MiB",
      "peak MiB",
      "collective MiB/step",
      "TFLOP/s",
      "MFU",
      "status",
    )
  )
  table = []
  for r in rows:
    coll = sum(r.collective_bytes.values()) if r.collective_bytes else None
    kinds = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in r.collective_bytes.items() if v)
    cells = (
      r.strategy,
      *((r.remat,) if with_remat_col else ()),
      "×".join(f"{k} {v}" for k, v in r.mesh.items()),
      str(r.grad_accum),
      "—" if r.step_s is None else f"{1e3 * r.step_s:.1f}",
      "—" if r.images_per_s is None else f"{r.images_per_s:.1f}",
      "—" if r.compile_s is None else f"{r.compile_s:.1f}",
      _mib(r.state_bytes),
      "—" if r.state_ratio is None else f"{r.state_ratio:.3f}",
      _mib(r.temp_bytes),
      _mib(r.peak_bytes),
      "—" if coll is None else (f"{coll / 2**20:.1f}" + (f" ({kinds})" if kinds else "")),
      "—" if r.tflops_per_s is None else f"{r.tflops_per_s:.3f}",
      "—" if r.mfu is None else f"{100 * r.mfu:.1f}%",
      r.status,
    )
    table.append(cells)
  return markdown_table(head, table)


def _versions() -> dict:
  import flax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel

  return {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
  }


def run(
  config: Any,
  stage_name: Optional[str],
  strategies: Sequence[str],
  *,
  num_devices: Optional[int] = None,
  batch: Optional[int] = None,
  tensor: int = 2,
  steps: int = 5,
  warmup: int = 2,
  remats: Optional[Sequence[str]] = None,
  grad_accum: Sequence[int] = (1,),
  progress=print,
) -> tuple[dict, list[Row]]:
  """Benchmarks the strategies (× ``remats`` policies when given, × microbatch
  counts); returns (meta: the run's settings and machine, rows)."""
  stage_name = stage_name or config.stage_order[0]
  if stage_name not in config.stages:
    raise ValueError(f"no stage {stage_name!r} in the config; it has {list(config.stages)}")
  unknown = [s for s in strategies if s not in STRATEGIES]
  if unknown:
    raise ValueError(f"unknown strategies {unknown}; expected some of {STRATEGIES}")
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(
        f"--devices={num_devices} but only {len(devices)} {devices[0].platform} devices are present"
      )
    devices = devices[:num_devices]
  batch = int(batch or config.train.batch_size)
  flops = model_flops(config, stage_name, batch)
  bad = [p for p in remats or () if p not in REMAT_POLICIES]
  if bad:
    raise ValueError(f"unknown remat policies {bad}; expected some of {sorted(REMAT_POLICIES)}")
  rows = []
  for remat in remats or (None,):
    for strategy in strategies:
      for k in grad_accum:
        progress(
          f"[{stage_name}] {strategy}{'' if remat is None else ', remat ' + remat}"
          f", grad_accum={k} ..."
        )
        rows.append(
          bench_strategy(
            config,
            stage_name,
            strategy,
            devices,
            batch=batch,
            tensor=tensor,
            steps=steps,
            warmup=warmup,
            flops=flops,
            remat=remat,
            grad_accum=int(k),
          )
        )
  meta = {
    "stage": stage_name,
    "batch": batch,
    "devices": len(devices),
    "machine": machine_description(devices),
    "device_kind": devices[0].device_kind,
    "date": datetime.date.today().isoformat(),
    "versions": _versions(),
    "steps": steps,
    "warmup": warmup,
    "model_flops_per_step": flops,
    "command": " ".join(
      [os.path.basename(sys.executable), "-m", "benchmarks.sharding"] + sys.argv[1:]
    ),
  }
  return meta, rows


def _csv(text: Optional[str]) -> Optional[list]:
  return None if text is None else [v.strip() for v in text.split(",") if v.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.sharding", description=__doc__.split("\n")[0]
  )
  cli.add_config_arg(p)
  p.add_argument("--stage", help="stage to benchmark (default: the first)")
  p.add_argument("--devices", type=int, help="use the first N devices (CPU: N fake devices)")
  p.add_argument("--strategies", default=",".join(STRATEGIES), help="strategies to compare")
  p.add_argument("--batch", type=int, help="global batch (default: config.train)")
  p.add_argument("--tensor", type=int, default=2, help="tensor-parallel size of tp and fsdp_tp")
  p.add_argument("--steps", type=int, default=5, help="timed steps per strategy")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  p.add_argument(
    "--remat",
    help="remat policies to compare (rows per policy; some of "
    f"{sorted(REMAT_POLICIES)}); default: the config's",
  )
  p.add_argument("--grad_accum", default="1", help="microbatch counts K to compare, e.g. 1,2,4")
  p.add_argument("--json", help="also write the results to this JSON file")
  p.add_argument(
    "--topology",
    help="compile for this TPU topology instead of running here (e.g. v5p:4x4x4; needs libtpu)",
  )
  p.add_argument("--num_slices", type=int, default=1, help="--topology: number of slices")
  p.add_argument(
    "--attention_impl",
    help="--topology: the stage's model.attention_impl for the compile (default: the config's)",
  )
  try:
    args, rest = p.parse_known_args(argv)
    config = cli.config_from_args(args, rest)
    if args.topology:
      return topology_main(args, config)
    meta, rows = run(
      config,
      args.stage,
      _csv(args.strategies),
      num_devices=args.devices,
      batch=args.batch,
      tensor=args.tensor,
      steps=args.steps,
      warmup=args.warmup,
      remats=_csv(args.remat),
      grad_accum=[int(k) for k in _csv(args.grad_accum)],
    )
  except (cli.UsageError, ValueError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  print(
    f"\n{meta['command']}\n{meta['date']}, {meta['machine']}, stage {meta['stage']}, "
    f"batch {meta['batch']}, jax {meta['versions']['jax']}, "
    f"model FLOPs/step {meta['model_flops_per_step'] or 0:.3e}\n"
  )
  print(format_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
  return 0


def topology_main(args, config) -> int:
  """``--topology``: every (remat, strategy, grad_accum) row compiled for the TPU
  topology (``imagen_jax.train.aot``), nothing run; ValueError for bad input."""
  from benchmarks import topology_rows  # pylint: disable=import-outside-toplevel
  from imagen_jax.parallel import topology as topo_lib  # pylint: disable=import-outside-toplevel
  from imagen_jax.train import aot  # pylint: disable=import-outside-toplevel

  topo = topo_lib.parse(args.topology, args.num_slices)
  stage = args.stage or config.stage_order[0]
  if stage not in config.stages:
    raise ValueError(
      f"--stage={stage!r} is not a stage of the config; it has {list(config.stages)}"
    )
  batch = int(args.batch or config.train.batch_size)
  remats = _csv(args.remat) or [None]
  bad = [r for r in remats if r is not None and r not in REMAT_POLICIES]
  if bad:
    raise ValueError(f"--remat: unknown policies {bad}; expected some of {sorted(REMAT_POLICIES)}")
  plans = []
  for strategy in _csv(args.strategies):
    mesh = topo_lib.strategy_mesh(strategy, topo.chips, args.tensor)
    topo_lib.check_mesh(mesh, topo)
    for k in (int(k) for k in _csv(args.grad_accum)):
      topo_lib.check_batch(batch, aot.dp_size(mesh), k)
      plans += [(r, strategy, mesh, k) for r in remats]
  devices = topo_lib.devices(topo)
  print(f"model FLOPs of the {stage} step at batch {batch} ...", flush=True)
  flops = aot.model_flops(config, stage, batch)
  rows = []
  for remat, strategy, mesh, k in tqdm.tqdm(plans, desc=f"compile for {topo.name}", unit="row"):
    row, _ = aot.compile_train(
      config, stage, topo, devices, mesh, parallel.logical_rules(strategy),
      strategy=strategy, batch=batch, grad_accum=k, remat=remat, flops=flops,
      attn=args.attention_impl,
    )  # fmt: skip
    tqdm.tqdm.write(f"  {strategy} accum={k} remat={remat or 'config'}: {row.status}")
    rows.append(row)
    if args.json:  # rows so far, should a later one take too long
      topology_rows.write_json(_topology_meta(args, stage, batch, flops), rows, args.json)
  topology_rows.report(_topology_meta(args, stage, batch, flops), rows, args.json)
  return 0


def _topology_meta(args, stage: str, batch: int, flops) -> dict:
  from benchmarks import topology_rows  # pylint: disable=import-outside-toplevel

  extra = {"stage": stage, "batch": batch, "num_slices": args.num_slices, "model_flops": flops}
  extra["attention_impl"] = args.attention_impl or "config"
  return topology_rows.meta("benchmarks.sharding", args.topology, extra)


if __name__ == "__main__":
  sys.exit(main())
