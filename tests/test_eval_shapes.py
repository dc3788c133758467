"""The shapes pixel checker: right on ground-truth renders, wrong on corrupted ones."""

import numpy as np
import pytest

from imagen_jax.data import shapes
from imagen_jax.eval import shapes as ev


def _scenes(resolution, num, split_id=1, **kwargs):
  return [shapes.sample_scene((0, split_id, i), resolution, **kwargs) for i in range(num)]


@pytest.mark.parametrize("resolution", [32, 64])
def test_ground_truth_renders_score_correct(resolution):
  scenes = _scenes(resolution, 150) + _scenes(
    resolution, 50, split_id=2, holdout=("green triangle",), want_holdout=True
  )
  wrong = [
    (cap, ev.score_image(img, cap))
    for img, cap, _ in scenes
    if not ev.score_image(img, cap)["correct"]
  ]
  assert not wrong, wrong[:2]


def test_detects_attributes_of_a_render():
  obj = shapes.ShapeObject("cyan", "triangle", "bottom left")
  image = shapes.render([obj], 32, np.random.default_rng(0))
  (blob,) = ev.find_objects(image)
  assert (blob.color, blob.shape, blob.position) == ("cyan", "triangle", "bottom left")
  assert 0.5 * 0.35**2 * 0.8 < blob.area < 0.5 * 0.45**2 * 1.2


def _swap(caption, field, value):
  objs = shapes.parse_caption(caption)
  objs[0] = shapes.ShapeObject(**{**objs[0].__dict__, field: value})
  return shapes.make_caption(objs)


@pytest.mark.parametrize("field", ["color", "shape", "position"])
def test_wrong_caption_attribute_scores_incorrect(field):
  vocab = {"color": shapes.COLORS, "shape": shapes.SHAPES, "position": shapes.POSITIONS}
  for img, cap, objs in _scenes(32, 40):
    other = [v for v in vocab[field] if v != getattr(objs[0], field)]
    if field == "position" and len(objs) == 2:  # Not onto the other object's place.
      other = [v for v in other if v != objs[1].position]
    bad = _swap(cap, field, other[len(cap) % len(other)])
    result = ev.score_image(img, bad)
    assert not result["correct"], (cap, bad, result)


def test_corrupted_images_score_incorrect():
  rng = np.random.default_rng(0)
  center = [shapes.ShapeObject("red", "triangle", "center")]
  img = shapes.render(center, 64, rng)
  cap = shapes.make_caption(center)
  assert ev.score_image(img, cap)["correct"]
  assert not ev.score_image(img[::-1], cap)["correct"]  # upside down
  assert not ev.score_image(np.zeros_like(img), cap)["correct"]  # nothing drawn
  recolored = (img.astype(np.float32) / 220.0)[..., :1] * np.asarray(shapes.PALETTE["blue"])
  assert not ev.score_image(recolored.astype(np.uint8), cap)["correct"]  # blue, not red
  corner = [shapes.ShapeObject("yellow", "circle", "top right")]
  img = shapes.render(corner, 32, rng)
  cap = shapes.make_caption(corner)
  assert ev.score_image(img, cap)["correct"]
  assert not ev.score_image(img[:, ::-1], cap)["correct"]  # now top left
  extra = corner + [shapes.ShapeObject("white", "square", "bottom left")]
  result = ev.score_image(shapes.render(extra, 32, rng), cap)
  assert not result["correct"] and result["extra"] == ["a white square in the bottom left"]


def test_noise_and_touching_objects():
  rng = np.random.default_rng(1)
  noisy = 0
  for img, cap, _ in _scenes(32, 50):
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    noisy += ev.score_image(img, cap)["correct"]
  assert noisy >= 49
  # Two same-colored squares at the largest size and jitter touch at the midline.
  img = np.zeros((32, 32, 3), np.uint8)
  img[2:16, 18:32] = img[16:30, 18:32] = shapes.PALETTE["green"]
  cap = "a green square in the top right and a green square in the bottom right"
  assert ev.score_image(img, cap)["correct"]


def test_summary_groups():
  caps = [
    "a red circle in the center",
    "a green triangle in the top left and a red square in the bottom right",
    "a blue square in the top left and a red square in the bottom right",
  ]
  results = [
    {"num_objects": 1, "correct": True},
    {"num_objects": 2, "correct": False},
    {"num_objects": 2, "correct": True},
  ]
  s = ev.summarize(caps, results, ("green triangle",))
  assert s["single_object"] == {"accuracy": 1.0, "count": 1}
  assert s["two_object"] == {"accuracy": 0.5, "count": 2}
  assert s["holdout"] == {"accuracy": 0.0, "count": 1}
  assert s["accuracy"] == pytest.approx(2 / 3, abs=1e-4)


def test_split_captions_follow_the_data_config():
  test = ev.split_captions("test", 30, ("green triangle",))
  held = ev.split_captions("holdout", 30, ("green triangle",))
  assert all("green triangle" not in c for c in test)
  assert all("green triangle" in c for c in held)
  assert test == [
    shapes.sample_scene((0, 1, i), 32, holdout=("green triangle",))[1] for i in range(30)
  ]
  singles = ev.split_captions("test", 10, (), num_objects=1)
  assert all(" and " not in c for c in singles)
  with pytest.raises(ValueError, match="needs held-out compositions"):
    ev.split_captions("holdout", 3, ())


def test_data_settings_defaults_and_overrides():
  import ml_collections  # pylint: disable=g-import-not-at-top

  assert ev.data_settings(ml_collections.ConfigDict()) == (("green triangle",), 0)
  config = ml_collections.ConfigDict(
    {"data": {"builder_kwargs": {"holdout": ["Blue circle"], "seed": 3}}}
  )
  assert ev.data_settings(config) == (("blue circle",), 3)


def test_bad_image_and_caption():
  with pytest.raises(ValueError, match="square RGB"):
    ev.score_image(np.zeros((8, 6, 3), np.uint8), "a red circle in the center")
  # A caption outside the grammar is unscorable, not a failure.
  r = ev.score_image(np.zeros((8, 8, 3), np.uint8), "a dog")
  assert r["correct"] is None and "Not a shapes caption" in r["unscorable"]
  r = ev.score_image(np.zeros((8, 8, 3), np.uint8), "a purple circle in the center")
  assert r["correct"] is None and "Unknown word" in r["unscorable"]
  caps = ["a dog", "a red circle in the center"]
  s = ev.summarize(
    caps, [{"correct": None, "num_objects": None}, {"correct": True, "num_objects": 1}], ()
  )
  assert s["accuracy"] == 1.0 and s["count"] == 1
  assert s["unscorable"] == {"count": 1, "captions": ["a dog"]}


def test_cli_without_run_exits_2(tmp_path, capsys):
  assert ev.main(["--workdir", str(tmp_path / "none")]) == 2
  assert "config.json does not exist" in capsys.readouterr().err
