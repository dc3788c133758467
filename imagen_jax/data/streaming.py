"""Streaming training input from webdataset / parquet shards, with an exact resume.

  this process's shards: sorted(expand_sources(data.src))[process_index::process_count]
  per epoch: those shards in a seeded order, `data.interleave` of them read at a
    time (round robin), records through a seeded shuffle buffer of
    `data.shuffle_buffer`  -> the epoch's SLOT order (deterministic, no decoding)
  -> decoded by `data.decode_workers` threads, resized + random-cropped to R
     (crop seeded by (seed, epoch, shard, record)), skipped records counted
  -> batches {'image': uint8 [B, R, R, 3], 'caption': object [B], 'key': object [B]}
     of consecutive good examples; epochs follow each other without a gap.

Position: after each batch a process is at (epoch, slot): the next slot of its
epoch order. `checkpoint_fields` gathers every process's position into the
checkpoint's data item ({'stream': [[epoch, slot], ...]}); a resumed run with the
same process count replays each process's slot order up to its slot WITHOUT
decoding (records are re-read, images are not) and continues with the next
example: no example twice in an epoch, none skipped. With another process count
the shards are re-assigned, so the interrupted epoch cannot continue: the run
starts the next epoch (the rest of the interrupted one is not seen) and warns.

Every process reads as many batches as the others (each stream repeats forever);
an epoch in which a process finds no decodable example is an error.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from imagen_jax.data import corpus, images

_log = logging.getLogger(__name__)
_HISTORY = 256  # batch positions remembered: more than any read-ahead


@dataclasses.dataclass(frozen=True)
class StreamSpec:
  """One process's share of a sharded corpus and how it is ordered."""

  shards: tuple[str, ...]  # every shard of the corpus, sorted
  opts: corpus.CorpusOptions
  process_index: int = 0
  process_count: int = 1
  seed: int = 0
  interleave: int = 4
  shuffle_buffer: int = 1000

  @property
  def local(self) -> tuple[int, ...]:
    """Indices (into `shards`) of this process's shards."""
    return tuple(range(self.process_index, len(self.shards), self.process_count))


def is_streaming(data: Mapping[str, Any]) -> bool:
  """Whether `config.data.format` is a streamed format ('' or 'tfds': a TFDS source).

  Raises:
    ValueError: an unknown format (one line).
  """
  fmt = data.get("format") or "tfds"
  if fmt not in ("tfds", *corpus.FORMATS):
    raise ValueError(
      f"config.data.format={fmt!r}: expected '' (TFDS), {', '.join(map(repr, corpus.FORMATS))}."
    )
  return fmt != "tfds"


