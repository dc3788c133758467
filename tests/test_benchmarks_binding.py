"""benchmarks.demo_binding on the tiny demo: trains the base stage, scores every group."""

import json
import os

from benchmarks import demo_binding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_trains_scores_and_rescores(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  common = [
    "--config",
    os.path.join(ROOT, "configs/demo.py:tiny"),
    "--workdir",
    workdir,
    f"--config.data.data_dir={tmp_path / 'data'}",
    "--config.text.fit_tokenizer=words",
    "--config.text.max_length=20",
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
