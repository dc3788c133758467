"""Where our IF-shaped UNet spends its time: a profile of XLA ops, grouped by kind.

  python -m benchmarks.op_profile [--batch 8] [--width 64] [--json out.json]

Builds our UNet in the IF-I block structure of ``benchmarks.if_sampling`` (no PyTorch
needed: the diffusers config is mapped by ``if_config.diffusers_config_to_model``,
random weights), then traces ``--calls`` jitted forwards (2B rows, as guided
sampling runs it) and train steps (ε-MSE + AdamW, as ``benchmarks.peers``) under
``jax.profiler`` and sums the XLA op events of the trace by kind:
convolutions, dots (matmuls; attention's two einsums are dots), fused element-wise
and reduction loops, copies/transposes, the rest. The compiled HLO tells each op's
kind, so a fusion that wraps a convolution or a dot counts as one.
"""

import argparse
import collections
import glob
import json
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import peer_if
from benchmarks.common import BETAS, LR, TEXT_LEN, WD, hlo_instructions, markdown_table
from benchmarks.if_sampling import IF_TEXT_DIM, if_unet_config
from imagen_jax.convert import if_config
from imagen_jax.diffusion import schedules
from imagen_jax.models import UNet, UNetConfig

_KINDS = ("convolution", "dot", "fusion (element-wise / reduce)", "copy / transpose", "other")


def op_kinds(hlo_text: str) -> dict[str, str]:
  """HLO instruction name → kind, for every instruction of a compiled module."""
  kinds, calls = {}, {}
  bodies = collections.defaultdict(set)
  for computation, name, _, opcode, rest in hlo_instructions(hlo_text):
    bodies[computation].add(opcode)
    kinds[name] = opcode
    c = re.search(r"calls=%([\w.\-]+)", rest)
    if c:
      calls[name] = c.group(1)
  out = {}
  for name, opcode in kinds.items():
    inner = bodies.get(calls.get(name), set()) if opcode in ("fusion", "call") else {opcode}
    if "convolution" in inner:
      out[name] = "convolution"
    elif "dot" in inner:
      out[name] = "dot"
    elif opcode in ("fusion", "reduce", "reduce-window", "select-and-scatter", "call"):
      out[name] = "fusion (element-wise / reduce)"
    elif opcode in ("copy", "transpose"):
      out[name] = "copy / transpose"
    else:
      out[name] = "other"
  return out


def profile(fn, args, calls: int) -> tuple[dict, float]:
  """Runs ``fn(*args)`` ``calls`` times under the profiler: ({kind: seconds}, wall s)."""
  compiled = fn.lower(*args).compile()
  kinds = op_kinds(compiled.as_text())
  jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as logdir:
    t0 = time.perf_counter()
    with jax.profiler.trace(logdir):
      for _ in range(calls):
        jax.block_until_ready(compiled(*args))
    wall = time.perf_counter() - t0
    (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
  totals = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        kind = kinds.get(event.name)
        if kind is not None:
          totals[kind] += event.duration_ns * 1e-9 / calls
  return dict(totals), wall / calls


def build(width: int, res: int, batch: int):
  cfg = if_config.diffusers_config_to_model(if_unet_config(width, res))
  model = UNet(UNetConfig.from_config(cfg))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, res, res, 3), np.float32))
  t = jnp.asarray(rng.integers(0, 1000, (batch,)))
  text = jnp.asarray(rng.standard_normal((batch, TEXT_LEN, IF_TEXT_DIM), np.float32))
  params = jax.jit(lambda r: model.init(r, x[:1], t[:1], text[:1], None)["params"])(
    jax.random.PRNGKey(0)
  )
  return model, params, x, t, text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.op_profile", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--batch", type=int, default=8, help="forward rows (guided: 2B)")
  parser.add_argument("--train-batch", type=int, default=4)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--resolution", type=int, default=64)
  parser.add_argument("--calls", type=int, default=3)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  model, params, x, t, text = build(args.width, args.resolution, args.batch)
  fwd = jax.jit(lambda p, x, t, e: model.apply({"params": p}, x, t, e, None))
  results = {}
  results[f"forward (B={args.batch})"] = profile(fwd, (params, x, t, text), args.calls)
  ac = schedules.alphas_cumprod(schedules.betas_squaredcos_cap_v2(1000)).astype(np.float32)
  tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], weight_decay=WD)
  # Not donated: the profiler calls it several times on the same arguments.
  step = peer_if.jax_if_train_step(model, tx, ac, donate=False)
  b = args.train_batch
  step_args = (params, tx.init(params), jax.random.PRNGKey(1), jnp.tanh(x[:b]), text[:b])
  results[f"train step (B={b})"] = profile(step, step_args, args.calls)
  print(
    f"{jax.devices()[0].device_kind}, jax {jax.__version__}, IF-I shape width "
    f"{args.width}, {args.resolution}×{args.resolution}; seconds per call by op kind"
  )
  head = ["call", "wall s"] + list(_KINDS)
  table = []
  for name, (totals, wall) in results.items():
    busy = sum(totals.values())
    table.append(
      [name, f"{wall:.3f}"]
      + [f"{totals.get(k, 0.0):.3f} ({100 * totals.get(k, 0.0) / busy:.0f}%)" for k in _KINDS]
    )
  print(markdown_table(head, table))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({k: {"by_kind_s": v[0], "wall_s": v[1]} for k, v in results.items()}, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