def spec_from_config(data: Mapping[str, Any], process_index: int, process_count: int):
  """The checked `StreamSpec` of `config.data` for this process.

  Raises:
    ValueError: one line: a bad format, pattern or setting, fewer shards than
      processes, or a parquet column that does not exist (checked on the first
      shard).
  """
  opts = corpus.options_from_config(data)
  for field in ("interleave", "shuffle_buffer"):
    if int(data.get(field, 1)) < 1:
      raise ValueError(f"config.data.{field}={data.get(field)!r} must be >= 1.")
  src = data.get("src")
  shards = corpus.expand_sources(src if isinstance(src, str) else list(src or ()))
  if len(shards) < process_count:
    raise ValueError(
      f"config.data.src={src!r} has {len(shards)} shard(s), fewer than the "
      f"{process_count} processes: each process needs at least one shard."
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  if opts.format == "parquet":
    try:
      corpus._parquet_fields(shards[0], corpus.parquet_columns(shards[0]), opts)
    except corpus.ShardError as e:
      raise ValueError(str(e)) from None
  return StreamSpec(
    tuple(shards),
    opts,
    process_index,
    process_count,
    seed=int(data.get("seed", 0)),
    interleave=int(data.get("interleave", 4)),
    shuffle_buffer=int(data.get("shuffle_buffer", 1000)),
  )


def _rng(spec: StreamSpec, *words: int) -> np.random.Generator:
  return np.random.default_rng([spec.seed, *words])


def epoch_slots(spec: StreamSpec, epoch: int) -> Iterator[tuple[int, int, corpus.Record]]:
  """This process's records of one epoch in slot order: (shard index, record index, record).

  Deterministic given the spec and the epoch; nothing is decoded.
  """
  local = list(spec.local)
  order = [local[i] for i in _rng(spec, 0, epoch, spec.process_index).permutation(len(local))]
  pending = collections.deque(order)
  active: collections.deque = collections.deque()

  def records():
    while pending or active:
      while pending and len(active) < spec.interleave:
        shard = pending.popleft()
        active.append((shard, enumerate(corpus.read_shard(spec.shards[shard], spec.opts))))
      shard, it = active.popleft()
      item = next(it, None)
      if item is not None:
        yield shard, item[0], item[1]
        active.append((shard, it))

  rng = _rng(spec, 1, epoch, spec.process_index)
  buffer: list = []
  for item in records():
    if len(buffer) < spec.shuffle_buffer:
      buffer.append(item)
      continue
    i = int(rng.integers(len(buffer)))
    yield buffer[i]
    buffer[i] = item
  for i in rng.permutation(len(buffer)):
    yield buffer[i]


@dataclasses.dataclass
class _Example:
  epoch: int
  slot: int
  key: str
  caption: str | None
  image: np.ndarray | None  # uint8 [R, R, 3], None for a skipped record
  skip: str | None


class StreamIterator:
  """Batches of one process's stream (see the module docstring).

  Attributes:
    skipped: Counter of skipped records by reason (this run, this process).
    epoch, slot: the position after the last batch handed out.
    workers: decoding threads.
  """

  def __init__(
    self,
    spec: StreamSpec,
    *,
    resolution: int,
    batch_size: int,
    epoch: int = 0,
    slot: int = 0,
    start_example: int = 0,
    workers: int = 0,
  ):
    self._crop = images.resize_and_crop
    self.spec, self.resolution, self.batch_size = spec, resolution, batch_size
    self.epoch, self.slot = epoch, slot
    self.skipped: collections.Counter = collections.Counter()
    self._examples = start_example
    self._global = batch_size * spec.process_count
    self._history: collections.deque = collections.deque(maxlen=_HISTORY)
    self._history.append((start_example, epoch, slot))
    self.workers = workers or images.default_read_threads()
    self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
    self._window = 4 * self.workers
    self._decoded = self._decode_stream()

  def _slots(self) -> Iterator[tuple[int, int, int, corpus.Record]]:
    epoch, start = self.epoch, self.slot
    while True:
      for slot, (shard, index, record) in enumerate(epoch_slots(self.spec, epoch)):
        if slot >= start:
          yield epoch, slot, shard, index, record
      epoch, start = epoch + 1, 0

  def _prepare(self, epoch, slot, shard, index, record) -> _Example:
    """Decodes and crops one record (in a worker thread)."""
    if record.skip is not None:
      return _Example(epoch, slot, record.key, None, None, record.skip)
    image = corpus.decode_image(record.image)
    if image is None:
      return _Example(epoch, slot, record.key, None, None, "undecodable_image")
    rng = _rng(self.spec, 2, epoch, shard, index)
    return _Example(
      epoch, slot, record.key, record.caption, self._crop(image, self.resolution, rng), None
    )

  def _decode_stream(self) -> Iterator[_Example]:
    """Examples in slot order, decoded `self._window` ahead by the worker threads."""
    window: collections.deque = collections.deque()
    epoch, good, whole = self.epoch, 0, self.slot == 0
    for item in self._slots():
      window.append(self._pool.submit(self._prepare, *item))
      while len(window) > self._window or (window and window[0].done()):
        example = window.popleft().result()
        if example.epoch != epoch:
          if whole and not good:
            raise ValueError(
              f"No decodable example in the {len(self.spec.local)} shard(s) of process "
              f"{self.spec.process_index} (epoch {epoch}; skipped: {dict(self.skipped)})."
            )
          epoch, good, whole = example.epoch, 0, True
        good += example.skip is None
        yield example

  def __iter__(self) -> "StreamIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    examples = []
    while len(examples) < self.batch_size:
      example = next(self._decoded)
      if example.skip is not None:
        self.skipped[example.skip] += 1
        continue
      examples.append(example)
    self.epoch, self.slot = examples[-1].epoch, examples[-1].slot + 1
    self._examples += self._global
    self._history.append((self._examples, self.epoch, self.slot))
    batch = {"image": np.stack([e.image for e in examples])}
    for name in ("caption", "key"):
      batch[name] = np.empty((len(examples),), dtype=object)
      batch[name][:] = [getattr(e, name) for e in examples]
    return batch

  def position(self, examples: int) -> tuple[int, int]:
    """(epoch, slot) of this process once `examples` global examples were consumed."""
    for done, epoch, slot in reversed(self._history):
      if done == examples:
        return epoch, slot
    raise ValueError(f"the stream has no position for {examples} examples (read too far ahead)")

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)


