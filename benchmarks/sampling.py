"""Compile and run time of a cascade's sampler, at several step counts.

  python -m benchmarks.sampling --config configs/demo.py --steps 25,50,100,200 \\
      [--batch 16] [--workdir runs/demo] [--json out.json]

Each step count gets a fresh ``Cascade`` (new stage objects, so every jitted
sampler loop is traced and compiled again) and samples ``--batch`` images
through every stage, all stages at that step count. Reported per stage: the
compile time (tracing + lowering + XLA, from JAX's compile events) and the run
time of the sampling itself. Whole loops are jitted, so compile time should
not grow with the step count.

Parameters come from ``--workdir`` (a trained run) or, without it, from a
random initialization: compile and run time do not depend on the values.

  python -m benchmarks.sampling --topology v5e:1x1 (--workdir RUN | --config C) \
      [--batch 4] [--steps 64] [--strategy dp] [--json out.json]

With ``--topology`` (needs libtpu) nothing runs: each stage's whole jitted
sampling loop (``Stage.sample`` with the stage's sample settings, guidance
doubling and low-res inputs as the cascade calls it) is compiled for the TPU
topology; reported per chip: params bytes, the compiler's argument / temporary /
peak bytes, HBM fit, and the compiler's estimated seconds per image batch (its
cost model counts the loop body once: × steps). The config is the run's
(``--workdir``) or ``--config``; only shapes are used, no weights are read.
"""

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
import tqdm

from benchmarks.common import cpu_model, markdown_table
from imagen_jax import cascade as cascade_lib
from imagen_jax import config as config_lib
from imagen_jax import run as run_lib
from imagen_jax.cascade.text import load_encoders
from imagen_jax.stages import build_stage, stage_text_dim


