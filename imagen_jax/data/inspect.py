"""Look before you train: what the training pipeline would feed one process, in order.

  python -m imagen_jax.data.inspect --config C [--config.a.b=V ...] [--num 16|all]
      [--process_id I --num_processes N] [--stage NAME] [--grid out.png] [--json F]

Prints one line per example (`KEY<TAB>CAPTION`: the tar member stem, the parquet
key column or row index, or the TFDS index), then the skipped records by reason
and the decode throughput (examples/s, and per decoding thread/core). `--num all`
reads one epoch of the process's share. `--grid` writes the decoded, cropped
images at the stage resolution with their captions under them; `--json` writes
{"keys", "captions", "skipped": {reason: count}, "examples_per_s",
"examples_per_s_per_core"}.

The examples come from the same pipeline the trainer builds
(`pipeline.train_input`, seed `data.seed`, per-process batch
`train.batch_size / N`), from its start: what a fresh run reads.

Bad input (a config override, a pattern matching no file, a malformed brace
range, a missing parquet column, no decodable example): one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from imagen_jax import cli
from imagen_jax.data import corpus, datasets, pipeline, streaming


def _stream_examples(data, resolution: int, num: int | None, p: int, n: int):
  """(examples [(key, caption, image)], skipped, decode threads) of a streamed corpus."""
  it = streaming.train_stream(
    data, resolution=resolution, batch_size=1, process_index=p, process_count=n
  )
  out = []
  try:
    with tqdm(total=num, desc="inspect", unit="ex", file=sys.stderr) as bar:
      while num is None or len(out) < num:
        batch = next(it)
        if num is None and it.epoch > 0:  # the first example of the next epoch
          break
        out.append((batch["key"][0], batch["caption"][0], batch["image"][0]))
        bar.update(1)
  finally:
    it.close()
  return out, dict(it.skipped), it.workers


def tfds_order(length: int, seed: int, batch_size: int, p: int, n: int) -> pipeline._ProcessRows:
  """The source indices the TFDS training pipeline feeds process p, in order."""
  import grain  # pylint: disable=g-import-not-at-top

  order = grain.MapDataset.range(length).shuffle(seed=seed).repeat()
  return pipeline._ProcessRows(
    order, batch_size=batch_size, process_index=p, process_count=n, start=0
  )


def _tfds_examples(data, resolution: int, num: int | None, b: int, p: int, n: int):
  """As `_stream_examples` for a TFDS source: keys are the source indices."""
  settings = datasets.prepare_from_config(data)
  builder = datasets.load_builder(data["name"], data["data_dir"], **settings)
  datasets.require_prepared(builder)
  length = len(builder.as_data_source(split=data["split"]))
  if num is None:
    num = length // (b * n) * b  # one epoch of this process's share
  order = tfds_order(length, int(data["seed"]), b, p, n)
  it = iter(
    pipeline.train_input(
      data, resolution=resolution, batch_size=b, process_index=p, process_count=n
    )
  )
  out = []
  with tqdm(total=num, desc="inspect", unit="ex", file=sys.stderr) as bar:
    while len(out) < num:
      batch = next(it)
      for image, caption in zip(batch["image"], batch["caption"]):
        if len(out) < num:
          out.append((str(order[len(out)]), caption, image))
          bar.update(1)
  return out, {}, pipeline.default_read_threads()


def captioned_grid(images: np.ndarray, captions: Sequence[str], cell: int = 128) -> Image.Image:
  """A grid of images [N, R, R, 3] (upscaled, nearest, to >= cell px) with a caption line
  (cut to the cell width) under each."""
  n, r = images.shape[:2]
  scale = max(1, -(-cell // r))
  cell, cols = r * scale, int(np.ceil(np.sqrt(n)))
  font = ImageFont.load_default()
  line = int(font.getbbox("Ag")[3]) + 4
  canvas = Image.new("RGB", (cols * (cell + 4) + 4, -(-n // cols) * (cell + line + 4) + 4), "white")
  draw = ImageDraw.Draw(canvas)
  for i, (image, caption) in enumerate(zip(images, captions)):
    x, y = (i % cols) * (cell + 4) + 4, (i // cols) * (cell + line + 4) + 4
    canvas.paste(Image.fromarray(np.kron(image, np.ones((scale, scale, 1), np.uint8))), (x, y))
    while caption and draw.textlength(caption, font=font) > cell:
      caption = caption[:-1]
    draw.text((x, y + cell + 1), caption, fill="black", font=font)
  return canvas


def inspect(config, num: int | None, process_id: int, num_processes: int, stage: str):
  """(examples [(key, caption, uint8 [R, R, 3])], skipped {reason: n}, examples/s,
  decode threads) of what training would feed `process_id`.

  Raises:
    ValueError / corpus.ShardError: bad data settings or shards (one line).
  """
  resolution = config.stages[stage].resolution
  start = time.perf_counter()
  if streaming.is_streaming(config.data):
    streaming.check_config(config.data, num_processes)
    examples, skipped, threads = _stream_examples(
      config.data, resolution, num, process_id, num_processes
    )
  else:
    b = max(1, config.train.batch_size // num_processes)
    examples, skipped, threads = _tfds_examples(
      config.data, resolution, num, b, process_id, num_processes
    )
  return examples, skipped, len(examples) / (time.perf_counter() - start), threads


def _parse(argv):
  p = argparse.ArgumentParser(prog="inspect", description=__doc__.split("\n")[0])
  cli.add_config_arg(p)
  p.add_argument("--num", default="16", help="examples to show, or 'all' (one epoch)")
  p.add_argument("--process_id", type=int, default=0)
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--stage", default=None, help="stage whose resolution (default: the first)")
  p.add_argument("--grid", default=None, help="write a captioned grid PNG here")
  p.add_argument("--json", default=None, help="write the keys, captions, skips and speed here")
  args, rest = p.parse_known_args(argv)
  config = cli.config_from_args(args, rest)
  if config is None:
    raise cli.UsageError("--config is required")
  if args.num != "all" and not (args.num.isdigit() and int(args.num) > 0):
    raise cli.UsageError(f"--num={args.num!r}: expected a positive integer or 'all'")
  if not 0 <= args.process_id < args.num_processes:
    raise cli.UsageError(f"--process_id={args.process_id} is not in [0, --num_processes)")
  stage = args.stage or config.stage_order[0]
  if stage not in config.stages:
    raise cli.UsageError(f"--stage={stage!r}: the config has {list(config.stage_order)}")
  return args, config, stage


def main(argv: Optional[Sequence[str]] = None) -> int:
  try:
    args, config, stage = _parse(argv)
    num = None if args.num == "all" else int(args.num)
    examples, skipped, rate, threads = inspect(
      config, num, args.process_id, args.num_processes, stage
    )
  except (cli.UsageError, ValueError, corpus.ShardError) as e:
    print(f"inspect: error: {e}", file=sys.stderr, flush=True)
    return 2
  for key, caption, _ in examples:
    print(f"{key}\t{caption}")
  print(f"skipped: {json.dumps(dict(sorted(skipped.items())))}")
  per_core = rate / max(1, min(threads, os.cpu_count() or 1))
  print(f"decode: {rate:.1f} examples/s ({per_core:.1f} per core, {threads} threads)")
  if args.grid and examples:
    images = np.stack([image for _, _, image in examples])
    captioned_grid(images, [c for _, c, _ in examples]).save(args.grid)
    print(f"grid: {args.grid}")
  if args.json:
    summary = {
      "keys": [k for k, _, _ in examples],
      "captions": [c for _, c, _ in examples],
      "skipped": skipped,
      "examples_per_s": rate,
      "examples_per_s_per_core": per_core,
    }
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
