"""Procedural captioned shapes: the vocabulary, a renderer and a caption parser.

Each scene is a black square canvas with one or two filled, upright shapes. A
caption names every object as `a {color} {shape} in the {position}`; two-object
captions join two such phrases with ` and `:

  a red circle in the top left
  a red circle in the top left and a blue square in the bottom right

Single objects sit at one of five positions (four quadrants or the center); the
two objects of a two-object scene sit in two different quadrants, never the
center, so they never overlap. Each object's bounding box is 35-45% of the side,
centered in its region with a small jitter.

Rendering is pure numpy + PIL and deterministic from a seed, so any example can
be regenerated from `(seed, split, index)`. The vocabulary constants are
public: an evaluator scores generated images by color, centroid and fill ratio
with them.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Color name -> RGB, exactly as the dataset spec fixes them.
PALETTE: dict[str, tuple[int, int, int]] = {
  "red": (220, 20, 20),
  "green": (20, 200, 20),
  "blue": (30, 60, 230),
  "yellow": (230, 220, 20),
  "magenta": (210, 30, 210),
  "cyan": (20, 210, 210),
  "white": (235, 235, 235),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
POSITIONS: tuple[str, ...] = QUADRANTS + ("center",)

# Region center of each position as (x, y) fractions of the side.
POSITION_CENTERS: dict[str, tuple[float, float]] = {
  "top left": (0.25, 0.25),
  "top right": (0.75, 0.25),
  "bottom left": (0.25, 0.75),
  "bottom right": (0.75, 0.75),
  "center": (0.5, 0.5),
}
# Area of each filled shape divided by the area of its bounding box.
FILL_RATIOS: dict[str, float] = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
# Bounding-box side of an object, as a fraction of the image side.
MIN_SIZE = 0.35
MAX_SIZE = 0.45
# Largest center jitter, as a fraction of the image side; an object at the
# largest size plus the largest jitter still stays inside its quadrant.
MAX_JITTER = 0.025
BACKGROUND = (0, 0, 0)
# Render at up to this many times the target side, then downsample with a box
# filter: smooth edges while interiors keep the exact palette colors.
_SUPERSAMPLE = 4
_MAX_RENDER_SIDE = 2048

_PHRASE = re.compile(r"a (?P<color>\w+) (?P<shape>\w+) in the (?P<position>[a-z]+(?: [a-z]+)?)")


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  """One object of a scene.

  Attributes:
    color: a key of PALETTE.
    shape: one of SHAPES.
    position: one of POSITIONS.
  """

  color: str
  shape: str
  position: str

  @property
  def composition(self) -> str:
    """`'{color} {shape}'`, the unit that held-out lists name."""
    return f"{self.color} {self.shape}"

  def phrase(self) -> str:
    """The caption phrase, e.g. `a red circle in the top left`."""
    return f"a {self.color} {self.shape} in the {self.position}"


def make_caption(objects: Sequence[ShapeObject]) -> str:
  """Joins the objects' phrases with ' and ' (the caption grammar)."""
  if not objects:
    raise ValueError("A scene needs at least one object.")
  return " and ".join(o.phrase() for o in objects)


def parse_caption(caption: str | bytes) -> list[ShapeObject]:
  """Parses a caption of this dataset back into its objects.

  Args:
    caption: e.g. `a red circle in the top left and a blue square in the bottom
      right` (str, or UTF-8 bytes as TFDS returns them).

  Returns:
    The objects in caption order.

  Raises:
    ValueError: if the caption does not follow the grammar or names a color,
      shape or position outside the vocabulary.
  """
  if isinstance(caption, bytes):
    caption = caption.decode("utf-8")
  objects = []
  for part in caption.strip().split(" and "):
    m = _PHRASE.fullmatch(part.strip())
    if m is None:
      raise ValueError(f"Not a shapes caption phrase: {part!r} in {caption!r}")
    obj = ShapeObject(m["color"], m["shape"], m["position"])
    if obj.color not in PALETTE or obj.shape not in SHAPES or obj.position not in POSITIONS:
      raise ValueError(
        f"Unknown word in {part!r}: vocabulary is colors "
        f"{COLORS}, shapes {SHAPES}, positions {POSITIONS}."
      )
    objects.append(obj)
  return objects


def parse_compositions(compositions: Iterable[str]) -> tuple[str, ...]:
  """Validates held-out compositions such as `'green triangle'`.

  Args:
    compositions: strings `'{color} {shape}'`.

  Returns:
    The same strings, normalized (lower case, single spaces), as a tuple.

  Raises:
    ValueError: naming the first bad composition.
  """
  out = []
  for comp in compositions:
    words = comp.lower().split()
    if len(words) != 2 or words[0] not in PALETTE or words[1] not in SHAPES:
      raise ValueError(
        f'Held-out composition {comp!r} is not "<color> <shape>" with color '
        f"in {COLORS} and shape in {SHAPES}."
      )
    out.append(" ".join(words))
  return tuple(out)