def random_params(config: Any, seed: int = 0) -> dict:
  """Stage name → randomly initialized params."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  out = {}
  for k, name in enumerate(config.stage_order):
    stage = build_stage(config.stages[name], text_dim=stage_text_dim(config, name))
    init = jax.jit(lambda r, s=stage: nn.unbox(s.init(r, int(config.text.max_length))))
    out[name] = init(jax.random.PRNGKey(seed + k))
  return out


def measure(
  config: Any,
  steps_list: Sequence[int],
  batch: int,
  workdir: Optional[str] = None,
  prompts: Optional[Sequence[str]] = None,
  progress: bool = False,
) -> list[dict]:
  """One row per step count: per-stage compile/run seconds and compile counts."""
  prompts = list(prompts or config.train.get("sample_prompts") or ("a red circle",))
  prompts = (prompts * batch)[:batch]
  if workdir:
    params = {
      n: run_lib.load_ema_params(
        workdir, build_stage(config.stages[n], text_dim=stage_text_dim(config, n))
      )[0]
      for n in config.stage_order
    }
  else:
    params = random_params(config)
  encoder = load_encoders(config)  # stage name → its text encoder (T5, or an SD stage's CLIP)
  rows = []
  for steps in steps_list:
    cascade = cascade_lib.Cascade(config, params, encoder)
    start = time.perf_counter()
    out = cascade.sample(prompts, jax.random.PRNGKey(0), steps=int(steps), progress=progress)
    wall = time.perf_counter() - start
    stages = {
      name: {"compile_s": t.compile_s, "run_s": t.run_s, "compiles": t.compiles}
      for name, t in out.timings.items()
    }
    rows.append(
      {
        "steps": int(steps),
        "batch": batch,
        "wall_s": wall,
        "stages": stages,
        "compile_s": sum(s["compile_s"] for s in stages.values()),
        "run_s": sum(s["run_s"] for s in stages.values()),
        "finite": bool(np.isfinite(out.final.astype(np.float32)).all()),
      }
    )
  return rows


def format_table(rows: Sequence[dict]) -> str:
  names = list(rows[0]["stages"]) if rows else []
  head = ["steps", "cascade compile s", "cascade run s"]
  for n in names:
    head += [f"{n} compile s", f"{n} run s"]
  table = []
  for r in rows:
    cells = [str(r["steps"]), f"{r['compile_s']:.1f}", f"{r['run_s']:.1f}"]
    for n in names:
      cells += [f"{r['stages'][n]['compile_s']:.1f}", f"{r['stages'][n]['run_s']:.1f}"]
    table.append(cells)
  return markdown_table(head, table)


def topology_main(args) -> int:
  """``--topology``: one compile per stage (``imagen_jax.train.aot.compile_sample``)."""
  from benchmarks import topology_rows  # pylint: disable=import-outside-toplevel
  from imagen_jax.parallel import topology as topo_lib  # pylint: disable=import-outside-toplevel
  from imagen_jax.train import aot  # pylint: disable=import-outside-toplevel

  topo = topo_lib.parse(args.topology, args.num_slices)
  config = (
    run_lib.read_config(args.workdir) if args.workdir else config_lib.load_config(args.config)
  )
  if args.param_dtype:  # params stored so, as `convert ... --dtype` writes them
    with config.unlocked():
      for name in config.stage_order:
        config.stages[name].model.param_dtype = args.param_dtype
  steps = [int(s) for s in args.steps.split(",") if s.strip()] if args.steps else [None]
  mesh = topo_lib.strategy_mesh(args.strategy, topo.chips)
  topo_lib.check_batch(args.batch, aot.dp_size(mesh))
  devices = topo_lib.devices(topo)
  rows = []
  encoders = list(aot.text_encoders(config)) if args.text else []
  plans = [(e, None) for e in encoders] + [(n, k) for k in steps for n in config.stage_order]
  for name, k in tqdm.tqdm(plans, desc=f"compile for {topo.name}", unit="program"):
    if name in encoders:
      row, _ = aot.compile_text(
        config, name, topo, devices, batch=args.batch, strategy=args.strategy
      )
    else:
      row, _ = aot.compile_sample(
        config, name, topo, devices, batch=args.batch, strategy=args.strategy, steps=k
      )
    tqdm.tqdm.write(f"  {row.kind} {name} steps={row.steps}: {row.status}")
    rows.append(row)
  extra = {"batch": args.batch, "source": args.workdir or args.config}
  extra["param_dtype"] = args.param_dtype or "the config's"
  topology_rows.report(
    topology_rows.meta("benchmarks.sampling", args.topology, extra), rows, args.json
  )
  print(one_chip(rows))
  return 0


def one_chip(rows: Sequence[Any]) -> str:
  """Whether the programs fit the chip: all resident (every encoder's and stage's params
  at once, plus the largest program's temporaries); else with the text encoders freed
  once the prompts are encoded (the stages' params resident); else only one program at a
  time (each program's params loaded for its turn, the others kept on the host). The
  middle and last answers are ``sample.py --offload text`` and ``--offload stages``."""
  done = [r for r in rows if r.peak_bytes is not None]
  if not done or len(done) < len(rows):
    return "one chip: not answered (a program did not compile)"
  hbm = done[0].hbm_bytes

  def resident(group):
    return sum(r.state_bytes for r in group) + max(r.peak_bytes - r.state_bytes for r in group)

  def gib(b):
    return f"{b / 2**30:.1f} GiB"

  stages = [r for r in done if r.kind != "text"]
  largest = max(done, key=lambda r: r.peak_bytes)
  every, staged = resident(done), resident(stages) if stages else 0
  if every <= hbm:
    how = "all programs resident at once"
  elif stages and len(stages) < len(done) and staged <= hbm and largest.peak_bytes <= hbm:
    how = (
      f"with the text encoders freed after encoding (the stages together {gib(staged)}; "
      "sample.py --offload text)"
    )
  elif largest.peak_bytes <= hbm:
    how = (
      "only one program at a time (the others' params offloaded to the host; "
      "sample.py --offload stages)"
    )
  else:
    how = f"no: {largest.kind} {largest.stage} alone needs {gib(largest.peak_bytes)}"
  return (
    f"one chip of {gib(hbm)}: {how}; all resident would need {gib(every)}, "
    f"the largest single program ({largest.kind} {largest.stage}) {gib(largest.peak_bytes)} "
    "(compiler's memory analysis)"
  )


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.sampling", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--config", help="cascade config, path.py[:variant]")
  parser.add_argument(
    "--topology", help="compile for this TPU topology (e.g. v5e:1x1), run nothing"
  )
  parser.add_argument(
    "--text",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="--topology: also compile each text encoder (T5, a latent stage's CLIP)",
  )
  parser.add_argument(
    "--param_dtype",
    choices=("float32", "bfloat16"),
    help="--topology: every stage's params stored in this dtype (default: the config's)",
  )
  parser.add_argument("--num_slices", type=int, default=1, help="--topology: number of slices")
  parser.add_argument("--strategy", default="dp", help="--topology: params sharding preset")
  parser.add_argument(
    "--steps",
    help="comma-separated step counts (every stage uses each; default 25,50,100,200, "
    "with --topology the config's)",
  )
  parser.add_argument("--batch", type=int, help="images per sample call (16; --topology: chips)")
  parser.add_argument("--workdir", default=None, help="trained run (default: random params)")
  parser.add_argument("--json", default=None, help="also write the rows to this file")
  args = parser.parse_args(argv)
  if not args.config and not (args.topology and args.workdir):
    print("error: --config is required (with --topology: --config or --workdir)", file=sys.stderr)
    return 2
  if args.topology:
    from imagen_jax.parallel import topology as topo_lib  # pylint: disable=import-outside-toplevel

    try:
      if args.batch is None:
        args.batch = topo_lib.parse(args.topology, args.num_slices).chips
      return topology_main(args)
    except (ValueError, FileNotFoundError) as err:
      print(f"error: {err}", file=sys.stderr)
      return 2
  args.batch = 16 if args.batch is None else args.batch
  args.steps = args.steps or "25,50,100,200"
  try:
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    if not steps or min(steps) < 1:
      raise ValueError(f"--steps must list positive integers, got {args.steps!r}")
    if args.batch < 1:
      raise ValueError(f"--batch must be >= 1, got {args.batch}")
    config = config_lib.load_config(args.config)
  except (ValueError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  rows = measure(config, steps, args.batch, args.workdir)
  device = jax.devices()[0]
  machine = (
    f"{cpu_model()}, {os.cpu_count()} cores"
    if device.platform == "cpu"
    else f"{jax.device_count()} × {device.device_kind}"
  )
  print(
    f"\npython -m benchmarks.sampling {' '.join(argv or sys.argv[1:])}\n"
    f"{datetime.date.today()}, {machine}, jax {jax.__version__}, batch {args.batch}, "
    f"params {'from ' + args.workdir if args.workdir else 'random'}\n"
  )
  print(format_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {
          "machine": machine,
          "date": str(datetime.date.today()),
          "jax": jax.__version__,
          "rows": rows,
        },
        f,
        indent=1,
      )
  return 0


if __name__ == "__main__":
  sys.exit(main())
