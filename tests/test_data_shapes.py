"""The shapes renderer: pixels match captions; the caption grammar parses."""

import numpy as np
import pytest

from imagen_jax.data import shapes
from imagen_jax.data import shapes_builder

RES = 64


def _region(position, res):
  """(y0, y1, x0, x1) of the quadrant of a position (whole image: center)."""
  h = res // 2
  return {
    "top left": (0, h, 0, h),
    "top right": (0, h, h, res),
    "bottom left": (h, res, 0, h),
    "bottom right": (h, res, h, res),
    "center": (0, res, 0, res),
  }[position]


def check_scene(image, caption, res=RES):
  """Asserts that an image shows exactly the objects its caption names."""
  objects = shapes.parse_caption(caption)
  assert image.shape == (res, res, 3) and image.dtype == np.uint8
  assert 1 <= len(objects) <= 2
  if len(objects) == 2:
    assert len({o.position for o in objects}) == 2
    assert all(o.position in shapes.QUADRANTS for o in objects)
  lit = image.max(-1) > 0
  covered = np.zeros_like(lit)
  for obj in objects:
    y0, y1, x0, x1 = _region(obj.position, res)
    covered[y0:y1, x0:x1] = True
    # The color at the region center is exactly the palette color.
    fx, fy = shapes.POSITION_CENTERS[obj.position]
    cy, cx = int(fy * res), int(fx * res)
    np.testing.assert_array_equal(image[cy, cx], shapes.PALETTE[obj.color])
    # Coverage of each pixel by the object, from its brightest channel.
    color = np.array(shapes.PALETTE[obj.color], np.float32)
    c = int(np.argmax(color))
    cov = image[y0:y1, x0:x1, c].astype(np.float32) / color[c]
    ys, xs = np.nonzero(cov > 0.5)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    for side in (height, width):
      assert 0.35 * res - 1.5 <= side <= 0.45 * res + 1.5, (caption, side)
    # The bounding box is centered on the region center (small jitter).
    box_cy = y0 + (ys.min() + ys.max() + 1) / 2
    box_cx = x0 + (xs.min() + xs.max() + 1) / 2
    tol = shapes.MAX_JITTER * res + 1
    assert abs(box_cy - fy * res) <= tol, (caption, box_cy, fy * res)
    assert abs(box_cx - fx * res) <= tol, (caption, box_cx, fx * res)
    # Fill ratio with a sub-pixel box: the widest row times the tallest column.
    fill = cov.sum() / (cov.sum(0).max() * cov.sum(1).max())
    assert abs(fill - shapes.FILL_RATIOS[obj.shape]) < 0.12, (caption, fill)
  # Nothing is drawn outside the named objects' regions.
  assert not lit[~covered].any(), caption


def test_palette_and_vocab_follow_the_spec():
  assert shapes.PALETTE["red"] == (220, 20, 20)
  assert shapes.PALETTE["blue"] == (30, 60, 230)
  assert shapes.PALETTE["white"] == (235, 235, 235)
  assert len(shapes.COLORS) == 7 and shapes.SHAPES == ("circle", "square", "triangle")
  assert len(shapes.POSITIONS) == 5 and "center" in shapes.POSITIONS


def test_rendered_pixels_match_captions():
  num_two = 0
  for i in range(150):
    image, caption, objects = shapes.sample_scene((7, 0, i), RES)
    assert shapes.parse_caption(caption) == objects
    check_scene(image, caption)
    num_two += len(objects) == 2
  assert 50 < num_two < 100  # About half of the scenes have two objects.


def test_every_shape_color_and_position_is_drawn():
  rng = np.random.default_rng(0)
  for color in shapes.COLORS:
    for shape in shapes.SHAPES:
      for pos in shapes.POSITIONS:
        obj = shapes.ShapeObject(color, shape, pos)
        check_scene(shapes.render([obj], RES, rng), obj.phrase())


def test_rendering_is_deterministic():
  a = shapes.sample_scene((1, 2, 3), 32)
  b = shapes.sample_scene((1, 2, 3), 32)
  np.testing.assert_array_equal(a[0], b[0])
  assert a[1] == b[1]
  assert shapes.sample_scene((1, 2, 4), 32)[1] != a[1] or not np.array_equal(
    shapes.sample_scene((1, 2, 4), 32)[0], a[0]
  )


def test_caption_grammar_round_trip():
  caption = "a red circle in the top left and a blue square in the bottom right"
  objects = shapes.parse_caption(caption)
  assert objects == [
    shapes.ShapeObject("red", "circle", "top left"),
    shapes.ShapeObject("blue", "square", "bottom right"),
  ]
  assert shapes.make_caption(objects) == caption
  assert shapes.parse_caption(b"a white triangle in the center") == [
    shapes.ShapeObject("white", "triangle", "center")
  ]


@pytest.mark.parametrize(
  "bad",
  [
    "a purple circle in the top left",
    "a red hexagon in the center",
    "a red circle in the middle",
    "red circle in the top left",
    "",
  ],
)
def test_parse_caption_rejects_bad_captions(bad):
  with pytest.raises(ValueError):
    shapes.parse_caption(bad)


def test_holdout_sampling():
  holdout = ("green triangle",)
  for i in range(200):
    _, caption, objects = shapes.sample_scene((0, 0, i), 16, holdout=holdout)
    assert "green triangle" not in caption
    _, caption, objects = shapes.sample_scene((0, 2, i), 16, holdout=holdout, want_holdout=True)
    assert shapes.has_composition(objects, holdout)


def test_bad_holdout_composition_names_the_value():
  with pytest.raises(ValueError, match="purple triangle"):
    shapes.parse_compositions(["purple triangle"])
  with pytest.raises(ValueError, match="resolution must be >= 8, got 4"):
    shapes_builder.shapes_config(resolution=4)


def test_config_names():
  assert shapes_builder.shapes_config(64).name == "res64"
  custom = shapes_builder.shapes_config(64, num_train=10)
  assert custom.name.startswith("res64_")
  assert custom.name == shapes_builder.shapes_config(64, num_train=10).name
  assert custom.name != shapes_builder.shapes_config(64, num_train=11).name
