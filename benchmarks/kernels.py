"""The kernels behind the peer ratios: convolution, group norm and attention, JAX vs PyTorch.

  python -m benchmarks.kernels [--json out.json]          # JAX only
  PEERS_VENV/bin/python -m benchmarks.kernels             # JAX and PyTorch side by side
  python -m benchmarks.kernels --only attention --no-torch # the attention backends alone

Shapes are those of the IF-shaped network of ``benchmarks.peers`` (width 64,
64×64, guided sampling's 2B = 8 rows): the 3×3 convolutions of each level (the
first also with only its weight gradient), the group norm at 64×64 (flax's
``nn.GroupNorm`` and ours), and the self+cross attention at 32×32 (1024 image
tokens + 77 text tokens, 2 heads of 64) through each backend of
``imagen_jax.models.attention`` this platform runs, plus
``jax.nn.dot_product_attention(implementation='xla')`` (``--only attention``: those
rows alone; a GPU adds cuDNN and XLA rows in bf16). Each kernel is timed forward, and
forward + backward (gradients of a sum of squares with respect to every input
unless the row says otherwise: what a train step pays). fp32, the
median of ``--repeats`` calls after a warm-up. PyTorch uses its defaults:
oneDNN convolutions and ``scaled_dot_product_attention`` (a fused, flash-style
kernel on CPU); XLA:CPU compiles the same math from ``lax.conv`` and einsums.
"""

import argparse
import datetime
import functools
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import markdown_table
from imagen_jax.models import attention, layers

CONVS = ((8, 64, 64, 64), (8, 32, 128, 128), (8, 16, 192, 192), (8, 8, 256, 256))
GROUP_NORM = (8, 64, 64, 32)  # batch, size, channels (64), groups
ATTENTION = (8, 1024, 77, 2, 64)  # batch, image tokens, text tokens, heads, head dim


def _median_ms(fn, repeats: int) -> float:
  fn()
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    runs.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(runs)


def _jax_conv(x, w):
  return jax.lax.conv_general_dilated(
    x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def attention_backends(platform: str) -> list[tuple[str, str, object]]:
  """(label, dtype, fn(q, k, v)) of each attention backend this platform runs."""
  out = [
    ("xla", "float32", functools.partial(attention.attention, impl="xla")),
    (
      "jax.nn.dot_product_attention xla",
      "float32",
      lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation="xla"),
    ),
    ("chunked", "float32", functools.partial(attention.attention, impl="chunked")),
  ]
  if platform == "gpu":
    out.append(("cudnn", "bfloat16", functools.partial(attention.attention, impl="cudnn")))
    out.append(("xla", "bfloat16", functools.partial(attention.attention, impl="xla")))
  if platform == "tpu":
    out.append(("splash", "float32", functools.partial(attention.attention, impl="splash")))
  return out


def _attention_rows(rng, repeats: int, torch) -> list[dict]:
  """The IF-shape self+cross attention through each backend (+ PyTorch's SDPA,
  timed next to each row: on a shared machine the ratio is the fairer figure)."""
  b, t, l, n, d = ATTENTION
  q = rng.standard_normal((b, t, n, d), np.float32) * d**-0.5
  k = rng.standard_normal((b, t + l, n, d), np.float32)
  v = rng.standard_normal((b, t + l, n, d), np.float32)
  platform = jax.default_backend()
  auto = attention.resolve_impl("auto", jnp.asarray(q), jnp.asarray(k))
  rows = []
  for label, dtype, fn in attention_backends(platform):
    args = [jnp.asarray(a, dtype) for a in (q, k, v)]
    tag = f"{label}{' = auto' if label == auto else ''}, {dtype}"
    row = {
      "kernel": f"attention ({tag}) {b}×{n} heads, {t} queries × {t + l} keys, d {d}",
      "gflop_fwd": 4 * b * n * t * (t + l) * d / 1e9,
    }
    row["jax_fwd_ms"], row["jax_fwd_bwd_ms"] = _jax_pair(fn, *args, repeats=repeats)
    if torch is not None and dtype == "float32":
      sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)
      row["torch_fwd_ms"], row["torch_fwd_bwd_ms"] = _torch_pair(
        sdpa, (b, n, t, d), (b, n, t + l, d), (b, n, t + l, d), repeats=repeats
      )
    rows.append(row)
  return rows


def _jax_pair(fn, *args, repeats, argnums=None):
  """(forward ms, forward + gradient ms) of ``fn``; gradients w.r.t. ``argnums`` (all)."""
  argnums = tuple(range(len(args))) if argnums is None else argnums
  fwd = jax.jit(fn)
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=argnums))
  return (
    _median_ms(lambda: jax.block_until_ready(fwd(*args)), repeats),
    _median_ms(lambda: jax.block_until_ready(grad(*args)), repeats),
  )


