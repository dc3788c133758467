"""Small helpers shared by the benchmark scripts: the machine, tables, HLO text."""

import platform
import re
from typing import Iterator, Sequence

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