def sample_objects(rng: np.random.Generator, num_objects: int) -> list[ShapeObject]:
  """Samples a scene layout: 1 object anywhere, or 2 in distinct quadrants.

  Args:
    rng: source of randomness.
    num_objects: 1 or 2.

  Returns:
    The objects, in caption order.
  """
  if num_objects == 1:
    positions = [POSITIONS[rng.integers(len(POSITIONS))]]
  elif num_objects == 2:
    idx = rng.choice(len(QUADRANTS), size=2, replace=False)
    positions = [QUADRANTS[i] for i in idx]
  else:
    raise ValueError(f"num_objects must be 1 or 2, got {num_objects}.")
  return [
    ShapeObject(COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))], pos)
    for pos in positions
  ]


def _shape_xy(shape: str, cx: float, cy: float, size: float):
  """PIL drawing coordinates of a shape with bounding box side `size`."""
  h = size / 2
  if shape == "triangle":  # Upright: apex on top, base at the bottom.
    return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
  return [cx - h, cy - h, cx + h, cy + h]


def render(objects: Sequence[ShapeObject], resolution: int, rng: np.random.Generator) -> np.ndarray:
  """Renders a scene.

  Args:
    objects: the scene's objects (their positions must not collide).
    resolution: side of the square output image in pixels.
    rng: draws each object's size in [MIN_SIZE, MAX_SIZE] and its jitter.

  Returns:
    uint8 [resolution, resolution, 3] image.
  """
  factor = max(1, min(_SUPERSAMPLE, _MAX_RENDER_SIDE // resolution))
  side = resolution * factor
  canvas = Image.new("RGB", (side, side), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  for obj in objects:
    size = rng.uniform(MIN_SIZE, MAX_SIZE)
    jx, jy = rng.uniform(-MAX_JITTER, MAX_JITTER, size=2)
    fx, fy = POSITION_CENTERS[obj.position]
    xy = _shape_xy(obj.shape, (fx + jx) * side, (fy + jy) * side, size * side)
    color = PALETTE[obj.color]
    if obj.shape == "circle":
      draw.ellipse(xy, fill=color)
    elif obj.shape == "square":
      draw.rectangle(xy, fill=color)
    else:
      draw.polygon(xy, fill=color)
  if factor > 1:
    canvas = canvas.resize((resolution, resolution), Image.Resampling.BOX)
  return np.asarray(canvas, dtype=np.uint8)


def has_composition(objects: Sequence[ShapeObject], compositions: Sequence[str]) -> bool:
  """Whether any object's `'{color} {shape}'` is in `compositions`."""
  return any(o.composition in compositions for o in objects)


def sample_scene(
  seed: Sequence[int] | int,
  resolution: int,
  *,
  holdout: Sequence[str] = (),
  want_holdout: bool = False,
  num_objects: int | None = None,
) -> tuple[np.ndarray, str, list[ShapeObject]]:
  """Deterministically samples and renders one scene.

  With `want_holdout` False, no object is a held-out composition; with True,
  at least one is.

  Args:
    seed: anything `np.random.default_rng` takes, e.g. `(seed, split, index)`.
    resolution: output side in pixels.
    holdout: held-out compositions, e.g. `('green triangle',)`.
    want_holdout: sample a held-out scene instead of an ordinary one.
    num_objects: 1 or 2; None draws it (two objects half of the time).

  Returns:
    (image uint8 [resolution, resolution, 3], caption, objects).
  """
  rng = np.random.default_rng(seed)
  holdout = parse_compositions(holdout)
  if want_holdout and not holdout:
    raise ValueError("want_holdout=True needs at least one held-out composition.")
  draw = 1 + int(rng.integers(2))  # Drawn always: keeps streams aligned.
  num_objects = draw if num_objects is None else num_objects
  objects = sample_objects(rng, num_objects)
  if want_holdout:
    # Replace one object's color and shape by a held-out composition.
    i = int(rng.integers(num_objects))
    color, shape = holdout[rng.integers(len(holdout))].split()
    objects[i] = ShapeObject(color, shape, objects[i].position)
  else:
    while has_composition(objects, holdout):  # Rejection: rare, cheap.
      objects = sample_objects(rng, num_objects)
  image = render(objects, resolution, rng)
  return image, make_caption(objects), objects


def encode_png(image: np.ndarray) -> bytes:
  """PNG-encodes a uint8 [H, W, 3] image with PIL."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()
