"""One rule for turning any decoded image into 8-bit RGB; the one resize-and-crop.

* 16-bit greyscale (PIL modes `I;16*`, and `I`, which 16-bit PNGs also
  decode to): scaled by 255 / 65535 and rounded, so mid-grey 32768 is 128;
  values outside [0, 65535] are clipped.
* Transparency (RGBA, LA, PA, or a palette / grey / RGB image with a
  transparent colour): composited on black, i.e. RGB * alpha / 255, the
  background of the shapes data. A fully transparent pixel is black.
* Everything else (greyscale, palette, 1-bit, CMYK, 16-bit RGB that PIL
  already reduced to 8 bits): PIL's `convert('RGB')`.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def has_alpha(img: Image.Image) -> bool:
  """Whether the image has an alpha channel or a transparent colour."""
  return img.mode in _ALPHA_MODES or "transparency" in img.info


def to_rgb(img: Image.Image) -> Image.Image:
  """Converts a decoded PIL image to 8-bit RGB (see the module docstring).

  Args:
    img: any PIL image, loaded.

  Returns:
    A mode 'RGB' image of the same size.
  """
  if img.mode.startswith("I"):  # 'I;16', 'I;16B', 'I;16L', 'I' (16-bit PNG).
    wide = np.asarray(img, dtype=np.float64)
    grey = np.clip(np.round(wide * (255.0 / 65535.0)), 0, 255)
    return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
  if has_alpha(img):
    rgba = img.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")
  return img if img.mode == "RGB" else img.convert("RGB")


def resize_and_crop(
  image: np.ndarray, resolution: int, rng: np.random.Generator | None = None
) -> np.ndarray:
  """Resizes the shorter side to `resolution`, then crops a square.

  Args:
    image: uint8 [H, W, 3].
    resolution: output side R.
    rng: random crop offset along the longer side; None: center crop.

  Returns:
    uint8 [R, R, 3].
  """
  h, w = image.shape[:2]
  if min(h, w) != resolution:
    scale = resolution / min(h, w)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = np.asarray(
      Image.fromarray(image).resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    )
    h, w = image.shape[:2]
  dy, dx = h - resolution, w - resolution
  if rng is None:
    top, left = dy // 2, dx // 2
  else:
    top, left = int(rng.integers(dy + 1)), int(rng.integers(dx + 1))
  return image[top : top + resolution, left : left + resolution]


def default_read_threads() -> int:
  """Threads decoding images when not set: min(4, CPUs)."""
  return min(4, os.cpu_count() or 1)
