"""Small helpers shared by the benchmark scripts: the machine, tables, timing, HLO text.

Also the settings and the result table that the PyTorch peers (``benchmarks.peers``,
``peer_if``, ``peer_imagen``) share. Imports neither jax nor torch (torch only inside
``make_torch_adamw``): ``benchmarks.peers --help`` needs neither.
"""

import json
import platform
import re
import statistics
import time
from typing import Any, Callable, Iterator, Optional, Sequence

# "%name = <shape> opcode(operands), attrs" (ROOT optional); the shape may be a tuple.
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
# A computation's header: "[ENTRY ]%name (params) -> shape {" at column 0.
_COMPUTATION_RE = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), or what ``platform`` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A GitHub-markdown table (the format of benchmarks/RESULTS.md)."""
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(cells) + " |" for cells in rows]
  return "\n".join(lines)


def write_json(path: Optional[str], result: Any) -> None:
  """Writes a benchmark's result as indented JSON; nothing when ``path`` is empty."""
  if path:
    with open(path, "w") as f:
      json.dump(result, f, indent=1, default=str)


# ---------------------------------------------------------------- timing, peers

TEXT_LEN = 77  # IF's tokenizer length; the text length of every peer benchmark
LR, BETAS, WD = 1e-4, (0.9, 0.999), 0.01  # the peers' AdamW, on both sides


def time_calls(fn: Callable[[], Any], repeats: int, sync=lambda out: out) -> dict:
  """First call (compile / warm-up) and the median of ``repeats`` further calls, in s.

  ``sync`` waits for an output (``jax.block_until_ready`` for asynchronous JAX calls).
  Returns {first, median, runs}.
  """
  t0 = time.perf_counter()
  sync(fn())
  first = time.perf_counter() - t0
  runs = []
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    sync(fn())
    runs.append(time.perf_counter() - t0)
  return dict(first=first, median=statistics.median(runs), runs=runs)


def row(metric: str, ours: dict, theirs: dict) -> dict:
  """One row of a peer table from two ``time_calls`` results (ratio = ours / theirs)."""
  o, t = ours["median"], theirs["median"]
  return dict(
    metric=metric,
    ours_s=o,
    theirs_s=t,
    ratio=o / t,
    speedup=t / o,
    ours_compile_s=max(ours["first"] - o, 0.0),
    ours_runs=ours["runs"],
    theirs_first_s=theirs["first"],
    theirs_runs=theirs["runs"],
  )


def peer_report(title: str, rows: list, notes: list, **fields) -> dict:
  """Prints a peer's table (title, notes, rows, our compile times); returns its result."""
  print(f"\n== {title} ==")
  for n in notes:
    print(f"  {n}")
  print(f"  {'metric':<34}{'ours (s)':>10}{'theirs (s)':>12}{'ours/theirs':>13}{'speedup':>9}")
  for r in rows:
    print(
      f"  {r['metric']:<34}{r['ours_s']:>10.4f}{r['theirs_s']:>12.4f}"
      f"{r['ratio']:>13.3f}{r['speedup']:>8.2f}x"
    )
  print(
    "  our compile (first call − steady state): "
    + ", ".join(f"{r['metric'].split(' (')[0]} {r['ours_compile_s']:.1f} s" for r in rows)
  )
  return dict(fields, rows=rows, notes=notes)


def make_torch_adamw(params, weight_decay: float):
  """torch AdamW, fused on CPU when this torch has it (the peer's fastest eager option)."""
  import torch  # pylint: disable=import-outside-toplevel

  params = list(params)
  try:
    return torch.optim.AdamW(
      params, lr=LR, betas=BETAS, eps=1e-8, weight_decay=weight_decay, fused=True
    )
  except (RuntimeError, TypeError, ValueError):
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=1e-8, weight_decay=weight_decay)


def opt_kind(opt) -> str:
  """'fused' or 'default': which torch AdamW ``make_torch_adamw`` got."""
  return "fused" if opt.defaults.get("fused") else "default"


def hlo_instructions(hlo_text: str) -> Iterator[tuple[str, str, str, str, str]]:
  """(computation, name, shape, opcode, rest of the line) of each HLO instruction.

  ``rest`` starts inside the operand parentheses. Optimized HLO prints operands
  by name only; look their shapes up from their own instructions.
  """
  computation = ""
  for line in hlo_text.splitlines():
    if not line.startswith(" "):
      head = _COMPUTATION_RE.match(line)
      if head:
        computation = head.group(1)
        continue
    m = _INSTR_RE.match(line)
    if m:
      yield (computation,) + m.groups()
