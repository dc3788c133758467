"""Grain input pipeline over TFDS data sources, one process's share of it.

  train:
    source (tfds ArrayRecord data source: {'image': bytes, 'caption': bytes})
    -> seeded shuffle of the whole source, re-shuffled every epoch, repeated
    -> decode (PIL) + resize shorter side + random crop to [R, R, 3]
       (the crop seeded by the example's position in this global order)
    -> from `start_example` on, global batches of `batch_size * process_count`
       examples; this process takes rows [p * batch_size, (p + 1) * batch_size)
    -> batches {'image': uint8 [B, R, R, 3], 'caption': object [B] of str}
  eval:
    source -> this process's shard (examples process_index, +process_count, ...)
    -> decode + center crop -> batches, the last one possibly partial

The training order is one global sequence of examples whatever the number of
processes and the batch size: the concatenation of the processes' batches is
the global batch a single process would read, and a run that stopped after E
examples continues exactly at example E with `start_example=E`, on any
number of processes and with any batch size (elastic resume).

No horizontal flips: shapes captions say "left" and "right".

The iterator (`iter(dataset)`) is a grain `DatasetIterator`: `get_state()`
returns a small dict to store with a checkpoint, and `set_state(state)` on a
fresh iterator of the same pipeline reproduces the same following batches.
Reading never imports TensorFlow.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from imagen_jax.data import corpus, datasets, streaming
from imagen_jax.data.images import default_read_threads, resize_and_crop  # noqa: F401

Batch = dict[str, np.ndarray]


def decode_image(image: Any) -> np.ndarray:
  """Encoded image bytes (or an already decoded array) -> uint8 [H, W, 3].

  Bytes are converted by `images.to_rgb` (16-bit scaled, alpha on black).
  """
  if isinstance(image, (bytes, np.bytes_)):
    return corpus.decode_bytes(bytes(image))
  image = np.asarray(image, dtype=np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image[..., :3]


def _caption(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _preprocess(
  example: Mapping[str, Any],
  rng: np.random.Generator | None,
  *,
  resolution: int,
  image_key: str,
  caption_key: str,
) -> dict:
  """Decodes and crops one example (module-level, so grain can pickle it)."""
  image = resize_and_crop(decode_image(example[image_key]), resolution, rng)
  return {"image": image, "caption": _caption(example[caption_key])}


def _batch_fn(examples: Sequence[dict]) -> Batch:
  """Stacks images to uint8 [B, R, R, 3]; captions to an object array [B]."""
  captions = np.empty((len(examples),), dtype=object)
  captions[:] = [e["caption"] for e in examples]
  return {"image": np.stack([e["image"] for e in examples]), "caption": captions}


def shard(source: Sequence[Any], process_index: int, process_count: int) -> grain.MapDataset:
  """This process's examples: index `process_index` + k * `process_count`.

  The source is first cut to a multiple of `process_count` (dropping at most
  `process_count - 1` examples) so that every process has as many examples
  per epoch and all processes step in lockstep.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count}).")
  n = len(source) // process_count * process_count
  if n == 0:
    raise ValueError(
      f"The source has {len(source)} examples, fewer than process_count={process_count}."
    )
  ds = grain.MapDataset.source(source)
  return ds[:n][process_index::process_count]


