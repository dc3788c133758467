"""Command line: convert a diffusers DeepFloyd IF pipeline folder.

  python -m imagen_jax.convert deepfloyd-if --src IF-I-XL-v1.0 --out converted/if_I \
      [--dtype bfloat16] [--variant fp16] [--lowres-resolution 64]

Writes ``--out/config.json`` (the stage config: model, diffusion, sample, text)
and ``--out/params/`` (an orbax checkpoint); read back with
``imagen_jax.convert.deepfloyd_if.load_converted``. ``--out`` appears only when
the whole conversion succeeded. Exit status 1 with a one-line error otherwise.
"""

import argparse
import sys
import time
from typing import Optional, Sequence

from imagen_jax.convert import deepfloyd_if


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m imagen_jax.convert",
                                   description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("deepfloyd-if", help="convert a diffusers DeepFloyd IF folder")
  p.add_argument("--src", required=True, help="IF pipeline folder (model_index.json, unet/, ...)")
  p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
  p.add_argument("--dtype", default="float32", choices=deepfloyd_if.DTYPES)
  p.add_argument("--variant", default=None,
                 help="weights variant to read, e.g. fp16 (default: full precision, "
                      "falling back to fp16)")
  p.add_argument("--lowres-resolution", type=int, default=None,
                 help="stage II input resolution (default: resolution // 4)")
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  start = time.time()
  try:
    out = deepfloyd_if.convert(args.src, args.out, dtype=args.dtype, variant=args.variant,
                               lowres_resolution=args.lowres_resolution)
  except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {msg}", file=sys.stderr)
    return 1
  print(f"converted {args.src} -> {out} ({args.dtype}) in {time.time() - start:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
