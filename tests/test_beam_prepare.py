"""Corpus preparation (`corpus_shards`) in this process and on Apache Beam.

The Beam tests run the DirectRunner's engine in multi-process mode on 2 workers
and compare with the in-process preparation: the same examples in the same
order, the same counts, and (with --embed) the same caption embeddings as
`imagen_jax.train.embeddings.write`, within 1e-5. They are skipped only when
apache_beam is not importable (pip install -r requirements-beam.txt).
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

import corpus_testdata as testdata
from imagen_jax import config as config_lib
from imagen_jax.data import corpus, corpus_builder, datasets
from imagen_jax.data import prepare as data_prepare
from imagen_jax.text import cache as cache_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEAM_FLAGS = [
  "--beam_runner=DirectRunner",
  "--beam_options=--direct_running_mode=multi_processing --direct_num_workers=2",
]
needs_beam = pytest.mark.skipif(
  importlib.util.find_spec("apache_beam") is None,
  reason="apache_beam is not installed (pip install -r requirements-beam.txt)",
)


@pytest.fixture(autouse=True)
def _workers_import_the_package(monkeypatch):
  """Beam's worker processes import imagen_jax wherever pytest was started."""
  path = os.environ.get("PYTHONPATH", "")
  monkeypatch.setenv("PYTHONPATH", ROOT + (os.pathsep + path if path else ""))


def _examples(data_dir: str, name: str) -> list[tuple[bytes, str]]:
  """(image bytes, caption) of every example, in the order training reads them."""
  source = datasets.load_builder(name, data_dir).as_data_source(split="train")
  return [(source[i]["image"], source[i]["caption"].decode()) for i in range(len(source))]


def _expected_counts(exp: testdata.Expected) -> dict[str, int]:
  written = len(exp.all_good) - exp.skipped["undecodable_image"]
  skipped = {f"num_skipped_{r}": exp.skipped[r] for r in corpus.SKIP_REASONS}
  return dict(num_read=written + sum(exp.skipped.values()), num_written=written, **skipped)


def _check(examples, exp: testdata.Expected, side: int) -> None:
  """Every decodable good example once, its image the one of its caption, resized."""
  # make_webdataset's undecodable image is captioned "broken".
  want = sorted(exp.captions[k] for k in exp.all_good if exp.captions[k] != "broken")
  assert sorted(caption for _, caption in examples) == want
  for data, caption in examples:
    with Image.open(io.BytesIO(data)) as img:
      rgb = np.asarray(img.convert("RGB"))
    assert min(rgb.shape[:2]) == side
    assert abs(testdata.red(rgb) - int(caption.split()[-1]) % 80) <= 1, caption  # jpeg


@needs_beam
def test_beam_on_two_workers_writes_what_one_process_writes(tmp_path):
  exp = testdata.make_webdataset(str(tmp_path / "wds"))
  src = str(tmp_path / "wds" / "{00000..00003}.tar")
  argv = ["--dataset=webdataset", f"--src={src}", "--max_resolution=16"]
  assert data_prepare.main(argv + [f"--data_dir={tmp_path / 'here'}"]) == 0
  assert data_prepare.main(argv + [f"--data_dir={tmp_path / 'beam'}"] + BEAM_FLAGS) == 0
  name = "corpus_shards/webdataset_max16"
  here, beam = _examples(str(tmp_path / "here"), name), _examples(str(tmp_path / "beam"), name)
  assert beam == here  # Same keys, hence the same order; same bytes.
  _check(here, exp, side=16)
  for d in ("here", "beam"):
    meta = datasets.load_builder(name, str(tmp_path / d)).info.metadata
    assert {k: meta[k] for k in _expected_counts(exp)} == _expected_counts(exp), d
    assert (meta["min_side"], meta["max_side"]) == (16, 16)
    assert meta["num_shards"] == 4 and meta["src"] == src
  assert not list((tmp_path / "beam").rglob(corpus_builder.COUNTS_FILE))


def _tiny_config(data_dir: str, embed_dir: str):
  config = config_lib.load_config(os.path.join(ROOT, "configs/demo.py:tiny"))
  config.data.data_dir = data_dir
  config.text.embed_dir = embed_dir
  return config