class _ProcessRows(grain.MapDataset):
  """This process's rows of consecutive global batches of a global order.

  Element m is global element ``start + k * B + p * b + j`` where
  ``k, j = divmod(m, b)``, B = b * process_count: batching this view by b gives
  this process's share of each global batch. A trailing partial global batch
  is dropped (all processes step in lockstep).
  """

  def __init__(
    self,
    parent: grain.MapDataset,
    *,
    batch_size: int,
    process_index: int,
    process_count: int,
    start: int,
  ):
    super().__init__(parent)
    self._b, self._p, self._start = batch_size, process_index, start
    self._global = batch_size * process_count

  def __len__(self) -> int:
    return max(0, (len(self._parent) - self._start) // self._global) * self._b

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    k, j = divmod(index, self._b)
    return self._parent[self._start + k * self._global + self._p * self._b + j]

  def __str__(self) -> str:
    return f"ProcessRows(b={self._b}, p={self._p}, B={self._global}, start={self._start})"


def make_dataset(
  source: Sequence[Any],
  *,
  resolution: int,
  batch_size: int,
  train: bool,
  seed: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  start_example: int = 0,
  num_epochs: int | None = None,
  drop_remainder: bool | None = None,
  read_threads: int | None = None,
  image_key: str = "image",
  caption_key: str = "caption",
) -> grain.IterDataset:
  """Builds the per-process input pipeline.

  Args:
    source: random-access examples (`builder.as_data_source(split)`,
      `tfds.data_source(...)[split]`), dicts with encoded image bytes or
      uint8 [H, W, 3] arrays under `image_key` and text under `caption_key`.
    resolution: side R of the produced images.
    batch_size: examples per batch on this process (global batch divided by
      `process_count`).
    train: shuffle, repeat and random-crop; else keep order, center-crop.
    seed: seeds the shuffle and the crops; same seed, same batches.
    process_index: this process (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).
    start_example: train only: global examples already consumed (a resumed
      run's data position); the first global batch starts there.
    num_epochs: None repeats forever; default None for train, 1 for eval.
    drop_remainder: eval: drop a last partial batch (default False); train
      always drops a trailing partial global batch.
    read_threads: threads decoding batches (default min(4, CPUs)).
    image_key: feature holding the image.
    caption_key: feature holding the caption.

  Returns:
    A grain IterDataset of `{'image': uint8 [B, R, R, 3], 'caption': object
    [B] of str}`; `iter()` it for a checkpointable iterator.
  """
  if batch_size < 1 or resolution < 1:
    raise ValueError(f"batch_size ({batch_size}) and resolution ({resolution}) must be positive.")
  num_epochs = (None if train else 1) if num_epochs is None else num_epochs
  preprocess = functools.partial(
    _preprocess, resolution=resolution, image_key=image_key, caption_key=caption_key
  )
  if train:
    if not 0 <= process_index < process_count:
      raise ValueError(
        f"process_index {process_index} is not in [0, process_count={process_count})."
      )
    if len(source) < process_count:
      raise ValueError(
        f"The source has {len(source)} examples, fewer than process_count={process_count}."
      )
    if start_example < 0:
      raise ValueError(f"start_example={start_example} must be >= 0.")
    ds = grain.MapDataset.source(source).shuffle(seed=seed)
    if num_epochs != 1:
      ds = ds.repeat(num_epochs)
    ds = ds.random_map(preprocess, seed=seed)
    ds = _ProcessRows(
      ds,
      batch_size=batch_size,
      process_index=process_index,
      process_count=process_count,
      start=start_example,
    )
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_batch_fn)
  else:
    ds = shard(source, process_index, process_count)
    if num_epochs != 1:
      ds = ds.repeat(num_epochs)
    ds = ds.map(functools.partial(preprocess, rng=None))
    ds = ds.batch(batch_size, drop_remainder=bool(drop_remainder), batch_fn=_batch_fn)
  if read_threads is None:
    read_threads = default_read_threads()
  return ds.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2, read_threads))
  )


def build_input(
  name: str,
  data_dir: str | os.PathLike,
  split: str,
  *,
  resolution: int,
  batch_size: int,
  train: bool,
  seed: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  builder_kwargs: Mapping[str, Any] | None = None,
  downscale: bool = False,
  **kwargs,
) -> grain.IterDataset:
  """Loads a prepared dataset and builds its pipeline.

  Args:
    name: `shapes`, `image_captions` or another TFDS name.
    data_dir: TFDS data directory where it was prepared.
    split: e.g. `train`, `test`, `holdout`, `train[:90%]`.
    resolution: side R of the produced images (the stage's resolution).
    batch_size: per-process batch size.
    train: training (shuffled, repeated) or evaluation order.
    seed: pipeline seed.
    process_index: this process.
    process_count: number of processes.
    builder_kwargs: builder settings as in `datasets.load_builder`.
    downscale: reading stored images an integer factor larger than `resolution`
      is intended (`datasets.check_resolution` does not warn).
    **kwargs: passed on to `make_dataset`.

  Returns:
    As `make_dataset`.

  Raises:
    FileNotFoundError: `data_dir` missing, empty, or the dataset unprepared.
  """
  builder = datasets.load_builder(name, data_dir, **(builder_kwargs or {}))
  datasets.require_prepared(builder)
  datasets.check_resolution(builder, resolution, downscale)
  source = builder.as_data_source(split=split)
  return make_dataset(
    source,
    resolution=resolution,
    batch_size=batch_size,
    train=train,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    **kwargs,
  )


