"""Finding the captioned images of a folder, and its fingerprint.

Captions come from one of two places:
  * `captions.jsonl` at the top (it wins when present): one
    `{"file": "relative/path.jpg", "caption": "..."}` per line; `caption` may
    also be a list of strings, and several rows may name the same file;
  * otherwise a same-stem `.txt` next to each image (`cat.jpg` + `cat.txt`),
    one caption per non-empty line (write a long caption on one line).

An image with several captions gives one example per caption (exact
duplicates once). Caption files are UTF-8, with or without a byte-order mark.
A `.txt` that is not UTF-8 skips its image with a warning naming the file; a
`captions.jsonl` that is not UTF-8 stops the preparation, naming the file and
the line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
JSONL_NAME = "captions.jsonl"
_BOM = b"\xef\xbb\xbf"


@dataclasses.dataclass
class Listing:
  """The captioned images of a folder.

  Attributes:
    pairs: (image path, caption), sorted; an image appears once per caption.
    no_caption: image paths without a caption (no or empty .txt), sorted.
    bad_caption: `.txt` files that could not be read, as `path: reason`.
  """

  pairs: list[tuple[str, str]]
  no_caption: list[str] = dataclasses.field(default_factory=list)
  bad_caption: list[str] = dataclasses.field(default_factory=list)


def _jsonl_captions(path: str, lineno: int, line: bytes) -> tuple[str, list]:
  """(file, captions) of one captions.jsonl line; ValueError naming it."""
  where = f"{path}:{lineno}"
  try:
    text = line.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(
      f"{where}: not UTF-8 (byte {line[e.start]:#04x} at "
      f"column {e.start + 1}); save the file as UTF-8."
    ) from e
  try:
    row = json.loads(text)
    file, caption = row["file"], row["caption"]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f'{where}: expected a JSON object with "file" and "caption", got {text.strip()[:200]!r}'
    ) from e
  captions = caption if isinstance(caption, list) else [caption]
  if not isinstance(file, str) or not all(isinstance(c, (str, int, float)) for c in captions):
    raise ValueError(
      f'{where}: "file" must be a string and "caption" a '
      f"string or a list of strings, got {text.strip()[:200]!r}"
    )
  return file, [str(c).strip() for c in captions if str(c).strip()]


def read_jsonl(src: str) -> list[tuple[str, str]]:
  """Parses `src/captions.jsonl` into (absolute path, caption) pairs.

  Raises:
    ValueError: a line that is not UTF-8 or not a {"file", "caption"} object,
      naming the file and the line.
  """
  path = os.path.join(src, JSONL_NAME)
  pairs = []
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, start=1):
      if lineno == 1 and line.startswith(_BOM):
        line = line[len(_BOM) :]
      if not line.strip():
        continue
      file, captions = _jsonl_captions(path, lineno, line)
      pairs.extend((os.path.join(src, file), c) for c in captions)
  return pairs


def read_txt(path: str) -> list[str]:
  """The captions of a `.txt` file: its non-empty lines, stripped.

  Raises:
    UnicodeDecodeError: the file is not UTF-8.
  """
  with open(path, "rb") as f:
    text = f.read().decode("utf-8-sig")
  return [line.strip() for line in text.splitlines() if line.strip()]


def _walk_txt(src: str) -> Listing:
  """Images captioned by same-stem .txt files."""
  listing = Listing([])
  for root, _, files in os.walk(src):
    for name in files:
      stem, ext = os.path.splitext(name)
      if ext.lower() not in IMAGE_EXTENSIONS:
        continue
      path = os.path.join(root, name)
      txt = os.path.join(root, stem + ".txt")
      captions = []
      if os.path.exists(txt):
        try:
          captions = read_txt(txt)
        except UnicodeDecodeError as e:
          listing.bad_caption.append(
            f"{txt}: not UTF-8 (byte {e.object[e.start]:#04x} at offset "
            f"{e.start}); save it as UTF-8"
          )
          continue
      if captions:
        listing.pairs.extend((path, c) for c in captions)
      else:
        listing.no_caption.append(path)
  return listing


def find_captioned_images(src: str | os.PathLike) -> Listing:
  """Lists the images of a folder with their captions.

  Args:
    src: the folder (see the module docstring for its layout).

  Returns:
    A `Listing`; its `pairs` are unique and sorted by (path, caption).

  Raises:
    FileNotFoundError: `src` does not exist or is not a directory.
    ValueError: `src` holds no image files and no captions.jsonl, no image
      has a caption, or a bad captions.jsonl line (naming file and line).
  """
  src = os.fspath(src)
  if not os.path.isdir(src):
    raise FileNotFoundError(
      f"image_captions source folder {src!r} does not exist or is not a directory."
    )
  if os.path.exists(os.path.join(src, JSONL_NAME)):
    listing = Listing(read_jsonl(src))
    if not listing.pairs:
      raise ValueError(f"{os.path.join(src, JSONL_NAME)} lists no images.")
  else:
    listing = _walk_txt(src)
    if not listing.pairs and not listing.no_caption:
      raise ValueError(
        f"image_captions source folder {src!r} is empty: no images with "
        f"extensions {sorted(IMAGE_EXTENSIONS)} and no {JSONL_NAME}."
      )
    if not listing.pairs:
      raise ValueError(
        f"No image in {src!r} has a caption: give each image "
        f"a same-stem .txt file or write {JSONL_NAME}."
      )
  listing.pairs = sorted(set(listing.pairs))
  listing.no_caption.sort()
  listing.bad_caption.sort()
  return listing


def fingerprint(src: str | os.PathLike) -> tuple[str, int]:
  """A hash of the names, sizes and mtimes of a folder's relevant files.

  Relevant: images, `.txt` files and `captions.jsonl`, searched recursively
  (other files do not change the dataset). One `stat` per file.

  Args:
    src: the source folder.

  Returns:
    (hex SHA-256, number of files hashed).
  """
  src = os.fspath(src)
  entries = []
  for root, _, files in os.walk(src):
    for name in files:
      ext = os.path.splitext(name)[1].lower()
      if ext in IMAGE_EXTENSIONS or ext == ".txt" or name == JSONL_NAME:
        path = os.path.join(root, name)
        st = os.stat(path)
        entries.append((os.path.relpath(path, src), st.st_size, st.st_mtime_ns))
  digest = hashlib.sha256(json.dumps(sorted(entries)).encode("utf-8"))
  return digest.hexdigest(), len(entries)
