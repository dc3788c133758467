"""What a compiled program costs: its memory, its collectives, an OOM's error.

Collective bytes are read from the HLO module's structure.

``compiled.runtime_executable().hlo_modules()`` gives the optimized modules;
their computations' instructions carry an opcode and operands, so collectives
are found by opcode, not by matching HLO text. JAX does not expose an
instruction's shape, so each operand's shape is read from its one-line print
(``%x = bf16[8,16]{1,0:T(8,128)} op(...)``): the one small parser left.
"""

import re
from typing import Optional

import jax
import numpy as np

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OOM_MARKS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")


def tree_bytes(abstract, shardings=None) -> int:
  """Bytes of a tree of arrays: whole, or with shardings one device's shard."""
  leaves = jax.tree.leaves(abstract)
  shards = jax.tree.leaves(shardings) if shardings is not None else [None] * len(leaves)
  total = 0
  for a, s in zip(leaves, shards):
    shape = s.shard_shape(a.shape) if s is not None else a.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
  return total


def is_oom(err: Exception) -> bool:
  """Whether a compile or run error is the device running out of memory."""
  return any(s in str(err) for s in _OOM_MARKS)


def memory(compiled) -> Optional[dict]:
  """Per-device bytes of a compiled program (``memory_analysis()``): argument,
  output, temp and peak (arguments + outputs - aliased + temporaries); None where
  the backend gives no analysis."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  temp, alias = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
  return {"argument": arg, "output": out, "temp": temp, "peak": arg + out - alias + temp}


def collective_bytes(compiled) -> dict:
  """Operand bytes per collective kind, read from the compiled HLO module's
  instructions by opcode (``hlo_modules()``; each instruction once, loops not
  multiplied). Async pairs count once (their start)."""
  out = dict.fromkeys(COLLECTIVES, 0)
  for module in compiled.runtime_executable().hlo_modules():
    comps = module.computations()
    wrapped = set()
    for comp in comps:
      for ins in comp.instructions():
        if _opcode(ins) == "async-start":
          wrapped.add(ins.async_wrapped_root().name)
    for comp in comps:
      for ins in comp.instructions():
        op = _opcode(ins)
        if op == "async-start":
          op = _opcode(ins.async_wrapped_root())
        elif ins.name in wrapped:
          continue
        kind = op[: -len("-start")] if op.endswith("-start") else op
        if kind in out:
          out[kind] += sum(shape_bytes(_shape_text(o.to_string())) for o in ins.operands())
  return out


def _opcode(ins) -> str:
  """'all-gather-start' from HloOpcode.kAllGatherStart."""
  name = str(ins.opcode).rsplit(".", 1)[-1]
  name = name[1:] if name.startswith("k") else name
  out = "".join("-" + c.lower() if c.isupper() else c for c in name).lstrip("-")
  return out


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4}
_DTYPE_BYTES.update({"u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16})
_DTYPE_BYTES.update({"f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1})


def _shape_text(instr_text: str) -> str:
  """The shape of ``%x = SHAPE opcode(...)``: the text before the opcode."""
  rest = instr_text.split(" = ", 1)[-1]
  return re.split(r"\s[a-z][\w\-.]*\(", rest, maxsplit=1)[0]


def shape_bytes(shape_text: str) -> int:
  """Bytes of an HLO shape such as ``bf16[8,16]{1,0:T(8,128)}`` or a tuple of them."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]", shape_text):
    if dtype in _DTYPE_BYTES:
      total += (
        int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) * _DTYPE_BYTES[dtype]
      )
  return total