def train_captions(data: Mapping[str, Any]) -> Iterator[str]:
  """Every caption of a config's training split, in stored order (prepared if needed).

  Reads the caption feature alone (images stay encoded): the corpus a word
  tokenizer is fitted on. A streamed corpus: every good record's caption, shards
  in sorted order.
  """
  if streaming.is_streaming(data):
    opts = corpus.options_from_config(data)
    for shard in corpus.expand_sources(data["src"]):
      yield from (r.caption for r in corpus.read_shard(shard, opts) if r.skip is None)
    return
  settings = datasets.prepare_from_config(data)
  builder = datasets.load_builder(data["name"], data["data_dir"], **settings)
  datasets.require_prepared(builder)
  source = builder.as_data_source(split=data["split"])
  for i in range(len(source)):
    yield _caption(source[i]["caption"])


def train_input(
  data: Mapping[str, Any],
  *,
  resolution: int,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  data_state: Mapping[str, Any] | None = None,
  **kwargs,
) -> grain.IterDataset | streaming.StreamIterator:
  """The training pipeline of a config's `data` group, prepared if needed.

  Checks the settings (`datasets.builder_settings`: one-line errors naming
  the `config.data` field), prepares `shapes` / `image_captions` when
  `data.prepare` is set (under a lock; re-prepared when the source changed),
  then builds the shuffled, repeated pipeline of `data.split`.

  Args:
    data: `config.data` (name, data_dir, split, builder_kwargs, prepare, src,
      seed, downscale).
    resolution: side R of the produced images (the stage's resolution).
    batch_size: per-process batch size.
    process_index: this process.
    process_count: number of processes.
    data_state: streamed corpora: the checkpoint's data item to resume from.
    **kwargs: passed on to `make_dataset`.

  A streamed corpus (`data.format` 'webdataset' | 'parquet') gives a
  `streaming.StreamIterator` instead (see `imagen_jax.data.streaming`; it
  resumes from `data_state`, the checkpoint's data item).

  Returns:
    As `make_dataset`, with train=True.
  """
  if streaming.is_streaming(data):
    return streaming.train_stream(
      data,
      resolution=resolution,
      batch_size=batch_size,
      process_index=process_index,
      process_count=process_count,
      start_example=kwargs.get("start_example", 0),
      data_state=data_state,
    )
  settings = datasets.prepare_from_config(data)
  return build_input(
    data["name"],
    data["data_dir"],
    data["split"],
    resolution=resolution,
    batch_size=batch_size,
    train=True,
    seed=data["seed"],
    process_index=process_index,
    process_count=process_count,
    builder_kwargs=settings,
    downscale=bool(data.get("downscale", False)),
    **kwargs,
  )


def make_global_batch(batch: Mapping[str, Any], mesh: Any, partition_spec: Any) -> dict[str, Any]:
  """Assembles global jax Arrays from every process's local batch.

  Numeric leaves become `jax.Array`s of global shape [B * process_count, ...]
  sharded as `partition_spec` on `mesh`; string leaves (captions) stay local
  numpy arrays, since they must be tokenized or embedded first.

  Args:
    batch: this process's batch, e.g. {'image': uint8 [B, R, R, 3], ...}.
    mesh: a `jax.sharding.Mesh`.
    partition_spec: a `jax.sharding.PartitionSpec` for the leading batch axis,
      e.g. `P(('data', 'fsdp'))`.

  Returns:
    The same keys, numeric values as global `jax.Array`s.
  """
  import jax  # pylint: disable=g-import-not-at-top  (keep reading jax-free)

  sharding = jax.sharding.NamedSharding(mesh, partition_spec)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind in "OUS":
      out[key] = value
    else:
      out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
