"""Tiny webdataset and parquet corpora for the corpus tests, with their expected contents.

Every example's image is a solid colour that encodes its number, so a test can
check which example a decoded image came from.
"""

from __future__ import annotations

import collections
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image


def encode(n: int, fmt: str = "JPEG", size: tuple[int, int] = (40, 24)) -> bytes:
  """A solid image whose red channel is 3 * (n % 80) (survives jpeg), encoded."""
  img = Image.new("RGB", size, (3 * (n % 80), 128, 64))
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_tar(path: str, examples: list[tuple[str, dict[str, bytes]]]) -> None:
  """Writes a webdataset tar: [(key, {ext: bytes})] in order."""
  with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
    for key, members in examples:
      for ext, data in members.items():
        _add(tar, f"{key}.{ext}", data)


class Expected:
  """What a reader must produce: good keys in order per shard and skip counts."""

  def __init__(self):
    self.shards: list[str] = []
    self.good: dict[str, list[str]] = {}  # shard path -> good keys in order
    self.captions: dict[str, str] = {}  # key -> caption
    self.skipped: collections.Counter = collections.Counter()

  @property
  def all_good(self) -> list[str]:
    return [k for s in self.shards for k in self.good[s]]


def _plain(n: int, i: int) -> tuple[str, dict[str, bytes]]:
  """Example number n: a mix of image formats and caption members."""
  key = f"{n:06d}"
  fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
  members = {ext: encode(n, fmt)}
  if i % 2:
    members["json"] = json.dumps({"caption": f"caption {n}", "url": "x"}).encode()
  else:
    members["txt"] = f"caption {n}".encode()
  members["extra"] = b"ignored"
  return key, members


def make_webdataset(root: str, num_shards: int = 4, per_shard: int = 6, *, bad=True) -> Expected:
  """Writes `num_shards` tars under root; with `bad`, shard 0 also holds an undecodable
  image (counted only at decode), a record without caption and one without image,
  shard 1 is truncated in its last example and shard 2 has a damaged header there."""
  os.makedirs(root, exist_ok=True)
  exp = Expected()
  n = 0
  for s in range(num_shards):
    path = os.path.join(root, f"{s:05d}.tar")
    examples = []
    for i in range(per_shard):
      examples.append(_plain(n, i))
      n += 1
    good = [k for k, _ in examples]
    if bad and s == 0:
      examples.append((f"{n:06d}", {"jpg": b"not an image", "txt": b"broken"}))
      examples.append((f"{n + 1:06d}", {"jpg": encode(n + 1)}))
      examples.append((f"{n + 2:06d}", {"txt": b"no image here"}))
      good.append(f"{n:06d}")  # good for the reader; undecodable at decode time
      exp.skipped.update(["undecodable_image", "no_caption", "no_image"])
      n += 3
    write_tar(path, examples)
    if bad and s in (1, 2):
      _break_last(path, examples, truncate=s == 1)
      good = good[:-1]
      exp.skipped["truncated_shard" if s == 1 else "damaged_member"] += 1
    exp.shards.append(path)
    exp.good[path] = good
    for key, members in examples:
      if key in good:
        exp.captions[key] = (
          members.get("txt", b"").decode() or json.loads(members["json"])["caption"]
        )
  return exp


def _break_last(path: str, examples, truncate: bool) -> None:
  """Truncates the tar in the middle of the last example's image data, or corrupts the
  checksum of that image's header."""
  offset = 0
  for _, members in examples[:-1]:
    for data in members.values():
      offset += 512 + -(-len(data) // 512) * 512
  with open(path, "r+b") as f:
    if truncate:
      f.truncate(offset + 512 + 10)
    else:
      f.seek(offset + 148)  # the header's checksum field
      f.write(b"0000000\0")


def make_parquet(root: str, num_shards: int = 3, per_shard: int = 5, *, key=True) -> Expected:
  """Writes parquet shards (img2dataset columns: key, jpg, caption; row groups of 2);
  shard 0 also holds a row with a null caption and one with a null image."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  os.makedirs(root, exist_ok=True)
  exp = Expected()
  n = 0
  for s in range(num_shards):
    path = os.path.join(root, f"{s:05d}.parquet")
    rows = {"key": [], "jpg": [], "caption": [], "width": []}
    for i in range(per_shard):
      rows["key"].append(f"{n:06d}")
      rows["jpg"].append(encode(n, ["JPEG", "PNG", "WEBP"][i % 3]))
      rows["caption"].append(f"caption {n}")
      rows["width"].append(40)
      n += 1
    good = list(rows["key"])
    if s == 0:
      for img, cap in ((encode(n), None), (None, "no image")):
        rows["key"].append(f"{n:06d}")
        rows["jpg"].append(img)
        rows["caption"].append(cap)
        rows["width"].append(40)
        n += 1
      exp.skipped.update(["no_caption", "no_image"])
    if not key:
      good = [str(i) for i in range(len(good))]
      del rows["key"]
    pq.write_table(pa.table(rows), path, row_group_size=2)
    exp.shards.append(path)
    exp.good[path] = good
    for k, c in zip(good, rows["caption"]):
      exp.captions[k] = c
  return exp


def red(image: np.ndarray) -> int:
  """The example number (mod 80) an `encode`d image came from, after decoding/cropping."""
  return int(round(float(np.mean(image[..., 0])) / 3))
