"""Shard readers for the formats text-image corpora ship in: webdataset tars and parquet.

(Over 400 lines: both shard formats read here, webdataset tars and parquet, beside
the source expansion and the damage handling they share; each reader on its own is
short.)

Local paths and object storage (`gs://`, `s3://`) alike, through `etils.epath`
(fsspec or tf.io.gfile underneath). No image is decoded while reading: a
`Record` carries the encoded bytes; `decode_image` turns them into RGB.

  expand_sources('gs://b/laion/{00000..41454}.tar')   # -> 41455 paths, sorted
  for record in read_shard(path, CorpusOptions('webdataset')):
    if record.skip is None:
      rgb = decode_image(record.image)   # uint8 [H, W, 3] or None

webdataset (as img2dataset writes it): the members of a tar are grouped by key
(the member name up to the first '.' of its basename, directories kept), in
stream order; the image is the first of jpg, jpeg, png, webp present, the
caption the txt member, else the `caption_json_field` of the json member;
other members are ignored. A damaged member header or a truncated tar ends
the shard: the records read before it stay, the rest is reported as one record
skipped with reason 'damaged_member' or 'truncated_shard'.

parquet: the image bytes, caption and key from configurable columns (key: the
row index in the file when the key column is absent), read one row group at a
time.

Skip reasons: 'damaged_member', 'no_image', 'no_caption', 'truncated_shard'
(set here) and 'undecodable_image' (set by the caller when `decode_image`
returns None).
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import io
import itertools
import json
import os
import re
import tarfile
from typing import Any, Iterator, Sequence

import numpy as np
from etils import epath
from PIL import Image

from imagen_jax.data import images

FORMATS = ("webdataset", "parquet")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SKIP_REASONS = (
  "damaged_member",
  "no_image",
  "no_caption",
  "undecodable_image",
  "truncated_shard",
)
_GLOB_CHARS = re.compile(r"[*?\[]")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


class ShardError(Exception):
  """A shard that is missing or cannot be read; the message is one line naming it."""


@dataclasses.dataclass(frozen=True)
class CorpusOptions:
  """How to read a corpus's records (`config.data` fields of the same names)."""

  format: str  # 'webdataset' | 'parquet'
  image_column: str = "jpg"  # parquet: the image bytes column (img2dataset: 'jpg')
  caption_column: str = "caption"  # parquet
  key_column: str = "key"  # parquet; the row index when absent
  caption_json_field: str = "caption"  # webdataset json members

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ValueError(f"data.format={self.format!r}: expected one of {', '.join(FORMATS)}.")


def options_from_config(data_config: Any) -> CorpusOptions:
  """`CorpusOptions` from `config.data` (fields missing there keep their defaults)."""
  fields = {}
  for field in dataclasses.fields(CorpusOptions):
    if field.name in data_config:
      fields[field.name] = data_config[field.name]
  return CorpusOptions(**fields)


@dataclasses.dataclass(frozen=True)
class Record:
  """One example as read from a shard (image not decoded).

  key: the tar member stem / the parquet key column or row index.
  image: raw encoded image bytes, or None.
  caption: the caption, or None.
  skip: None for a good record, else one of `SKIP_REASONS`.
  """

  key: str
  image: bytes | None
  caption: str | None
  skip: str | None = None


# -- Source patterns ----------------------------------------------------------


def _expand_braces(pattern: str, whole: str | None = None) -> list[str]:
  """'a{0..2}b{x,y}' -> the product; '{007..010}' keeps the width of its start."""
  whole = whole or pattern
  start = pattern.find("{")
  if start < 0:
    if "}" in pattern:
      raise ValueError(f"Malformed brace pattern {whole!r}: '}}' without '{{'.")
    return [pattern]
  end = pattern.find("}", start)
  if end < 0:
    raise ValueError(f"Malformed brace pattern {whole!r}: '{{' without '}}'.")
  body = pattern[start + 1 : end]
  if "{" in body:
    raise ValueError(f"Malformed brace pattern {whole!r}: nested braces are not supported.")
  match = _RANGE.match(body)
  if match:
    lo, hi = match.groups()
    width = len(lo) if lo.lstrip("-").startswith("0") and len(lo) > 1 else 0
    a, b = int(lo), int(hi)
    step = 1 if b >= a else -1
    items = [str(i).zfill(width) for i in range(a, b + step, step)]
  elif "," in body:
    items = body.split(",")
  else:
    raise ValueError(
      f"Malformed brace pattern {whole!r}: {{{body}}} is neither a range {{A..B}} of "
      "integers nor a list {a,b}."
    )
  rest = _expand_braces(pattern[end + 1 :], whole)
  return [pattern[:start] + item + tail for item, tail in itertools.product(items, rest)]


def _is_uri(path: str) -> bool:
  return "://" in path


