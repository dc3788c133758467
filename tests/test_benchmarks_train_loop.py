"""benchmarks.train_loop on the tiny demo with the demo's word tokenizer (fitted as
train.py fits it): both rates and the training-time prediction."""

import json
import os

from benchmarks import train_loop
import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rates_and_prediction(tmp_path, capsys, shapes_data_dir):
  out_file = tmp_path / "loop.json"
  argv = [
    "--config",
    os.path.join(ROOT, "configs/demo.py:tiny"),
    "--stage",
    "base",
    "--steps",
    "2",
    "--json",
    str(out_file),
    f"--config.data.data_dir={shapes_data_dir}",
    "--config.text.fit_tokenizer=words",
    "--config.text.max_length=20",
    *tiny.MODEL_FLAGS,  # the tests' shared base model (tests/tiny.py)
  ]
  assert train_loop.main(argv) == 0
  out = json.loads(out_file.read_text())
  assert out["bare_images_per_s"] > 0 and out["loop_images_per_s"] > 0
  # The tiny demo: 4 steps of 8 for the base stage, half as many for SR (steps_scale).
  assert out["training_images"] == {"base": 32, "sr": 16}
  assert out["predicted_training_s"] == 48 / out["loop_images_per_s"]
  assert "predicted training time on this machine" in capsys.readouterr().out


def test_unknown_stage_is_a_usage_error(capsys):
  argv = ["--config", os.path.join(ROOT, "configs/demo.py:tiny"), "--stage", "nope"]
  assert train_loop.main(argv) == 2
  assert "no stage 'nope'" in capsys.readouterr().err
