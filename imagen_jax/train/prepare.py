"""Prepares a corpus and, with --embed, the frozen T5 embeddings of its captions.

  python -m imagen_jax.train.prepare --dataset webdataset|parquet --src PATTERN \\
      --data_dir DIR [--max_resolution N] [--embed --config C [--config.a.b=V ...]] \\
      [--beam_runner DirectRunner|DataflowRunner|FlinkRunner --beam_options "..."]

The flags of `python -m imagen_jax.data.prepare` plus the embedding step. The
dataset is prepared as there (`corpus_shards/{config}`); with --embed, the
captions are encoded with `config.text`'s frozen encoder into the cache that
`--config.text.precomputed=True` reads: by Beam workers in batches when Beam
flags are given (`imagen_jax.train.beam_embeddings`), else in this process
(`imagen_jax.train.embeddings`). This entry sits at the train layer because the
embedding step needs the text encoder, which `imagen_jax.data` (a leaf) never
imports.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

import ml_collections

from imagen_jax import cli, lockfile
from imagen_jax.data import corpus, corpus_builder
from imagen_jax.data import prepare as data_prepare
from imagen_jax.train import embeddings


def point_config_at(config: ml_collections.ConfigDict, builder, data_dir: str) -> None:
  """Makes `config.data` read the prepared `corpus_shards` dataset (in place)."""
  config.data.name = corpus_builder.dataset_name(builder)
  config.data.data_dir = data_dir
  config.data.split = "train"
  config.data.builder_kwargs = ml_collections.ConfigDict()


def _embed(args, config) -> str:
  """Writes the embedding cache of the prepared dataset; returns its folder."""
  options = data_prepare.beam_pipeline_options(args)
  if options is None:
    return embeddings.write(config)
  from imagen_jax.train import beam_embeddings  # pylint: disable=g-import-not-at-top

  return beam_embeddings.write(config, args.beam_runner, options, part_size=args.embed_part_size)


def main(argv: Sequence[str] | None = None) -> int:
  """Parses flags, prepares the corpus, then embeds its captions; the exit status."""
  p = data_prepare.parser(prog="python -m imagen_jax.train.prepare")
  p.add_argument(
    "--embed_part_size",
    type=int,
    default=4096,
    help="With --embed and Beam: about how many captions one worker encodes into one part.",
  )
  args, rest = p.parse_known_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  if not args.embed:
    if rest:
      p.error(f"unrecognized arguments: {' '.join(rest)}")
    return data_prepare.run(args)
  try:
    if args.dataset not in corpus.FORMATS:
      raise cli.UsageError(
        f"--embed applies to --dataset {' or '.join(corpus.FORMATS)}, not {args.dataset!r}; "
        "for other datasets run python -m imagen_jax.train.embeddings --config C"
      )
    if not args.config:
      raise cli.UsageError("--embed needs --config C (the training config: its text encoder)")
    config = cli.config_from_args(args, rest)
    data_prepare.beam_pipeline_options(args)  # Beam missing: before any work.
    builder = data_prepare.prepare_corpus(args)
  except (cli.UsageError, ValueError, corpus.ShardError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except lockfile.Locked as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  point_config_at(config, builder, args.data_dir)
  out = _embed(args, config)
  print(
    f"wrote the caption embeddings to {out}; train with --config.data.name="
    f"{config.data.name} --config.data.data_dir={args.data_dir} --config.text.precomputed=True"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