def _glob(pattern: str) -> list[str]:
  """Files matching a glob pattern, local or remote (through epath)."""
  if not _is_uri(pattern):
    return [p for p in glob_lib.glob(pattern) if os.path.isfile(p)]
  parts = pattern.split("/")
  first = next(i for i, part in enumerate(parts) if _GLOB_CHARS.search(part))
  base = epath.Path("/".join(parts[:first]))
  return [os.fspath(p) for p in base.glob("/".join(parts[first:]))]


def expand_sources(src: str | Sequence[str]) -> list[str]:
  """Shard paths from a list of files, globs or brace patterns; sorted, de-duplicated.

  Args:
    src: a path, a glob ('gs://b/laion/*.tar'), a brace range
      ('gs://b/laion/{00000..41454}.tar': zero-padded width kept) or list
      ('{train,extra}/*.parquet'), or a sequence of those.

  Returns:
    The paths as strings. A glob must match at least one file and every
    literal path (brace expansions included) must exist.

  Raises:
    ValueError: (one line) a pattern matching no file, a missing file, a
      malformed brace pattern, or an empty `src`.
  """
  patterns = [src] if isinstance(src, str) else list(src)
  patterns = [p for p in patterns if p]
  if not patterns:
    raise ValueError("data.src is empty: expected shard files, a glob or a brace pattern.")
  paths, literal = set(), []
  for pattern in patterns:
    for path in _expand_braces(str(pattern)):
      if _GLOB_CHARS.search(path):
        matched = _glob(path)
        if not matched:
          raise ValueError(f"data.src pattern {path!r} matches no file.")
        paths.update(matched)
      else:
        literal.append(path)
  missing = _first_missing(literal)
  if missing is not None:
    raise ValueError(f"data.src file {missing!r} does not exist.")
  return sorted(paths.union(literal))


def _first_missing(paths: list[str]) -> str | None:
  """The first path that is not a file; remote paths are checked by listing their
  folders (one listing per folder, not one request per file)."""
  by_folder: dict[str, list[str]] = {}
  for path in paths:
    if not _is_uri(path):
      if not os.path.isfile(path):
        return path
    else:
      by_folder.setdefault(path.rsplit("/", 1)[0], []).append(path)
  for folder, files in by_folder.items():
    try:
      present = {os.fspath(p) for p in epath.Path(folder).iterdir()}
    except (OSError, ValueError):
      present = set()
    for path in files:
      if path not in present:
        return path
  return None


# -- Reading ------------------------------------------------------------------


def _open(path: str):
  """Opens a shard for binary reading; ShardError (one line) when it cannot be."""
  try:
    return epath.Path(path).open("rb")
  except (OSError, ValueError) as e:
    raise ShardError(f"Cannot open shard {path}: {type(e).__name__}: {e}".splitlines()[0]) from e


def read_shard(path: str, opts: CorpusOptions, start: int = 0) -> Iterator[Record]:
  """The records of one shard, in stored order, images still encoded.

  Args:
    path: a tar (webdataset) or parquet file, local or remote.
    opts: the corpus options.
    start: records to pass over first (a resumed position; parquet skips whole
      row groups without reading them).

  Yields:
    `Record`s, good and skipped, one per example (plus one for a truncated or
    damaged end of a tar).

  Raises:
    ShardError: the shard is missing or unreadable (one line naming it).
    ValueError: a parquet column named in `opts` does not exist (one line
      naming the columns that do).
  """
  if opts.format == "webdataset":
    records = _read_tar(path, opts)
  else:
    records = _read_parquet(path, opts, start)
    start = 0
  return itertools.islice(records, start, None)


def _split_key(name: str) -> tuple[str, str]:
  """'dir/000123.jpg' -> ('dir/000123', 'jpg'); 'a.b.json' -> ('a', 'b.json') as webdataset."""
  head, _, base = name.rpartition("/")
  stem, _, ext = base.partition(".")
  return (f"{head}/{stem}" if head else stem), ext.lower()


