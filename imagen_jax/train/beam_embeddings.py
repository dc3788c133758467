"""The caption embeddings of a prepared dataset, computed by Apache Beam workers.

The distributed twin of `imagen_jax.train.embeddings.write`: the same captions
(every distinct caption of the training split, and ''), the same frozen T5
(`config.text`), the same cache (`imagen_jax.text.cache`) at the same place
(`embeddings.embed_dir(config)`), read by the same `CaptionEmbeddings` when
training with `config.text.precomputed=True`. The pipeline:

  index ranges --> captions (TFDS random access) --> distinct, plus ''
    --> parts of about `part_size` captions (by a hash of the caption)
    --> each part encoded by a worker in batches of `batch_size` and written as
        a cache of its own, `part-XXXXX/` (`cache.write_embedding_cache`)
    --> index.json + captions.jsonl at the top, naming the parts' files.

A part is written where the worker runs and copied to `embed_dir` through
`etils.epath`, so `gs://` works; `EmbeddingCache` reads local folders. It sits
at the train layer because it needs both `data/` and `text/`, which are leaves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any

import apache_beam as beam
from etils import epath

from imagen_jax.data import datasets
from imagen_jax.text import cache as cache_lib
from imagen_jax.train import embeddings

_NAMESPACE = "embeddings"
_log = logging.getLogger(__name__)


class _ReadCaptions(beam.DoFn):
  """(start, stop) -> the captions of those examples of the split."""

  def __init__(self, data: Any):
    self._name, self._data_dir, self._split = data.name, os.fspath(data.data_dir), data.split

  def setup(self):
    builder = datasets.load_builder(self._name, self._data_dir)
    self._source = builder.as_data_source(split=self._split)

  def process(self, start_stop):
    for i in range(*start_stop):
      c = self._source[i]["caption"]
      yield c.decode("utf-8") if isinstance(c, bytes) else str(c)


def _part_of(caption: str, num_parts: int) -> int:
  """A stable part number (the same on every worker and every run)."""
  return int.from_bytes(hashlib.sha1(caption.encode("utf-8")).digest()[:8], "big") % num_parts


class _EncodePart(beam.DoFn):
  """(part, captions) -> the part's cache written under `out_dir`; yields its name."""

  def __init__(self, text_config: Any, out_dir: str, batch_size: int):
    self._text_config, self._out_dir, self._batch_size = text_config, out_dir, batch_size

  def setup(self):
    from imagen_jax.text import TextEncoder  # pylint: disable=g-import-not-at-top

    self._encoder = TextEncoder.from_config(self._text_config)

  def process(self, part_captions):
    part, captions = part_captions
    captions = sorted(captions)
    name = f"part-{part:05d}"
    with tempfile.TemporaryDirectory() as tmp:
      cache_lib.write_embedding_cache(
        self._encoder,
        captions,
        tmp,
        int(self._text_config.max_length),
        batch_size=self._batch_size,
        shard_size=self._batch_size * -(-len(captions) // self._batch_size),
      )
      dest = epath.Path(self._out_dir) / name
      dest.mkdir(parents=True, exist_ok=True)
      for f in os.listdir(tmp):
        epath.Path(tmp, f).copy(dest / f, overwrite=True)
    beam.metrics.Metrics.counter(_NAMESPACE, "captions_encoded").inc(len(captions))
    _log.info("encoded %d captions into %s", len(captions), dest)
    yield name


def merge_parts(out_dir: str, parts: list[str]) -> int:
  """Writes the top-level index.json and captions.jsonl naming the parts' files.

  Args:
    out_dir: the cache directory holding `parts` (sub-folders, each a cache).
    parts: their names, in the order the merged cache indexes them.

  Returns:
    The number of captions in the merged cache.
  """
  root = epath.Path(out_dir)
  merged, lines = None, []
  for part in sorted(parts):
    index = json.loads((root / part / cache_lib.INDEX_FILE).read_text())
    for shard in index["shards"]:
      shard.update(emb=f"{part}/{shard['emb']}", mask=f"{part}/{shard['mask']}")
    if merged is None:
      merged = dict(index, num=0, shards=[])
    merged["num"] += index["num"]
    merged["shards"] += index["shards"]
    lines.append((root / part / cache_lib.CAPTIONS_FILE).read_text())
  (root / cache_lib.CAPTIONS_FILE).write_text("".join(lines))
  (root / cache_lib.INDEX_FILE).write_text(json.dumps(merged, indent=1))
  return merged["num"]


def _ranges(n: int, per: int) -> list[tuple[int, int]]:
  return [(start, min(n, start + per)) for start in range(0, n, per)]


def write(
  config: Any,
  runner: Any = None,
  options: Any = None,
  *,
  part_size: int = 4096,
  batch_size: int = 64,
  examples_per_read: int = 1024,
) -> str:
  """Computes the cache of `embeddings.write(config)` as a Beam pipeline.

  Args:
    config: the training config: `config.data` names the prepared dataset
      (name, data_dir, split), `config.text` the frozen encoder.
    runner: a Beam runner (instance or name; None: the DirectRunner's engine,
      `beam_corpus.make_runner`).
    options: `PipelineOptions` (e.g. `--direct_num_workers=2`, Dataflow's).
    part_size: about how many captions one worker encodes into one part.
    batch_size: captions per encoder call (as in the in-process path).
    examples_per_read: examples per caption-reading task.

  Returns:
    The cache directory, `embeddings.embed_dir(config)`.
  """
  from imagen_jax.data import beam_corpus  # pylint: disable=g-import-not-at-top

  d = config.data
  builder = datasets.load_builder(d.name, d.data_dir)
  datasets.require_prepared(builder)
  num_examples = builder.info.splits[d.split].num_examples
  out_dir = embeddings.embed_dir(config)
  root = epath.Path(out_dir)
  root.mkdir(parents=True, exist_ok=True)
  for old in root.glob("part-*"):  # Left by an earlier run: its index goes too.
    old.rmtree()
  runner = beam_corpus.make_runner(runner) if runner is None or isinstance(runner, str) else runner
  with beam.Pipeline(runner=runner, options=options) as p:
    captions = (
      p
      | "Ranges" >> beam.Create(_ranges(num_examples, examples_per_read))
      | "Spread" >> beam.Reshuffle()
      | "ReadCaptions" >> beam.ParDo(_ReadCaptions(d))
    )
    distinct = (
      (captions, p | "Empty" >> beam.Create([""])) | beam.Flatten() | "Distinct" >> beam.Distinct()
    )
    num_parts = (
      distinct
      | "Count" >> beam.combiners.Count.Globally()
      | "NumParts" >> beam.Map(lambda n: max(1, -(-n // part_size)))
    )
    _ = (
      distinct
      | "ToPart" >> beam.Map(lambda c, k: (_part_of(c, k), c), k=beam.pvalue.AsSingleton(num_parts))
      | "GroupParts" >> beam.GroupByKey()
      | "Encode" >> beam.ParDo(_EncodePart(config.text, out_dir, batch_size))
      | "AllParts" >> beam.combiners.ToList()
      | "Merge" >> beam.Map(lambda parts: merge_parts(out_dir, parts))
    )
  return out_dir
