"""benchmarks.demo_binding on the tiny demo: trains the base stage, scores every group."""

import json
import os

import pytest

from benchmarks import demo_binding
import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_trains_scores_and_rescores(tmp_path, capsys, shapes_data_dir):
  workdir = str(tmp_path / "run")
  common = [
    "--config",
    os.path.join(ROOT, "configs/demo.py:tiny"),
    "--workdir",
    workdir,
    f"--config.data.data_dir={shapes_data_dir}",
    "--config.text.fit_tokenizer=words",
    "--config.text.max_length=20",
    *tiny.MODEL_FLAGS,  # the tests' shared base model (tests/tiny.py)
    "--num",
    "2",
    "--holdout",
    "1",
  ]
  assert demo_binding.main(common + ["--config.train.num_steps=2"]) == 0
  result = json.load(open(os.path.join(workdir, "binding.json")))
  assert set(result["accuracy"]) == {"test_1", "test_2", "holdout_1", "holdout_2"}
  assert all(0.0 <= v <= 1.0 for v in result["accuracy"].values())
  assert result["stages"] == ["base"] and os.path.isdir(os.path.join(workdir, "tokenizer"))
  assert "| " + workdir in capsys.readouterr().out
  # Re-scoring: no training, other sampling settings, the train split's captions too.
  args = common + ["--skip_train", "--eta", "1", "--steps", "3", "--train_prompts", "1"]
  assert demo_binding.main(args) == 0
  result = json.load(open(os.path.join(workdir, "binding.json")))
  assert {"train_1", "train_2"} <= set(result["accuracy"])
  assert result["sampling"]["eta"] == 1.0 and result["train_s"] < 5
  assert not os.path.isdir(os.path.join(workdir, "sr"))  # the base stage alone


@pytest.mark.slow
def test_binding_probe_labels_and_run(tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top

  from benchmarks import binding_probe  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import shapes  # pylint: disable=g-import-not-at-top

  captions, colors, kinds = binding_probe.make_batch(np.random.default_rng(0), 64, 1.0)
  for caption, row_c, row_s in zip(captions, colors, kinds):
    objects = shapes.parse_caption(caption)
    assert len(objects) == 2 and (row_c != len(shapes.COLORS)).sum() == 2
    for o in objects:
      q = shapes.QUADRANTS.index(o.position)
      assert shapes.COLORS[row_c[q]] == o.color and shapes.SHAPES[row_s[q]] == o.shape
  # Scoring: one wrong quadrant fails the scene; an empty quadrant's shape is ignored.
  onehot = lambda y, n: np.eye(n)[y] * 5.0
  right = (onehot(colors, len(shapes.COLORS) + 1), onehot(kinds, len(shapes.SHAPES)))
  assert binding_probe.scene_accuracy(*right, colors, kinds).all()
  wrong = right[0].copy()
  wrong[0] = np.roll(wrong[0], 1, axis=-1)
  ok = binding_probe.scene_accuracy(wrong, right[1], colors, kinds)
  assert not ok[0] and ok[1:].all()

  out = tmp_path / "probe.json"
  result = binding_probe.main(
    [
      "--config",
      os.path.join(ROOT, "configs/demo.py:tiny"),
      "--config.text.fit_tokenizer=words",
      "--config.text.max_length=20",
      "--config.stages.base.model.text_conv_kernel=3",
      "--steps=4",
      "--eval_every=2",
      "--batch=8",
      "--num_eval=16",
      f"--out={out}",
    ]
  )
  assert [r["step"] for r in result["curve"]] == [2, 4]
  assert all(0.0 <= r["two"] <= 1.0 and 0.0 <= r["one"] <= 1.0 for r in result["curve"])
  assert json.load(open(out))["settings"]["text_conv_kernel"] == 3
