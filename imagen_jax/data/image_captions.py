"""TFDS builder `image_captions`: a user's folder of captioned images.

The folder (passed as the TFDS manual dir) holds images (.png, .jpg, .jpeg,
.webp, .bmp, .gif, searched recursively) captioned in one of two ways:
  * `captions.jsonl` at the top: one `{"file": "relative/path.jpg",
    "caption": "..."}` per line (it wins when present; a caption may be a
    list, and a file may have several rows);
  * otherwise a same-stem `.txt` next to each image (`cat.jpg` + `cat.txt`),
    one caption per non-empty line.
An image with several captions gives one example per caption (see
`imagen_jax.data.captions`, which also says how encodings are read).

Unreadable or corrupt images are skipped, counted and logged, and the run goes
on; images without a caption, or whose .txt is not UTF-8, are skipped and
counted too. The counts, the first skipped paths and a fingerprint of the
source folder (file names, sizes, mtimes) land in `builder.info.metadata`.
Images are stored as they are when they are RGB PNG/JPEG, otherwise converted
to 8-bit RGB (`imagen_jax.data.images`: 16-bit scaled, alpha composited on
black) and re-encoded as PNG; with `max_resolution` set, larger images are
downscaled so that their shorter side is `max_resolution` (and stored as
PNG). Only a `train` split is produced.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from imagen_jax.data import captions as captions_lib
from imagen_jax.data import images

# Re-exported: the layout of a source folder.
IMAGE_EXTENSIONS = captions_lib.IMAGE_EXTENSIONS
JSONL_NAME = captions_lib.JSONL_NAME
find_captioned_images = captions_lib.find_captioned_images
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


def image_captions_config(max_resolution: int | None = None) -> ImageCaptionsConfig:
  """Returns the config `default` (no resizing) or `max{N}`."""
  if max_resolution is None:
    return ImageCaptionsConfig(name="default", description="Original sizes.")
  if max_resolution < 8:
    raise ValueError(f"max_resolution must be >= 8, got {max_resolution}.")
  return ImageCaptionsConfig(
    name=f"max{max_resolution}",
    max_resolution=max_resolution,
    description=f"Shorter side at most {max_resolution} pixels.",
  )


def load_image_bytes(path: str, max_resolution: int | None) -> tuple[bytes, tuple[int, int]]:
  """Reads and fully decodes an image, re-encoding it only when needed.

  Args:
    path: image file.
    max_resolution: downscale so the shorter side is at most this (or None).

  Returns:
    (encoded bytes, (height, width) of the stored image).

  Raises:
    OSError, ValueError, Image.DecompressionBombError: unreadable or corrupt.
  """
  with open(path, "rb") as f:
    return convert_image_bytes(f.read(), max_resolution)


def convert_image_bytes(data: bytes, max_resolution: int | None) -> tuple[bytes, tuple[int, int]]:
  """`load_image_bytes` of bytes already read (e.g. a tar member or a parquet cell)."""
  img = Image.open(io.BytesIO(data))
  img.load()  # Decodes every pixel: truncated files fail here.
  keep = img.format in ("PNG", "JPEG") and img.mode == "RGB" and not images.has_alpha(img)
  if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation: apply it.
    img, keep = ImageOps.exif_transpose(img), False
  img = images.to_rgb(img)
  if max_resolution is not None and min(img.size) > max_resolution:
    scale = max_resolution / min(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img, keep = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0), False
  if keep:
    return data, (img.height, img.width)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue(), (img.height, img.width)


class ImageCaptions(tfds.core.GeneratorBasedBuilder):
  """A folder of captioned images, prepared from the TFDS manual dir."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [image_captions_config()]
  DEFAULT_CONFIG_NAME = "default"
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

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
    try:
      src = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # TFDS' way to say "missing or empty".
      raise FileNotFoundError(
        f"image_captions needs its source folder as the manual dir: {e}"
      ) from e
    # Before reading: a file edited during preparation changes the next
    # fingerprint, so the next run prepares again.
    source_fingerprint, num_files = captions_lib.fingerprint(src)
    self.info.metadata.update(source_fingerprint=source_fingerprint, source_files=num_files)
    listing = find_captioned_images(src)
    return {"train": self._generate_examples(src, listing)}

  def _generate_examples(
    self, src: str, listing: captions_lib.Listing
  ) -> Iterator[tuple[str, dict[str, object]]]:
    """Yields `('{relative path}#{k}', {'image': bytes, 'caption': str})`.

    One example per caption; an image is read once for all its captions.
    """
    max_res = self.builder_config.max_resolution
    listed = {
      "unreadable": [],
      "no_caption": [os.path.relpath(p, src) for p in listing.no_caption[:_MAX_LISTED]],
      "bad_caption": listing.bad_caption[:_MAX_LISTED],
    }
    for bad in listed["bad_caption"]:
      _log.warning("Skipping the image of caption file %s.", bad)
    num_unreadable, sides = 0, []
    for path, group in itertools.groupby(listing.pairs, key=lambda p: p[0]):
      rel = os.path.relpath(path, src)
      try:
        data, hw = load_image_bytes(path, max_res)
      except (OSError, ValueError, Image.DecompressionBombError) as e:
        num_unreadable += 1
        if len(listed["unreadable"]) < _MAX_LISTED:
          listed["unreadable"].append(rel)
          _log.warning("Skipping unreadable image %s: %s", path, e)
        continue
      for k, (_, caption) in enumerate(group):
        sides.append(min(hw))
        yield f"{rel}#{k}", {"image": data, "caption": caption}
    if not sides:
      raise ValueError(
        f"None of the {num_unreadable} captioned images in "
        f"{src!r} could be read (first: "
        f"{listed['unreadable'][:5]})."
      )
    counts = {
      "unreadable": num_unreadable,
      "no_caption": len(listing.no_caption),
      "bad_caption": len(listing.bad_caption),
    }
    self._record_counts(src, len(sides), counts, listed, sides)

  def _record_counts(self, src, num_ok, counts, listed, sides):
    """Logs the skip summary and stores it in `info.metadata`."""
    if counts["no_caption"]:
      _log.warning(
        "Skipped %d images without a caption in %s (first: %s).",
        counts["no_caption"],
        src,
        listed["no_caption"][:5],
      )
    if counts["bad_caption"]:
      _log.warning(
        "Skipped %d images whose caption file is not UTF-8 in %s (first: %s).",
        counts["bad_caption"],
        src,
        listed["bad_caption"][:5],
      )
    if counts["unreadable"]:
      _log.warning(
        "Skipped %d unreadable or corrupt images in %s (first: %s).",
        counts["unreadable"],
        src,
        listed["unreadable"][:5],
      )
    _log.info("image_captions: %d examples from %s.", num_ok, src)
    self.info.metadata.update(
      source_dir=os.path.abspath(src),
      num_examples=num_ok,
      **{f"num_skipped_{k}": v for k, v in counts.items()},
      **{f"skipped_{k}": v for k, v in listed.items()},
      min_side=min(sides, default=0),
      max_side=max(sides, default=0),
    )
