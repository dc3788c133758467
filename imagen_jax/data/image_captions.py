"""TFDS builder `image_captions`: a user's folder of captioned images.

The folder (passed as the TFDS manual dir) holds images (.png, .jpg, .jpeg,
.webp, .bmp, .gif, searched recursively) captioned in one of two ways:
  * `captions.jsonl` at the top: one `{"file": "relative/path.jpg",
    "caption": "..."}` per line (it wins when present);
  * otherwise a same-stem `.txt` next to each image (`cat.jpg` + `cat.txt`).

Unreadable or corrupt images are skipped, counted and logged, and the run goes
on; images without a caption are skipped and counted too. The counts and the
first skipped paths land in `builder.info.metadata`. Images are stored as they
are when they are RGB PNG/JPEG, otherwise re-encoded as PNG; with
`max_resolution` set, larger images are downscaled so that their shorter side
is `max_resolution` (and stored as PNG). Only a `train` split is produced.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset(
    {'.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif'})
JSONL_NAME = 'captions.jsonl'
# How many skipped paths to keep in metadata and to log by name.
_MAX_LISTED = 100
_log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class ImageCaptionsConfig(tfds.core.BuilderConfig):
  """Builder config of `image_captions`.

  Attributes:
    max_resolution: downscale images whose shorter side exceeds this (None:
      keep sizes).
  """
  max_resolution: int | None = None


def image_captions_config(max_resolution: int | None = None
                          ) -> ImageCaptionsConfig:
  """Returns the config `default` (no resizing) or `max{N}`."""
  if max_resolution is None:
    return ImageCaptionsConfig(name='default', description='Original sizes.')
  if max_resolution < 8:
    raise ValueError(f'max_resolution must be >= 8, got {max_resolution}.')
  return ImageCaptionsConfig(
      name=f'max{max_resolution}', max_resolution=max_resolution,
      description=f'Shorter side at most {max_resolution} pixels.')


def _read_jsonl(src: str) -> list[tuple[str, str]]:
  """Parses captions.jsonl into (absolute path, caption) pairs."""
  path = os.path.join(src, JSONL_NAME)
  pairs = []
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        file, caption = row['file'], row['caption']
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{path}:{lineno}: expected a JSON object with "file"'
                         f' and "caption", got {line.strip()[:200]!r}') from e
      pairs.append((os.path.join(src, file), str(caption)))
  return pairs


def find_captioned_images(src: str | os.PathLike
                          ) -> tuple[list[tuple[str, str]], list[str]]:
  """Lists the images of a folder with their captions.

  Args:
    src: the folder (see the module docstring for its layout).

  Returns:
    (pairs, uncaptioned): `(image path, caption)` pairs sorted by path, and the
    image paths that have no caption (same-stem .txt missing or empty).

  Raises:
    FileNotFoundError: `src` does not exist or is not a directory.
    ValueError: `src` holds no image files and no captions.jsonl, or a bad
      captions.jsonl line (naming file and line).
  """
  src = os.fspath(src)
  if not os.path.isdir(src):
    raise FileNotFoundError(
        f'image_captions source folder {src!r} does not exist or is not a '
        'directory.')
  if os.path.exists(os.path.join(src, JSONL_NAME)):
    pairs = _read_jsonl(src)
    if not pairs:
      raise ValueError(f'{os.path.join(src, JSONL_NAME)} lists no images.')
    return sorted(pairs), []
  pairs, uncaptioned = [], []
  for root, _, files in os.walk(src):
    for name in files:
      stem, ext = os.path.splitext(name)
      if ext.lower() not in IMAGE_EXTENSIONS:
        continue
      path = os.path.join(root, name)
      txt = os.path.join(root, stem + '.txt')
      caption = ''
      if os.path.exists(txt):
        with open(txt, encoding='utf-8') as f:
          caption = f.read().strip()
      if caption:
        pairs.append((path, caption))
      else:
        uncaptioned.append(path)
  if not pairs and not uncaptioned:
    raise ValueError(
        f'image_captions source folder {src!r} is empty: no images with '
        f'extensions {sorted(IMAGE_EXTENSIONS)} and no {JSONL_NAME}.')
  if not pairs:
    raise ValueError(f'No image in {src!r} has a caption: give each image a '
                     f'same-stem .txt file or write {JSONL_NAME}.')
  return sorted(pairs), sorted(uncaptioned)


def load_image_bytes(path: str, max_resolution: int | None
                     ) -> tuple[bytes, tuple[int, int]]:
  """Reads and fully decodes an image, re-encoding it only when needed.

  Args:
    path: image file.
    max_resolution: downscale so the shorter side is at most this (or None).

  Returns:
    (encoded bytes, (height, width) of the stored image).

  Raises:
    OSError, ValueError, Image.DecompressionBombError: unreadable or corrupt.
  """
  with open(path, 'rb') as f:
    data = f.read()
  img = Image.open(io.BytesIO(data))
  img.load()  # Decodes every pixel: truncated files fail here.
  keep = img.format in ('PNG', 'JPEG') and img.mode == 'RGB'
  if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation: apply it.
    img, keep = ImageOps.exif_transpose(img), False
  img = img.convert('RGB')
  if max_resolution is not None and min(img.size) > max_resolution:
    scale = max_resolution / min(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img, keep = img.resize(size, Image.Resampling.BICUBIC,
                           reducing_gap=3.0), False
  if keep:
    return data, (img.height, img.width)
  buf = io.BytesIO()
  img.save(buf, format='PNG')
  return buf.getvalue(), (img.height, img.width)


class ImageCaptions(tfds.core.GeneratorBasedBuilder):
  """A folder of captioned images, prepared from the TFDS manual dir."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [image_captions_config()]
  DEFAULT_CONFIG_NAME = 'default'
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            # Encoded image bytes (PNG or JPEG), uint8 [H, W, 3] once decoded.
            'image': tfds.features.Tensor(shape=(), dtype=np.object_),
            'caption': tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    try:
      src = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # TFDS' way to say "missing or empty".
      raise FileNotFoundError(
          f'image_captions needs its source folder as the manual dir: {e}'
      ) from e
    pairs, uncaptioned = find_captioned_images(src)
    return {'train': self._generate_examples(src, pairs, uncaptioned)}

  def _generate_examples(self, src, pairs, uncaptioned
                         ) -> Iterator[tuple[str, dict[str, object]]]:
    """Yields `(relative path, {'image': bytes, 'caption': str})`."""
    max_res = self.builder_config.max_resolution
    skipped = collections.Counter()
    listed = {'unreadable': [],
              'no_caption': [os.path.relpath(p, src)
                             for p in uncaptioned[:_MAX_LISTED]]}
    sides = []
    for path, caption in pairs:
      try:
        data, hw = load_image_bytes(path, max_res)
      except (OSError, ValueError, Image.DecompressionBombError) as e:
        skipped['unreadable'] += 1
        if len(listed['unreadable']) < _MAX_LISTED:
          listed['unreadable'].append(os.path.relpath(path, src))
          _log.warning('Skipping unreadable image %s: %s', path, e)
        continue
      sides.append(min(hw))
      yield os.path.relpath(path, src), {'image': data, 'caption': caption}
    skipped['no_caption'] = len(uncaptioned)
    if not sides:
      raise ValueError(f'None of the {len(pairs)} captioned images in {src!r} '
                       f'could be read (first: {listed["unreadable"][:5]}).')
    self._record_counts(src, len(sides), skipped, listed, sides)

  def _record_counts(self, src, num_ok, skipped, listed, sides):
    """Logs the skip summary and stores it in `info.metadata`."""
    if skipped['no_caption']:
      _log.warning('Skipped %d images without a caption in %s (first: %s).',
                   skipped['no_caption'], src, listed['no_caption'][:5])
    if skipped['unreadable']:
      _log.warning('Skipped %d unreadable or corrupt images of %d in %s '
                   '(first: %s).', skipped['unreadable'],
                   num_ok + skipped['unreadable'], src,
                   listed['unreadable'][:5])
    _log.info('image_captions: %d images from %s.', num_ok, src)
    self.info.metadata.update(
        source_dir=os.path.abspath(src), num_examples=num_ok,
        num_skipped_unreadable=skipped['unreadable'],
        num_skipped_no_caption=skipped['no_caption'],
        skipped_unreadable=listed['unreadable'],
        skipped_no_caption=listed['no_caption'],
        min_side=min(sides, default=0), max_side=max(sides, default=0))
