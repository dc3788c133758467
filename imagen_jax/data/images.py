"""One rule for turning any decoded image into 8-bit RGB.

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
