"""Prepares a dataset for training (TFDS, ArrayRecord files; no TensorFlow).

  python -m imagen_jax.data.prepare --dataset shapes --data_dir DIR \
      [--resolution 64] [--num_train N] [--num_test N] [--num_holdout N] \
      [--holdout "green triangle,red circle"] [--seed 0]
  python -m imagen_jax.data.prepare --dataset image_captions --data_dir DIR \
      --src FOLDER [--max_resolution 256]
  python -m imagen_jax.data.prepare --dataset webdataset|parquet --data_dir DIR \
      --src PATTERN [--max_resolution 256] [--image_column jpg ...] \
      [--beam_runner DirectRunner|DataflowRunner|FlinkRunner --beam_options "..."]

webdataset / parquet: shards (a list, a glob, brace ranges; local or gs://)
become the TFDS dataset `corpus_shards/{format}[_max{N}]` (see
`imagen_jax.data.corpus_builder`), in this process or, with --beam_runner or
--beam_options, as an Apache Beam pipeline (pip install -r
requirements-beam.txt). The counts of records read, examples written and
skipped by reason are printed and stored in the dataset's metadata. With
--embed --config C, the frozen T5 embeddings of its captions are computed
too: that step sits above data/ in the layering, so run the same command as
`python -m imagen_jax.train.prepare`.

Re-running with the same settings finds the prepared data and does nothing;
an image_captions folder whose files changed (names, sizes, mtimes) is
prepared again. A second preparation of the same dataset waits for the first.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Sequence

from imagen_jax import lockfile
from imagen_jax.data import corpus
from imagen_jax.data import corpus_builder
from imagen_jax.data import datasets
from imagen_jax.data import shapes_builder


def parser(prog: str = "python -m imagen_jax.data.prepare") -> argparse.ArgumentParser:
  """The flags of every preparation (`imagen_jax.train.prepare` reuses them)."""
  p = argparse.ArgumentParser(
    prog=prog,
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--dataset", required=True, choices=sorted(datasets.BUILDER_KWARGS) + list(corpus.FORMATS)
  )
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
  g = p.add_argument_group("image_captions, webdataset, parquet")
  g.add_argument(
    "--src",
    help="image_captions: a folder of captioned images; webdataset/parquet: shard "
    "files, a glob or a brace pattern ('gs://b/laion/{00000..41454}.tar', '{a,b}/*.parquet').",
  )
  g.add_argument(
    "--max_resolution",
    type=int,
    default=None,
    help="Downscale images whose shorter side is larger.",
  )
  g = p.add_argument_group("webdataset, parquet")
  defaults = corpus.CorpusOptions("webdataset")
  for field in ("image_column", "caption_column", "key_column", "caption_json_field"):
    g.add_argument(f"--{field}", default=getattr(defaults, field), help="As config.data.")
  g.add_argument("--beam_runner", help="Prepare as a Beam pipeline on this runner.")
  g.add_argument(
    "--beam_options",
    help='Beam pipeline options, one string: "--direct_num_workers=2 --project=P ..."',
  )
  g.add_argument(
    "--embed",
    action="store_true",
    help="Also the T5 embeddings (python -m imagen_jax.train.prepare only).",
  )
  g.add_argument("--config", help="With --embed: the training config (text encoder).")
  return p


def corpus_options(args: argparse.Namespace) -> corpus.CorpusOptions:
  """`CorpusOptions` from the parsed flags."""
  return corpus.CorpusOptions(
    args.dataset,
    image_column=args.image_column,
    caption_column=args.caption_column,
    key_column=args.key_column,
    caption_json_field=args.caption_json_field,
  )


def beam_pipeline_options(args: argparse.Namespace):
  """The `PipelineOptions` of --beam_options (None without Beam flags).

  Raises:
    ValueError: Beam flags without apache_beam installed.
  """
  if args.beam_runner is None and args.beam_options is None:
    return None
  try:
    from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(
      "--beam_runner/--beam_options need Apache Beam: pip install -r requirements-beam.txt"
    ) from None
  return pipeline_options.PipelineOptions(shlex.split(args.beam_options or ""))


def prepare_corpus(args: argparse.Namespace) -> corpus_builder.CorpusShards:
  """Prepares webdataset/parquet shards from parsed flags; prints the counts.

  Raises:
    ValueError / corpus.ShardError: bad input (one line); lockfile.Locked.
  """
  if not args.src:
    raise ValueError(f"--dataset {args.dataset} needs --src PATTERN (shard files, glob, braces).")
  builder = corpus_builder.prepare(
    args.data_dir,
    args.src,
    corpus_options(args),
    max_resolution=args.max_resolution,
    beam_runner=args.beam_runner,
    beam_options=beam_pipeline_options(args),
  )
  print(corpus_builder.summary(dict(builder.info.metadata)))
  print(
    f"Read it with config.data.name={corpus_builder.dataset_name(builder)!r}, "
    f"config.data.data_dir={args.data_dir!r}."
  )
  return builder


def main(argv: Sequence[str] | None = None) -> int:
  """Parses flags and prepares the dataset; returns the exit status."""
  args = parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  return run(args)


def run(args: argparse.Namespace) -> int:
  """Prepares the dataset of parsed flags (`parser()`); returns the exit status."""
  if args.embed:
    print(
      "error: --embed runs the T5 encoder, which sits above imagen_jax.data in the layering: "
      "run the same command as python -m imagen_jax.train.prepare",
      file=sys.stderr,
    )
    return 2
  if args.dataset not in corpus.FORMATS and (args.beam_runner or args.beam_options):
    print(
      f"error: --beam_runner/--beam_options apply to --dataset {' or '.join(corpus.FORMATS)}, "
      f"not {args.dataset!r}",
      file=sys.stderr,
    )
    return 2
  if args.dataset in corpus.FORMATS:
    try:
      prepare_corpus(args)
    except (ValueError, corpus.ShardError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    except lockfile.Locked as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    return 0
  return _prepare_builder(args)


def _prepare_builder(args: argparse.Namespace) -> int:
  """shapes / image_captions."""
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
