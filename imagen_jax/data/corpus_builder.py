"""TFDS builder `corpus_shards`: webdataset tars or parquet files prepared as ArrayRecord.

A corpus read by `imagen_jax.data.corpus` (webdataset tars, parquet files; local
or `gs://`) is written as a TFDS dataset with the features of `image_captions`
(`image`: encoded PNG/JPEG bytes, `caption`: text), so the grain pipeline reads
it with random access: the global shuffle and the exact elastic resume of every
TFDS source. Config names: `webdataset`, `parquet`, or `{format}_max{N}` with
`max_resolution=N`; read it as `config.data.name='corpus_shards/webdataset_max256'`
(`tfds.builder` finds it from its files).

Preparation runs in this process (`beam=False`) or as an Apache Beam pipeline
(`beam=True`, `imagen_jax.data.beam_corpus`) on any runner; both write the same
examples under the same keys (`{shard}#{index in shard}`), hence in the same
order. Each record goes through `convert`: skipped records (reasons in
`corpus.SKIP_REASONS`) are counted, images are stored as `image_captions`
stores them (`image_captions.convert_image_bytes`: RGB PNG/JPEG kept, others
and downscaled ones re-encoded as PNG). The counts (records read, examples
written, skipped by reason) and the smallest/largest stored side land in
`builder.info.metadata`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tqdm import tqdm

from imagen_jax import lockfile
from imagen_jax.data import corpus
from imagen_jax.data import datasets
from imagen_jax.data import image_captions
from imagen_jax.data.corpus_records import NAME, Outcome, Source, Tally, convert, read_records  # noqa: F401

# Written by the Beam pipeline into the dataset folder being prepared, read back
# into the metadata once the pipeline finished, then removed.
COUNTS_FILE = "prepare_counts.json"
_log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class CorpusShardsConfig(tfds.core.BuilderConfig):
  """Builder config of `corpus_shards`.

  Attributes:
    format: 'webdataset' or 'parquet'.
    max_resolution: downscale images whose shorter side exceeds this (None: keep).
  """

  format: str = "webdataset"
  max_resolution: int | None = None


def corpus_shards_config(fmt: str, max_resolution: int | None = None) -> CorpusShardsConfig:
  """The config `{fmt}` (original sizes) or `{fmt}_max{N}`."""
  if fmt not in corpus.FORMATS:
    raise ValueError(f"--dataset {fmt!r}: expected one of {', '.join(corpus.FORMATS)}.")
  if max_resolution is None:
    return CorpusShardsConfig(name=fmt, format=fmt, description=f"{fmt} shards, original sizes.")
  image_captions.image_captions_config(max_resolution)  # Same bounds check.
  return CorpusShardsConfig(
    name=f"{fmt}_max{max_resolution}",
    format=fmt,
    max_resolution=max_resolution,
    description=f"{fmt} shards, shorter side at most {max_resolution} pixels.",
  )


class CorpusShards(tfds.core.GeneratorBasedBuilder):
  """Webdataset or parquet shards prepared as a TFDS dataset (see the module doc)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [corpus_shards_config(f) for f in corpus.FORMATS]
  DEFAULT_CONFIG_NAME = "webdataset"

  def __init__(self, *, source: Source | None = None, beam: bool = False, **kwargs):
    """`source`: what to prepare (only needed to prepare); `beam`: as a Beam pipeline."""
    self._source, self._beam, self._tally = source, beam, None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          # Encoded image bytes (PNG or JPEG), uint8 [H, W, 3] once decoded.
          "image": tfds.features.Tensor(shape=(), dtype=np.object_),
          "caption": tfds.features.Text(),
        }
      ),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    if self._source is None:
      raise ValueError(f"{NAME} prepares only with source=Source(shards, options).")
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    """Yields (key, example) here, or returns the Beam transform that does."""
    if self._beam:
      from imagen_jax.data import beam_corpus  # pylint: disable=g-import-not-at-top

      return beam_corpus.PrepareExamples(
        self._source, os.fspath(epath.Path(self.data_dir) / COUNTS_FILE)
      )
    return self._generate_here()

  def _generate_here(self) -> Iterator[tuple[str, dict[str, Any]]]:
    self._tally = tally = Tally()
    bar = tqdm(self._source.shards, desc="shards", unit="shard")
    for shard in bar:
      for index, record in read_records(shard, self._source.options):
        status, side, key, example = convert(shard, index, record, self._source.max_resolution)
        tally.add(status, side)
        if key is not None:
          yield key, example
      bar.set_postfix(written=tally.written, skipped=tally.read - tally.written)

  def _download_and_prepare(self, dl_manager, download_config=None):
    try:
      super()._download_and_prepare(dl_manager, download_config)
    except Exception:  # TFDS refuses a split without examples (AssertionError).
      self._check_written()
      raise
    counts = self._check_written()
    opts = dataclasses.asdict(self._source.options)
    self.info.metadata.update(
      src=self._source.pattern,
      num_shards=len(self._source.shards),
      shards_sha1=self._source.fingerprint(),
      **opts,
      **counts,
    )

  def _check_written(self) -> dict[str, Any]:
    """The counts of the preparation; ValueError (one line) when nothing was written."""
    if self._tally is not None:
      counts = self._tally.as_dict()
    else:
      path = epath.Path(self.data_dir) / COUNTS_FILE
      if not path.exists():  # The pipeline failed before counting.
        return {}
      counts = _pop_counts(path)
    if not counts["num_written"]:
      raise ValueError(
        f"No decodable example in the {len(self._source.shards)} shards of "
        f"{self._source.pattern!r} ({_skips(counts)})."
      )
    return counts