def _torch_pair(fn, *shapes, repeats, grads=None):
  """The same in PyTorch; ``grads``: which inputs need a gradient (all)."""
  import torch  # pylint: disable=import-outside-toplevel

  grads = (True,) * len(shapes) if grads is None else grads
  args = [torch.randn(*s, requires_grad=g) for s, g in zip(shapes, grads)]

  def fwd():
    with torch.no_grad():
      fn(*args)

  def both():
    for a in args:
      a.grad = None  # (inputs without a gradient keep None)
    fn(*args).pow(2).sum().backward()

  return _median_ms(fwd, repeats), _median_ms(both, repeats)


def run(repeats: int = 10, with_torch: bool = True, only: str = "all") -> list[dict]:
  """Rows of every kernel (``only='attention'``: the attention rows alone)."""
  rows = []
  torch = None
  if with_torch:
    try:
      import torch  # pylint: disable=import-outside-toplevel,redefined-outer-name
    except ImportError:
      torch = None
  rng = np.random.default_rng(0)
  if only == "attention":
    return _attention_rows(rng, repeats, torch)
  conv = lambda x, w: torch.nn.functional.conv2d(x, w, padding=1)
  for k, (b, r, c, o) in enumerate(CONVS):
    x = jnp.asarray(rng.standard_normal((b, r, r, c), np.float32))
    w = jnp.asarray(0.05 * rng.standard_normal((3, 3, c, o), np.float32))
    name = f"conv3x3 {b}×{r}×{r}×{c}→{o}"
    # The first shape also alone with its weight gradient (the slow part on XLA:CPU).
    for what, argnums, grads in ((name, None, None),) + (
      ((f"{name}, weight gradient only", (1,), (False, True)),) if k == 0 else ()
    ):
      row = {"kernel": what, "gflop_fwd": 2 * b * r * r * c * o * 9 / 1e9}
      row["jax_fwd_ms"], row["jax_fwd_bwd_ms"] = _jax_pair(
        _jax_conv, x, w, repeats=repeats, argnums=argnums
      )
      if torch is not None:
        row["torch_fwd_ms"], row["torch_fwd_bwd_ms"] = _torch_pair(
          conv, (b, c, r, r), (o, c, 3, 3), repeats=repeats, grads=grads
        )
      rows.append(row)
  b, r, c, g = GROUP_NORM
  x = jnp.asarray(rng.standard_normal((b, r, r, c), np.float32))
  for label, module in (
    ("flax nn.GroupNorm", nn.GroupNorm(num_groups=g)),
    ("imagen_jax GroupNorm", layers.GroupNorm(num_groups=g)),
  ):
    params = nn.unbox(module.init(jax.random.PRNGKey(0), x))
    row = {"kernel": f"group norm ({label}) {b}×{r}×{r}×{c}, {g} groups", "gflop_fwd": 0.0}
    row["jax_fwd_ms"], row["jax_fwd_bwd_ms"] = _jax_pair(
      lambda p, x, m=module: m.apply(p, x), params, x, repeats=repeats
    )
    if torch is not None:
      norm = torch.nn.GroupNorm(g, c)
      row["torch_fwd_ms"], row["torch_fwd_bwd_ms"] = _torch_pair(
        norm, (b, c, r, r), repeats=repeats
      )
    rows.append(row)
  rows += _attention_rows(rng, repeats, torch)
  return rows


def format_table(rows: list[dict]) -> str:
  has_torch = any("torch_fwd_ms" in r for r in rows)
  head = ["kernel", "GFLOP fwd", "JAX fwd ms", "JAX fwd+bwd ms"]
  if has_torch:
    head += ["torch fwd ms", "torch fwd+bwd ms", "JAX/torch fwd", "JAX/torch fwd+bwd"]
  table = []
  for r in rows:
    cells = [
      r["kernel"],
      f"{r['gflop_fwd']:.2f}" if r["gflop_fwd"] else "—",
      f"{r['jax_fwd_ms']:.1f}",
      f"{r['jax_fwd_bwd_ms']:.1f}",
    ]
    if has_torch:
      cells += [
        f"{r['torch_fwd_ms']:.1f}",
        f"{r['torch_fwd_bwd_ms']:.1f}",
        f"{r['jax_fwd_ms'] / r['torch_fwd_ms']:.2f}",
        f"{r['jax_fwd_bwd_ms'] / r['torch_fwd_bwd_ms']:.2f}",
      ]
    table.append(cells)
  return markdown_table(head, table)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--no-torch", action="store_true", help="time JAX only")
  parser.add_argument(
    "--only",
    choices=("all", "attention"),
    default="all",
    help="'attention': the per-backend attention rows alone",
  )
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  rows = run(args.repeats, with_torch=not args.no_torch, only=args.only)
  print(f"{datetime.date.today()}, jax {jax.__version__}, {jax.devices()[0].device_kind}")
  print(format_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {"date": str(datetime.date.today()), "jax": jax.__version__, "rows": rows}, f, indent=1
      )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
