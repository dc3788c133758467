"""Does the host keep up? Decoded examples/s per host from each source, next to what
the train steps consume.

  python -m benchmarks.input_pipeline --config configs/own_data.py [--workers K]
      [--examples N] [--steps S] [--json out.json] [--config.a.b=V ...]

* Sources: one synthetic corpus of N (default 256) JPEG photos-like images of
  320×288 (smooth colour gradients plus noise, quality 90, about the bytes of a
  LAION image at that size) with captions, written three ways: webdataset tars
  and parquet files (streamed, `imagen_jax.data.streaming`: the full image is
  decoded every time) and a TFDS array_record dataset prepared from a folder
  (`image_captions`, stored with its shorter side at the resolution trained,
  as `configs/own_data.py` prepares it).
* Each source is read through the training pipeline (shuffle, decode, resize,
  random crop, batches of the config's per-process batch) with K decoding
  threads (default min(4, CPUs)) at 64 and 256 px: examples/s over 2 N examples
  after one untimed batch, and per thread.
* Consumption: the bare jitted train step of every stage of the config
  (`benchmarks.train_loop.bare_step`, S timed steps after two untimed; S = 0
  skips it), in images/s for this host. The config needs a fixed tokenizer
  (`configs/own_data.py`: the demo cascade on ByT5 bytes; the demo's fitted word
  tokenizer exists only inside a run).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from benchmarks.common import cpu_model, markdown_table
from imagen_jax import cli
from imagen_jax.data import datasets, pipeline, streaming

RESOLUTIONS = (64, 256)
SIZE = (320, 288)


def _photo(rng: np.random.Generator) -> bytes:
  """A JPEG with smooth structure and noise (compresses like a photo, not like a flat
  image)."""
  w, h = SIZE
  y, x = np.mgrid[0:h, 0:w] / max(w, h)
  c = rng.uniform(0, 6, (3, 3))
  img = np.stack([np.sin(c[i, 0] * x + c[i, 1] * y + c[i, 2]) for i in range(3)], -1)
  img = 127.5 * (img + 1) + rng.normal(0, 12, (h, w, 3))
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def write_corpus(root: str, n: int, shards: int = 4) -> dict[str, str]:
  """Writes the corpus as tars, parquet files and a folder; returns their patterns."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  import tarfile  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  images = [_photo(rng) for _ in range(n)]
  captions = [f"a synthetic photo number {i}" for i in range(n)]
  folder = os.path.join(root, "folder")
  os.makedirs(folder)
  for i, (image, caption) in enumerate(zip(images, captions)):
    with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
      f.write(image)
    with open(os.path.join(folder, f"{i:06d}.txt"), "w") as f:
      f.write(caption)
  for s in range(shards):
    part = range(s, n, shards)
    with tarfile.open(os.path.join(root, f"{s:05d}.tar"), "w") as tar:
      for i in part:
        for ext, data in (("jpg", images[i]), ("txt", captions[i].encode())):
          info = tarfile.TarInfo(f"{i:06d}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    table = {"key": [f"{i:06d}" for i in part], "jpg": [images[i] for i in part]}
    table["caption"] = [captions[i] for i in part]
    pq.write_table(pa.table(table), os.path.join(root, f"{s:05d}.parquet"))
  return {
    "webdataset": os.path.join(root, "*.tar"),
    "parquet": os.path.join(root, "*.parquet"),
    "array_record": folder,
  }


def _iterator(source: str, pattern: str, root: str, resolution: int, batch: int, workers: int):
  if source != "array_record":
    data = dict(format=source, src=pattern, seed=0, decode_workers=workers)
    return streaming.train_stream(data, resolution=resolution, batch_size=batch)
  builder = datasets.prepare(
    "image_captions", os.path.join(root, "tfds"), src=pattern, max_resolution=resolution
  )
  return iter(
    pipeline.make_dataset(
      builder.as_data_source(split="train"),
      resolution=resolution,
      batch_size=batch,
      train=True,
      read_threads=workers,
    )
  )


def read_rate(source, pattern, root, resolution, batch, workers, examples) -> float:
  """Examples/s of one source's training pipeline, after one untimed batch."""
  it = _iterator(source, pattern, root, resolution, batch, workers)
  next(it)
  t0, done = time.perf_counter(), 0
  while done < examples:
    done += len(next(it)["image"])
  rate = done / (time.perf_counter() - t0)
  if hasattr(it, "close"):
    it.close()
  return rate


def train_rates(config: Any, src: str, steps: int) -> dict[str, float]:
  """Images/s of each stage's bare train step on this host (its first batch read from
  the benchmark's tars)."""
  from benchmarks import train_loop  # pylint: disable=g-import-not-at-top  (jax, slow)

  config = config.copy_and_resolve_references()
  config.data.update(dict(format="webdataset", src=src, name="", prepare=False))
  config.data.builder_kwargs = {}
  out = {}
  for name in config.stage_order:
    out[name] = train_loop.bare_step(config, name, steps)
    print(f"train step {name}: {out[name]:.1f} images/s", file=sys.stderr, flush=True)
  return out


def run(config: Any, workers: int, n: int, steps: int) -> dict:
  """Measures every source at every resolution, and the stages' train steps."""
  workers = workers or pipeline.default_read_threads()
  batch = int(config.train.batch_size)
  rows = []
  with tempfile.TemporaryDirectory() as root:
    patterns = write_corpus(root, n)
    for source, pattern in patterns.items():
      for r in RESOLUTIONS:
        rate = read_rate(source, pattern, root, r, batch, workers, 2 * n)
        rows.append({"source": source, "resolution": r, "examples_per_s": rate})
        print(f"{source} {r}px: {rate:.1f} examples/s", file=sys.stderr, flush=True)
    consume = train_rates(config, patterns["webdataset"], steps) if steps else {}
  return {
    "workers": workers,
    "batch": batch,
    "examples": n,
    "reads": rows,
    "train_step_images_per_s": consume,
    "machine": f"{cpu_model()}, {os.cpu_count()} cores",
    "date": datetime.date.today().isoformat(),
    "command": " ".join(["python", "-m", "benchmarks.input_pipeline"] + sys.argv[1:]),
  }


def table(result: dict) -> str:
  """The result as RESULTS.md tables."""
  w = result["workers"]
  reads = markdown_table(
    ["source", "px", f"examples/s ({w} threads)", "per thread"],
    [
      [
        r["source"],
        str(r["resolution"]),
        f"{r['examples_per_s']:.0f}",
        f"{r['examples_per_s'] / w:.0f}",
      ]
      for r in result["reads"]
    ],
  )
  steps = markdown_table(
    ["stage", "train step consumes (images/s, this host)"],
    [[k, f"{v:.1f}"] for k, v in result["train_step_images_per_s"].items()],
  )
  return reads + "\n\n" + steps


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.input_pipeline", description=__doc__.split("\n")[0]
  )
  cli.add_config_arg(p)
  p.add_argument("--workers", type=int, default=0, help="decoding threads (0: min(4, CPUs))")
  p.add_argument("--examples", type=int, default=256, help="images in the synthetic corpus")
  p.add_argument("--steps", type=int, default=3, help="timed train steps per stage (0: none)")
  p.add_argument("--json", help="also write the result to this JSON file")
  try:
    args, rest = p.parse_known_args(argv)
    config = cli.config_from_args(args, rest)
    if config is None:
      raise cli.UsageError("--config is required")
    for flag in ("workers", "examples", "steps"):
      if getattr(args, flag) < (1 if flag == "examples" else 0):
        raise cli.UsageError(f"--{flag}={getattr(args, flag)} must be positive")
  except cli.UsageError as err:
    print(f"input_pipeline: error: {err}", file=sys.stderr)
    return 2
  result = run(config, args.workers, args.examples, args.steps)
  print(table(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