@needs_beam
def test_beam_embeddings_equal_the_in_process_ones(tmp_path, capsys):
  from imagen_jax.train import embeddings
  from imagen_jax.train import prepare as train_prepare

  exp = testdata.make_parquet(str(tmp_path / "pq"), num_shards=3, per_shard=6)
  src = str(tmp_path / "pq" / "*.parquet")
  beam_dir, beam_emb = str(tmp_path / "beam"), str(tmp_path / "beam_emb")
  argv = ["--dataset=parquet", f"--src={src}", f"--data_dir={beam_dir}", "--embed"]
  argv += ["--config", os.path.join(ROOT, "configs/demo.py:tiny"), "--embed_part_size=8"]
  assert train_prepare.main(argv + [f"--config.text.embed_dir={beam_emb}"] + BEAM_FLAGS) == 0
  assert "--config.text.precomputed=True" in capsys.readouterr().out
  # In this process: the same dataset, and the embeddings of train.embeddings.
  opts = corpus.CorpusOptions("parquet")
  builder = corpus_builder.prepare(str(tmp_path / "here"), src, opts)
  config = _tiny_config(str(tmp_path / "here"), str(tmp_path / "here_emb"))
  train_prepare.point_config_at(config, builder, str(tmp_path / "here"))
  embeddings.write(config)

  name = "corpus_shards/parquet"
  assert _examples(beam_dir, name) == _examples(str(tmp_path / "here"), name)
  meta = builder.info.metadata
  assert {k: meta[k] for k in _expected_counts(exp)} == _expected_counts(exp)
  parts = sorted(p.name for p in (tmp_path / "beam_emb").glob("part-*"))
  assert len(parts) == 3, parts  # 19 captions with '' in parts of about 8.
  want = cache_lib.EmbeddingCache(str(tmp_path / "here_emb"))
  got = cache_lib.EmbeddingCache(beam_emb)
  captions = want.captions()
  assert sorted(got.captions()) == captions and "" in captions
  assert len(captions) == len(exp.all_good) + 1
  index = {c: i for i, c in enumerate(got.captions())}
  emb_w, mask_w = want.get(range(len(captions)))
  emb_g, mask_g = got.get([index[c] for c in captions])
  assert (mask_g == mask_w).all()
  np.testing.assert_allclose(np.float32(emb_g), np.float32(emb_w), rtol=0, atol=1e-5)
  # The trainer's reader finds them where the printed flags point.
  config.text.embed_dir = beam_emb
  emb, mask = embeddings.CaptionEmbeddings(config).lookup(["caption 3", ""])
  assert emb.shape == (2, config.text.max_length, config.text.dim) and mask[0].any()


def _error_line(capsys) -> str:
  """The one error line (progress bars may come before it, a traceback never)."""
  err = capsys.readouterr().err
  assert "Traceback" not in err, err
  lines = [line for line in err.splitlines() if line.startswith("error")]
  assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
  return lines[0]


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
  testdata.make_parquet(str(tmp_path / "pq"), num_shards=1)
  out = ["--data_dir", str(tmp_path / "out")]
  cases = [
    (["--dataset=webdataset", f"--src={tmp_path}/none/*.tar"], "matches no file"),
    (["--dataset=webdataset", f"--src={tmp_path}/{{0..2.tar"], "Malformed brace"),
    (["--dataset=webdataset"], "needs --src"),
    (
      ["--dataset=parquet", f"--src={tmp_path}/pq/*.parquet", "--caption_column=text"],
      "data.caption_column='text' is not a column of .*; its columns: key, jpg, caption, width",
    ),
    (["--dataset=parquet", f"--src={tmp_path}/pq/*.parquet", "--embed"], "train.prepare"),
  ]
  cases.append((["--dataset=shapes", "--beam_runner=DirectRunner"], "apply to --dataset"))
  testdata.make_webdataset(str(tmp_path / "wds"), num_shards=1, bad=False)
  (tmp_path / "wds" / "00001.tar").write_bytes(b"not a tar")  # found while preparing
  cases.append(
    (["--dataset=webdataset", f"--src={tmp_path}/wds/*.tar"], "Cannot read shard .*00001.tar")
  )
  for argv, message in cases:
    assert data_prepare.main(argv + out) == 2, argv
    assert re.search(message, _error_line(capsys)), (argv, message)
  assert not list((tmp_path / "out").rglob("*.array_record*"))  # Nothing was written.


def test_beam_flags_without_beam_installed_are_one_line(tmp_path, capsys, monkeypatch):
  testdata.make_parquet(str(tmp_path / "pq"), num_shards=1)
  monkeypatch.setitem(sys.modules, "apache_beam", None)  # import apache_beam fails
  monkeypatch.setitem(sys.modules, "apache_beam.options", None)
  argv = ["--dataset=parquet", f"--src={tmp_path}/pq/*.parquet", f"--data_dir={tmp_path}/out"]
  assert data_prepare.main(argv + ["--beam_runner=DirectRunner"]) == 2
  assert "pip install -r requirements-beam.txt" in _error_line(capsys)
  assert not (tmp_path / "out" / "corpus_shards" / "parquet").exists()


def test_no_decodable_example_and_other_shards_are_refused(tmp_path, capsys):
  bad = str(tmp_path / "bad.tar")
  testdata.write_tar(bad, [("a", {"jpg": b"not an image", "txt": b"x"}), ("b", {"txt": b"y"})])
  argv = ["--dataset=webdataset", f"--src={bad}", f"--data_dir={tmp_path / 'out'}"]
  assert data_prepare.main(argv) == 2
  line = _error_line(capsys)
  assert "No decodable example" in line and "skipped: no_image 1, undecodable_image 1" in line
  testdata.make_webdataset(str(tmp_path / "wds"), num_shards=2, bad=False)
  argv[1] = f"--src={tmp_path}/wds/*.tar"
  assert data_prepare.main(argv) == 0
  assert "12 examples written; 12 records read; skipped: none" in capsys.readouterr().out
  assert data_prepare.main(argv) == 0
  assert "already prepared" in capsys.readouterr().out
  argv[1] = f"--src={tmp_path}/wds/00000.tar"
  assert data_prepare.main(argv) == 2
  assert "was prepared from 2 shards" in _error_line(capsys)
