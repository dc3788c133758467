"""python -m imagen_jax.data.inspect: prints what the trainer then reads; bad input exit 2."""

import json
import os

from PIL import Image

import corpus_testdata as td
from imagen_jax import config as config_lib
from imagen_jax.data import datasets, inspect, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WDS = os.path.join(ROOT, "configs/own_data.py:webdataset,tiny")


def test_streamed_inspect_matches_the_training_input(tmp_path, capsys):
  exp = td.make_webdataset(str(tmp_path / "w"))
  src = str(tmp_path / "w/{00000..00003}.tar")
  out_json, grid = str(tmp_path / "x.json"), str(tmp_path / "g.png")
  args = ["--config", WDS, f"--config.data.src={src}", "--num", "all"]
  args += ["--process_id", "1", "--num_processes", "2", "--json", out_json, "--grid", grid]
  assert inspect.main(args) == 0
  got = json.load(open(out_json))
  lines = capsys.readouterr().out.splitlines()
  assert lines[: len(got["keys"])] == [f"{k}\t{c}" for k, c in zip(got["keys"], got["captions"])]
  # Process 1 of 2 holds shards 1 and 3: shard 1 is truncated (its last example lost).
  assert sorted(got["keys"]) == exp.good[exp.shards[1]] + exp.good[exp.shards[3]]
  assert got["skipped"] == {"truncated_shard": 1} and got["examples_per_s"] > 0
  # The trainer's pipeline (per-process batch 8 / 2) reads the same, in the same order.
  config = config_lib.load_config(WDS)
  config.data.src = src
  it = pipeline.train_input(
    config.data, resolution=32, batch_size=4, process_index=1, process_count=2
  )
  keys = [k for _ in range(3) for k in next(it)["key"]][: len(got["keys"])]
  assert keys == got["keys"]
  assert Image.open(grid).size[0] >= 128 * 3


def test_tfds_inspect_keys_are_source_indices(tmp_path, capsys):
  cfg = os.path.join(ROOT, "configs/demo.py:tiny")
  out_json = str(tmp_path / "x.json")
  args = ["--config", cfg, f"--config.data.data_dir={tmp_path}", "--num", "5", "--json", out_json]
  assert inspect.main(args) == 0
  got = json.load(open(out_json))
  config = config_lib.load_config(cfg)
  config.data.data_dir = str(tmp_path)
  settings = datasets.builder_settings(config.data)
  source = datasets.load_builder("shapes", str(tmp_path), **settings).as_data_source("train")
  want = [source[int(k)]["caption"] for k in got["keys"]]
  assert got["captions"] == [w.decode() if isinstance(w, bytes) else w for w in want]
  b = config.train.batch_size
  batch = next(iter(pipeline.train_input(config.data, resolution=32, batch_size=b)))
  assert list(batch["caption"][:5]) == got["captions"]
  assert got["skipped"] == {}


def _error(args, capsys):
  assert inspect.main(args) == 2
  err = [x for x in capsys.readouterr().err.strip().splitlines() if "error" in x]
  assert len(err) == 1 and err[0].startswith("inspect: error: "), err  # (and a progress bar)
  return err[0]


def test_bad_input_one_line_exit_2(tmp_path, capsys):
  pq = td.make_parquet(str(tmp_path / "p"), num_shards=1)
  td.write_tar(str(tmp_path / "bad.tar"), [("a", {"jpg": b"x", "txt": b"x"})])
  (tmp_path / "junk.tar").write_bytes(b"\x01" * 600)  # not a tar
  pqc = os.path.join(ROOT, "configs/own_data.py:parquet,tiny")
  cases = [
    ([f"--config.data.src={tmp_path}/*.zip"], WDS, "matches no file"),
    ([f"--config.data.src={tmp_path}/{{1..x}}.tar"], WDS, "Malformed brace"),
    ([f"--config.data.src={tmp_path}/bad.tar"], WDS, "No decodable example"),
    (
      [f"--config.data.src={pq.shards[0]}", "--config.data.caption_column=text"],
      pqc,
      "columns: key, jpg, caption, width",
    ),
    ([f"--config.data.src={pq.shards[0]}", "--num", "0"], pqc, "--num='0'"),
    ([f"--config.data.src={pq.shards[0]}", "--num_processes", "2"], pqc, "fewer than the 2"),
    (["--config.data.nope=1"], pqc, "no field"),
    ([f"--config.data.src={tmp_path}/{{bad,junk}}.tar"], WDS, "junk.tar as a tar"),
  ]
  for extra, cfg, words in cases:
    assert words in _error(["--config", cfg, "--num", "all", *extra], capsys)
