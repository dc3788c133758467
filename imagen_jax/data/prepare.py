"""Prepares a dataset for training (TFDS, ArrayRecord files; no TensorFlow).

  python -m imagen_jax.data.prepare --dataset shapes --data_dir DIR \
      [--resolution 64] [--num_train N] [--num_test N] [--num_holdout N] \
      [--holdout "green triangle,red circle"] [--seed 0]
  python -m imagen_jax.data.prepare --dataset image_captions --data_dir DIR \
      --src FOLDER [--max_resolution 256]

Re-running with the same settings finds the prepared data and does nothing;
an image_captions folder whose files changed (names, sizes, mtimes) is
prepared again. A second preparation of the same dataset waits for the first.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from imagen_jax import lockfile
from imagen_jax.data import datasets
from imagen_jax.data import shapes_builder


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m imagen_jax.data.prepare",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--dataset", required=True, choices=sorted(datasets.BUILDER_KWARGS))
  p.add_argument("--data_dir", required=True, help="TFDS data directory.")
  g = p.add_argument_group("shapes")
  g.add_argument("--resolution", type=int, default=64)
  g.add_argument("--num_train", type=int, default=shapes_builder.DEFAULT_NUM_TRAIN)
  g.add_argument("--num_test", type=int, default=shapes_builder.DEFAULT_NUM_TEST)
  g.add_argument("--num_holdout", type=int, default=shapes_builder.DEFAULT_NUM_HOLDOUT)
  g.add_argument(
    "--holdout",
    default=",".join(shapes_builder.DEFAULT_HOLDOUT),
    help='Comma-separated "<color> <shape>" compositions kept out of train/test ("" for none).',
  )
  g.add_argument("--seed", type=int, default=0)
  g = p.add_argument_group("image_captions")
  g.add_argument("--src", help="Folder of images with captions.")
  g.add_argument(
    "--max_resolution",
    type=int,
    default=None,
    help="Downscale images whose shorter side is larger.",
  )
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Parses flags and prepares the dataset; returns the exit status."""
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  if args.dataset == "shapes":
    holdout = [c.strip() for c in args.holdout.split(",") if c.strip()]
    kwargs = dict(
      resolution=args.resolution,
      num_train=args.num_train,
      num_test=args.num_test,
      num_holdout=args.num_holdout,
      holdout=holdout,
      seed=args.seed,
    )
  else:
    if not args.src:
      print("error: --dataset image_captions needs --src FOLDER", file=sys.stderr)
      return 2
    kwargs = dict(src=args.src, max_resolution=args.max_resolution)
  try:
    builder = datasets.prepare(args.dataset, args.data_dir, **kwargs)
  except (FileNotFoundError, ValueError, lockfile.Locked) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  meta = dict(builder.info.metadata or {})
  for key in ("num_skipped_unreadable", "num_skipped_no_caption"):
    if meta.get(key):
      print(f"{key}: {meta[key]}")
  print(
    f"Read it with name={args.dataset!r}, data_dir={args.data_dir!r} "
    f"(config {builder.builder_config.name})."
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