def _caption_of(members: dict[str, bytes], field: str) -> str | None:
  if "txt" in members:
    try:
      return members["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
      return None
  if "json" in members:
    try:
      value = json.loads(members["json"]).get(field)
    except (ValueError, AttributeError):
      return None
    return None if value is None else str(value)
  return None


def _group_record(key: str, members: dict[str, bytes], field: str) -> Record:
  image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
  caption = _caption_of(members, field)
  skip = "no_image" if image is None else "no_caption" if caption is None else None
  return Record(key, image, caption, skip)


class _TrackedTarInfo(tarfile.TarInfo):
  """Remembers on the tarfile why the member iteration stopped (tarfile hides it)."""

  @classmethod
  def fromtarfile(cls, tarfile_obj):
    try:
      return super().fromtarfile(tarfile_obj)
    except tarfile.HeaderError as e:
      tarfile_obj.corpus_stop = e
      raise


def _stop_reason(error: Exception | None) -> str | None:
  """Why a tar ended: None for its end-of-archive marker, else a skip reason."""
  if error is None or isinstance(error, tarfile.EOFHeaderError):
    return None
  if isinstance(error, tarfile.InvalidHeaderError):
    return "damaged_member"
  return "truncated_shard"  # EmptyHeaderError, TruncatedHeaderError, a short member


def _read_tar(path: str, opts: CorpusOptions) -> Iterator[Record]:
  key, members, reason = None, {}, None
  with _open(path) as f:
    try:
      tar = tarfile.open(fileobj=f, mode="r|*", tarinfo=_TrackedTarInfo)
    except tarfile.ReadError as e:
      raise ShardError(f"Cannot read shard {path} as a tar: {e}".splitlines()[0]) from None
    tar.corpus_stop = None
    try:
      for info in tar:
        tar.members = []  # Stream mode: keep no history.
        if not info.isfile():
          continue
        member_key, ext = _split_key(info.name)
        if member_key != key:
          if key is not None:
            yield _group_record(key, members, opts.caption_json_field)
          key, members = member_key, {}
        data = tar.extractfile(info).read()
        if len(data) != info.size:
          raise tarfile.ReadError("unexpected end of data")
        members.setdefault(ext, data)
      reason = _stop_reason(tar.corpus_stop)
    except (tarfile.ReadError, EOFError, OSError):
      reason = "truncated_shard"
  if key is not None:
    record = _group_record(key, members, opts.caption_json_field)
    if reason is not None and record.skip is not None:
      record = dataclasses.replace(record, skip=reason)
      reason = None
    yield record
  if reason is not None:
    yield Record(f"{key or ''}+", None, None, reason)


def parquet_columns(path: str) -> list[str]:
  """The column names of a parquet file (read from its footer only)."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  with _open(path) as f:
    try:
      return list(pq.ParquetFile(f).schema_arrow.names)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet files.
      raise ShardError(f"Cannot read shard {path} as parquet: {e}".splitlines()[0]) from None


def _parquet_fields(path: str, names: list[str], opts: CorpusOptions) -> list[str]:
  """The columns to read; ValueError naming the existing ones when one is missing."""
  for field in ("image_column", "caption_column"):
    column = getattr(opts, field)
    if column not in names:
      raise ValueError(
        f"data.{field}={column!r} is not a column of {path}; its columns: {', '.join(names)}."
      )
  columns = [opts.image_column, opts.caption_column]
  return columns + ([opts.key_column] if opts.key_column in names else [])


def _read_parquet(path: str, opts: CorpusOptions, start: int) -> Iterator[Record]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  with _open(path) as f:
    try:
      pf = pq.ParquetFile(f)
    except Exception as e:  # ArrowInvalid / OSError
      raise ShardError(f"Cannot read shard {path} as parquet: {e}".splitlines()[0]) from None
    columns = _parquet_fields(path, list(pf.schema_arrow.names), opts)
    row = 0
    for group in range(pf.num_row_groups):
      n = pf.metadata.row_group(group).num_rows
      if row + n <= start:
        row += n
        continue
      try:
        table = pf.read_row_group(group, columns=columns).to_pydict()
      except Exception as e:  # ArrowInvalid / OSError on a damaged row group
        raise ShardError(
          f"Cannot read row group {group} of shard {path}: {e}".splitlines()[0]
        ) from None
      keys = table.get(opts.key_column) or [str(row + i) for i in range(n)]
      for i in range(max(0, start - row), n):
        yield _parquet_record(keys[i], table[opts.image_column][i], table[opts.caption_column][i])
      row += n


def _parquet_record(key: Any, image: Any, caption: Any) -> Record:
  if isinstance(caption, bytes):
    caption = caption.decode("utf-8", errors="replace")
  skip = "no_image" if not image else "no_caption" if caption is None else None
  return Record(str(key), image or None, caption, skip)


# -- Decoding -----------------------------------------------------------------


def decode_bytes(data: bytes) -> np.ndarray:
  """Encoded image bytes -> uint8 [H, W, 3] by `images.to_rgb`; raises when undecodable."""
  with Image.open(io.BytesIO(data)) as img:
    img.load()
    return np.asarray(images.to_rgb(img), dtype=np.uint8)


def decode_image(data: bytes) -> np.ndarray | None:
  """Encoded image bytes -> uint8 [H, W, 3] RGB (16-bit scaled, alpha on black); None if
  the bytes are not a decodable image (any format PIL reads: jpeg, png, webp, ...)."""
  try:
    image = decode_bytes(data)
  except Exception:  # PIL raises UnidentifiedImageError, OSError, ValueError, SyntaxError...
    return None
  return image if image.size else None
