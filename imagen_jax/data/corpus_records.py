"""The per-record rule of `corpus_shards`, shared by its two preparations.

The in-process builder (`corpus_builder`) and the Beam pipeline (`beam_corpus`)
both read shards with `read_records`, turn each record into an `Outcome` with
`convert` and count outcomes in a `Tally`, so both write the same examples under
the same keys (`{shard}#{index in shard}`). A module of its own so that neither
preparation imports the other (the builder loads the Beam side only when asked).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Iterator

from imagen_jax.data import corpus, image_captions

NAME = "corpus_shards"


@dataclasses.dataclass(frozen=True)
class Source:
  """What to prepare (picklable: Beam ships it to its workers).

  Attributes:
    shards: shard paths, as `corpus.expand_sources` returns them.
    options: how to read their records.
    max_resolution: as in `CorpusShardsConfig`.
    pattern: the `--src` the shards came from (stored in the metadata).
  """

  shards: tuple[str, ...]
  options: corpus.CorpusOptions
  max_resolution: int | None = None
  pattern: str = ""

  def fingerprint(self) -> str:
    """sha1 of the shard paths: the same shards, whatever pattern named them."""
    return hashlib.sha1("\n".join(self.shards).encode("utf-8")).hexdigest()


# (status, stored shorter side or 0, key or None, example or None); status is
# 'written' or a skip reason.
Outcome = tuple[str, int, str | None, dict[str, Any] | None]


def convert(shard: str, index: int, record: corpus.Record, max_resolution: int | None) -> Outcome:
  """One record as read from a shard -> what to store (or why not).

  Args:
    shard: the shard path (part of the key).
    index: the record's position in its shard (part of the key).
    record: the record; `record.skip` set means skipped as it is.
    max_resolution: downscale larger images (None: keep sizes).

  Returns:
    ('written', shorter side, key, {'image': bytes, 'caption': str}), or
    (skip reason, 0, None, None).
  """
  if record.skip is not None:
    return record.skip, 0, None, None
  try:
    data, hw = image_captions.convert_image_bytes(record.image, max_resolution)
  except Exception:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
    return "undecodable_image", 0, None, None
  return "written", min(hw), f"{shard}#{index}", {"image": data, "caption": record.caption}


class Tally:
  """Counts of outcomes: records read, examples written, skipped by reason, sides."""

  def __init__(self):
    self.read, self.written = 0, 0
    self.skipped = dict.fromkeys(corpus.SKIP_REASONS, 0)
    self.min_side, self.max_side = None, None

  def add(self, status: str, side: int) -> "Tally":
    """Counts one outcome (`Outcome[:2]`)."""
    self.read += 1
    if status != "written":
      self.skipped[status] = self.skipped.get(status, 0) + 1
      return self
    self.written += 1
    self.min_side = side if self.min_side is None else min(self.min_side, side)
    self.max_side = side if self.max_side is None else max(self.max_side, side)
    return self

  def merge(self, other: "Tally") -> "Tally":
    """Adds another tally's counts to this one."""
    self.read += other.read
    self.written += other.written
    for reason, n in other.skipped.items():
      self.skipped[reason] = self.skipped.get(reason, 0) + n
    for side in (other.min_side, other.max_side):
      if side is not None:
        self.min_side = side if self.min_side is None else min(self.min_side, side)
        self.max_side = side if self.max_side is None else max(self.max_side, side)
    return self

  def as_dict(self) -> dict[str, Any]:
    """{'num_read', 'num_written', 'num_skipped_{reason}'..., 'min_side', 'max_side'}."""
    return {
      "num_read": self.read,
      "num_written": self.written,
      **{f"num_skipped_{k}": v for k, v in sorted(self.skipped.items())},
      "min_side": self.min_side or 0,
      "max_side": self.max_side or 0,
    }


def read_records(shard: str, options: corpus.CorpusOptions) -> Iterator[tuple[int, corpus.Record]]:
  """(index in shard, record) for every record of a shard, good and skipped."""
  yield from enumerate(corpus.read_shard(shard, options))