def start_position(data_state: Mapping[str, Any] | None, spec: StreamSpec) -> tuple[int, int]:
  """(epoch, slot) to start this process at, from a checkpoint's data item."""
  rows = (data_state or {}).get("stream")
  if not rows:
    return 0, 0
  if len(rows) == spec.process_count:
    epoch, slot = rows[spec.process_index]
    return int(epoch), int(slot)
  epoch = max(int(e) for e, _ in rows) + 1
  _log.warning(
    "The checkpoint's stream position is for %d processes, this run has %d: the shards are "
    "re-assigned, so training starts epoch %d (the rest of the interrupted epoch is not seen).",
    len(rows),
    spec.process_count,
    epoch,
  )
  return epoch, 0


def train_stream(
  data: Mapping[str, Any],
  *,
  resolution: int,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  start_example: int = 0,
  data_state: Mapping[str, Any] | None = None,
) -> StreamIterator:
  """The streaming training iterator of `config.data` for this process.

  Args:
    data: `config.data` with format 'webdataset' | 'parquet' and src.
    resolution: side R of the produced images.
    batch_size: per-process batch size.
    process_index: this process.
    process_count: number of processes.
    start_example: global examples already consumed (bookkeeping only).
    data_state: the checkpoint's data item (its 'stream' positions), or None.

  Returns:
    A `StreamIterator` of {'image': uint8 [B, R, R, 3], 'caption', 'key': object [B]}.
  """
  spec = spec_from_config(data, process_index, process_count)
  epoch, slot = start_position(data_state, spec)
  return StreamIterator(
    spec,
    resolution=resolution,
    batch_size=batch_size,
    epoch=epoch,
    slot=slot,
    start_example=start_example,
    workers=int(data.get("decode_workers", 0)),
  )


def _gather(values: Sequence[int]) -> np.ndarray:
  """[process_count, len(values)] int64: every process's values (a collective)."""
  import jax  # pylint: disable=g-import-not-at-top  (reading stays jax-free)

  local = np.asarray(values, dtype=np.int64)
  if jax.process_count() == 1:
    return local[None]
  from imagen_jax.parallel import distributed  # pylint: disable=g-import-not-at-top

  return distributed.host_allgather(local, "stream positions").reshape(jax.process_count(), -1)


def checkpoint_fields(iterator: Any, examples: int) -> dict[str, Any]:
  """Extra fields of the checkpoint's data item: every process's stream position.

  Called by every process at the same step (it gathers); {} for TFDS iterators.
  """
  if not isinstance(iterator, StreamIterator):
    return {}
  return {"stream": _gather(iterator.position(examples)).tolist()}


def input_metrics(iterator: Any) -> dict[str, int]:
  """'skipped_<reason>': records skipped so far by this run (all processes, read-ahead
  included); every process calls it at the same step. {} for TFDS iterators."""
  if not isinstance(iterator, StreamIterator):
    return {}
  counts = _gather([iterator.skipped[r] for r in corpus.SKIP_REASONS]).sum(axis=0)
  return {f"skipped_{r}": int(c) for r, c in zip(corpus.SKIP_REASONS, counts)}


def check_config(data: Mapping[str, Any], process_count: int) -> None:
  """Checks a streamed `config.data` before any device work (no-op for TFDS sources).

  Raises:
    ValueError: one line (see `spec_from_config`).
  """
  if is_streaming(data):
    spec_from_config(data, 0, process_count)
