"""What a ``Cascade.sample`` call gives back, and how its images are drawn and written.

``CascadeOutput`` holds every stage's images; ``make_grid`` tiles images,
``captioned_grid`` tiles them large enough to read with their prompts under
them, and ``save_outputs`` writes a call's PNG files (sample.py's output).
"""

import dataclasses
import json
import math
import os
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@dataclasses.dataclass
class CascadeOutput:
  """What ``Cascade.sample`` returns; N = len(prompts) · num_per_prompt."""

  prompts: list  # the P prompts, in order
  num_per_prompt: int
  images: dict  # stage name → uint8 [N, R, R, 3]
  timings: dict  # stage name → timing.StageTiming
  settings: dict  # stage name → stages.SampleSettings

  @property
  def final(self) -> np.ndarray:
    """uint8 [N, R, R, 3], the last stage's images."""
    return self.images[list(self.images)[-1]]


def make_grid(
  images: np.ndarray,
  cols: Optional[int] = None,
  pad: int = 2,
  borders: Optional[Sequence[tuple]] = None,
) -> np.ndarray:
  """Tiles images into one picture.

  Args:
    images: uint8 [N, R, R, 3].
    cols: images per row (default: ceil(sqrt(N))).
    pad: pixels between images (and around them).
    borders: optional RGB color per image, drawn in its padding.

  Returns:
    uint8 [rows · (R + pad) + pad, cols · (R + pad) + pad, 3].
  """
  n, r = images.shape[0], images.shape[1]
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * (r + pad) + pad, cols * (r + pad) + pad, 3), 32, np.uint8)
  for i, image in enumerate(images):
    y, x = (i // cols) * (r + pad) + pad, (i % cols) * (r + pad) + pad
    if borders is not None and pad:
      grid[y - pad : y + r + pad, x - pad : x + r + pad] = borders[i]
    grid[y : y + r, x : x + r] = image
  return grid


def _wrap(text: str, font: Any, width: int, draw: Any) -> list[str]:
  """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide."""
  lines, line = [], ""
  for word in text.split():
    trial = f"{line} {word}".strip()
    if line and draw.textlength(trial, font=font) > width:
      lines.append(line)
      line = word
    else:
      line = trial
  return lines + ([line] if line else [])


def captioned_grid(
  images: np.ndarray,
  captions: Sequence[str],
  cols: Optional[int] = None,
  min_cell: int = 128,
  pad: int = 4,
) -> np.ndarray:
  """A grid a person can read: cells upscaled (nearest) to >= min_cell px, captions under them.

  Args:
    images: uint8 [N, R, R, 3].
    captions: N strings (wrapped to the cell width).
    cols: images per row (default: ceil(sqrt(N))).
    min_cell: smallest cell size in pixels; smaller images are repeated by an
      integer factor (nearest neighbour), so pixels stay sharp.
    pad: pixels between cells.

  Returns:
    uint8 [H, W, 3].
  """
  n, r = images.shape[0], images.shape[1]
  scale = max(1, -(-min_cell // r))
  cell = r * scale
  font = ImageFont.load_default()
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  wrapped = [_wrap(c, font, cell, probe) for c in captions]
  line_h = int(font.getbbox("Ag")[3]) + 2
  text_h = line_h * max(1, max(len(w) for w in wrapped))
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  w, h = cols * (cell + pad) + pad, rows * (cell + text_h + pad) + pad
  canvas = Image.new("RGB", (w, h), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, (image, lines) in enumerate(zip(images, wrapped)):
    x = (i % cols) * (cell + pad) + pad
    y = (i // cols) * (cell + text_h + pad) + pad
    canvas.paste(Image.fromarray(np.repeat(np.repeat(image, scale, 0), scale, 1)), (x, y))
    for k, text in enumerate(lines):
      draw.text((x, y + cell + k * line_h), text, fill=(0, 0, 0), font=font)
  return np.asarray(canvas)


def save_outputs(out: CascadeOutput, out_dir: str) -> dict:
  """Writes the images of a sample call.

  Files: ``{prompt:03d}_{sample:02d}.png`` per final image, ``grid.png`` (the
  final images upscaled to >= 128 px per cell with their prompts under them,
  one row per prompt when num_per_prompt > 1), ``grid_{stage}.png`` per stage
  (plain tiles), ``prompts.json`` (the prompts, in order).

  Returns:
    {'dir', 'images': [paths], 'grid', 'prompts'}.
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i, image in enumerate(out.final):
    p, k = divmod(i, out.num_per_prompt)
    paths.append(os.path.join(out_dir, f"{p:03d}_{k:02d}.png"))
    Image.fromarray(image).save(paths[-1])
  cols = out.num_per_prompt if out.num_per_prompt > 1 else None
  for name, images in out.images.items():
    Image.fromarray(make_grid(images, cols)).save(os.path.join(out_dir, f"grid_{name}.png"))
  grid = os.path.join(out_dir, "grid.png")
  captions = [out.prompts[i // out.num_per_prompt] for i in range(len(out.final))]
  Image.fromarray(captioned_grid(out.final, captions, cols)).save(grid)
  prompts = os.path.join(out_dir, "prompts.json")
  with open(prompts, "w", encoding="utf-8") as f:
    json.dump(out.prompts, f, indent=1)
  return {"dir": out_dir, "images": paths, "grid": grid, "prompts": prompts}
