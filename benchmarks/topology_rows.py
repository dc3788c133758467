"""Tables and JSON of TPU-topology compiles (``imagen_jax.train.aot.Report`` rows),
shared by ``benchmarks.sharding --topology`` and ``benchmarks.sampling --topology``.

Every time, rate and MFU column is the TPU compiler's cost-model estimate
(``est``), never a measurement: nothing runs.
"""

import dataclasses
import datetime
import json
import os
import sys
from typing import Optional, Sequence

import jax

from benchmarks.common import cpu_model, markdown_table
from imagen_jax.train import aot


def _gib(x: Optional[int]) -> str:
  return "—" if x is None else f"{x / 2**30:.2f}"


def _est(x: Optional[float], fmt: str) -> str:
  return "—" if x is None else format(x, fmt)


def format_table(rows: Sequence[aot.Report]) -> str:
  """One markdown row per report; per-chip GiB; est = the compiler's estimate."""
  sample = any(r.kind in ("sample", "text") for r in rows)
  head = ["stage", "strategy", "mesh"]
  head += ["steps"] if sample else ["accum", "remat"]
  head += [
    "state GiB/chip",
    "args GiB",
    "temp GiB",
    "peak GiB",
    "HBM GiB",
    "fits",
    "collective GiB (kinds)",
  ]
  head += (
    ["est s/batch (compiler)", "est img/s/chip (compiler)"]
    if sample
    else ["model TFLOP/step", "est step s (compiler)", "est img/s/chip (compiler)", "est MFU"]
  )
  head += ["compile s", "status"]
  table = []
  for r in rows:
    coll = sum(r.collective_bytes.values()) if r.collective_bytes else None
    kinds = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in r.collective_bytes.items() if v)
    cells = [r.stage, r.strategy, "×".join(f"{k} {v}" for k, v in r.mesh.items())]
    cells += [str(r.steps or "—")] if sample else [str(r.grad_accum), r.remat or "config"]
    cells += [
      _gib(r.state_bytes),
      _gib(r.argument_bytes),
      _gib(r.temp_bytes),
      _gib(r.peak_bytes),
      _gib(r.hbm_bytes),
      {True: "yes", False: "NO", None: "—"}[r.fits],
      "—" if coll is None else f"{coll / 2**30:.2f}" + (f" ({kinds})" if kinds else ""),
    ]
    if not sample:
      cells.append(_est(r.model_flops and r.model_flops / 1e12, ".1f"))
    roof = " (roofline)" if r.est_source == "roofline" else ""
    cells += [_est(r.est_step_s, ".3f") + roof, _est(r.est_images_per_s_per_chip, ".2f")]
    if not sample:
      cells.append("—" if r.est_mfu is None else f"{100 * r.est_mfu:.1f}%")
    cells += [_est(r.compile_s, ".0f"), r.status]
    table.append(cells)
  return markdown_table(head, table)


def meta(module: str, topology: str, extra: dict) -> dict:
  """The run's settings, machine and versions, for the header and the JSON."""
  import libtpu  # pylint: disable=import-outside-toplevel

  return {
    "command": " ".join(["python", "-m", module] + sys.argv[1:]),
    "date": datetime.date.today().isoformat(),
    "topology": topology,
    "compiled_on": f"{cpu_model()}, {os.cpu_count()} cores (nothing ran on a TPU)",
    "jax": jax.__version__,
    "libtpu": getattr(libtpu, "__version__", "?"),
    **extra,
  }


def report(meta_: dict, rows: Sequence[aot.Report], json_path: Optional[str]) -> None:
  """Prints the header and the table; writes ``{"meta", "rows"}`` JSON when asked."""
  print(
    f"\n{meta_['command']}\n{meta_['date']}, compiled for {meta_['topology']} on "
    f"{meta_['compiled_on']}, jax {meta_['jax']}, libtpu {meta_['libtpu']}\n"
    "est = the TPU compiler's cost-model estimate, not a measurement ('roofline': the cost\n"
    "model gave no time; max(its FLOPs / peak, its bytes accessed / HBM bandwidth))\n"
  )
  print(format_table(rows))
  if json_path:
    write_json(meta_, rows, json_path)


def write_json(meta_: dict, rows: Sequence[aot.Report], path: str) -> None:
  """``{"meta": ..., "rows": [Report fields]}``."""
  with open(path, "w") as f:
    json.dump({"meta": meta_, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