def _pop_counts(path: epath.Path) -> dict[str, Any]:
  """Reads and removes the counts file that the Beam pipeline wrote."""
  counts = json.loads(path.read_text())
  path.unlink()
  return counts


def _skips(counts: dict[str, Any]) -> str:
  skipped = {k[len("num_skipped_") :]: v for k, v in counts.items() if k.startswith("num_sk")}
  return f"{counts['num_read']} records read; skipped: " + (
    ", ".join(f"{k} {v}" for k, v in skipped.items() if v) or "none"
  )


def summary(counts: dict[str, Any]) -> str:
  """One line: read, written, skipped by reason (from `Tally.as_dict` / the metadata)."""
  return f"{counts['num_written']} examples written; " + _skips(counts)


def load_builder(
  data_dir: str, fmt: str, max_resolution: int | None = None, **kwargs
) -> CorpusShards:
  """The `corpus_shards` builder of a format and resolution under `data_dir`."""
  config = corpus_shards_config(fmt, max_resolution)
  if config.name in CorpusShards.builder_configs:  # TFDS wants predefined by name.
    config = config.name
  return CorpusShards(config=config, data_dir=data_dir, file_format="array_record", **kwargs)


def dataset_name(builder: CorpusShards) -> str:
  """'corpus_shards/{config}': the `config.data.name` that reads the prepared dataset."""
  return f"{NAME}/{builder.builder_config.name}"


def check_source(src: str | list[str], options: corpus.CorpusOptions) -> tuple[str, ...]:
  """The shards of `src`, after reading the first record of the first one.

  Raises:
    ValueError: no shard matches, a malformed brace pattern, a parquet column
      that does not exist (naming those that do).
    corpus.ShardError: the first shard is missing or unreadable.
  """
  shards = tuple(corpus.expand_sources(src))
  next(iter(corpus.read_shard(shards[0], options)), None)
  return shards


def prepare(
  data_dir: str,
  src: str | list[str],
  options: corpus.CorpusOptions,
  *,
  max_resolution: int | None = None,
  beam_runner: str | None = None,
  beam_options: Any = None,
  wait: float | None = None,
) -> CorpusShards:
  """Prepares shards as `corpus_shards/{config}` under `data_dir` unless it already is.

  Args:
    data_dir: TFDS data directory (local or remote, e.g. gs://).
    src: shard files, a glob or a brace pattern (`corpus.expand_sources`).
    options: how to read the records (format, columns).
    max_resolution: downscale larger images (None: keep sizes).
    beam_runner: a Beam runner name ('DirectRunner', 'DataflowRunner', ...);
      with it or `beam_options`, prepares as a Beam pipeline, else here.
    beam_options: `apache_beam.options.pipeline_options.PipelineOptions`.
    wait: seconds to wait for another process preparing the same local dataset.

  Returns:
    The prepared builder; its `info.metadata` holds the counts (`Tally.as_dict`).

  Raises:
    ValueError / corpus.ShardError: bad input (see `check_source`), a corpus
      without any decodable example, or a dataset prepared from other shards.
    lockfile.Locked: another live process prepares it.
  """
  shards = check_source(src, options)
  pattern = src if isinstance(src, str) else ",".join(src)
  source = Source(shards, options, max_resolution, pattern)
  use_beam = beam_runner is not None or beam_options is not None
  builder = load_builder(data_dir, options.format, max_resolution, source=source, beam=use_beam)
  lock = contextlib.nullcontext()
  if "://" not in os.fspath(data_dir):
    os.makedirs(os.path.join(data_dir, NAME), exist_ok=True)
    lock = lockfile.hold(
      os.path.join(data_dir, NAME, f"{builder.builder_config.name}.lock"),
      what=f"preparation of {builder.info.full_name} in {data_dir}",
      wait=wait,
    )
  with lock:
    if datasets.is_prepared(builder):
      _check_same_source(builder, source)
      print(f"{builder.info.full_name} already prepared in {builder.data_dir}")
      return builder
    download_config = tfds.download.DownloadConfig()
    if use_beam:
      from imagen_jax.data import beam_corpus  # pylint: disable=g-import-not-at-top

      download_config = tfds.download.DownloadConfig(
        beam_runner=beam_corpus.make_runner(beam_runner), beam_options=beam_options
      )
    how = f"a Beam pipeline ({beam_runner or 'DirectRunner'})" if use_beam else "this process"
    print(f"Preparing {len(shards)} shards as {builder.info.full_name} in {how} ...", flush=True)
    builder.download_and_prepare(download_config=download_config, file_format="array_record")
  return builder


def _check_same_source(builder: CorpusShards, source: Source) -> None:
  meta = builder.info.metadata or {}
  if meta.get("shards_sha1") != source.fingerprint():
    raise ValueError(
      f"{builder.data_dir} was prepared from {meta.get('num_shards')} shards of "
      f"{meta.get('src')!r}, not {len(source.shards)} of {source.pattern!r}: use another "
      "--data_dir (or remove that folder)."
    )
