"""TFDS builders shapes and image_captions: prepare and read, no TensorFlow."""

import io
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import datasets
from imagen_jax.data import pipeline
from imagen_jax.data import prepare as prepare_cli
from imagen_jax.data import shapes

from test_data_shapes import check_scene  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(resolution=32, num_train=120, num_test=30, num_holdout=30)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  datasets.prepare("shapes", data_dir, **TINY)
  return data_dir


def _decode(png):
  return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_shapes_builder_renders_captions_that_match_its_pixels(shapes_dir):
  builder = datasets.load_builder("shapes", shapes_dir, **TINY)
  source = builder.as_data_source("train")
  assert len(source) == TINY["num_train"]
  for i in range(len(source)):
    example = source[i]
    check_scene(_decode(example["image"]), example["caption"].decode(), 32)


def test_holdout_compositions_only_in_holdout(shapes_dir):
  builder = datasets.load_builder("shapes", shapes_dir, **TINY)
  assert builder.info.metadata["holdout"] == ["green triangle"]
  sources = builder.as_data_source()
  assert set(sources) == {"train", "test", "holdout"}
  for split in ("train", "test", "holdout"):
    scenes = [shapes.parse_caption(ex["caption"]) for ex in sources[split]]
    held = [shapes.has_composition(s, ["green triangle"]) for s in scenes]
    assert all(held) if split == "holdout" else not any(held), split
    assert sum(len(s) == 2 for s in scenes) == len(scenes) // 2  # Half.


_NO_TF_SCRIPT = textwrap.dedent('''
    import importlib.abc, sys
    attempts, probes = [], []

    class Spy(importlib.abc.MetaPathFinder):
      """Records imports of tensorflow; etils' find_spec probe is allowed."""
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] != 'tensorflow':
          return None
        frame, probe = sys._getframe(1), False
        while frame is not None:
          code = frame.f_code
          if code.co_name == 'find_spec' and 'importlib' in code.co_filename \\
              and 'util' in code.co_filename:
            probe = True
          frame = frame.f_back
        (probes if probe else attempts).append(name)
        return None

    sys.meta_path.insert(0, Spy())
    from imagen_jax.data import datasets, pipeline
    datasets.prepare('shapes', sys.argv[1], resolution=16, num_train=20,
                     num_test=4, num_holdout=4)
    ds = pipeline.build_input('shapes', sys.argv[1], 'train', resolution=16,
                              batch_size=4, train=True,
                              builder_kwargs=dict(resolution=16, num_train=20,
                                                  num_test=4, num_holdout=4))
    batch = next(iter(ds))
    assert batch['image'].shape == (4, 16, 16, 3), batch['image'].shape
    loaded = [m for m in sys.modules if m.split('.')[0] == 'tensorflow']
    print('ATTEMPTS', attempts, 'LOADED', loaded, 'PROBES', len(probes))
    sys.exit(1 if attempts or loaded else 0)
''')


def test_prepare_and_read_never_import_tensorflow(tmp_path):
  # A fresh interpreter: earlier tests may already have imported everything.
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(
    [sys.executable, "-c", _NO_TF_SCRIPT, str(tmp_path)],
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "ATTEMPTS [] LOADED []" in proc.stdout


def _png(array, fmt="PNG"):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def _write_folder(src, with_txt):
  """Three good images (RGB png, gray png, jpeg), one corrupt, one truncated."""
  os.makedirs(src / "sub")
  files = {
    "a.png": _png(np.full((40, 60, 3), 200, np.uint8)),
    "sub/b.png": _png(np.full((30, 30), 90, np.uint8)),
    "c.jpg": _png(np.full((48, 32, 3), 50, np.uint8), "JPEG"),
    "bad.png": b"\x89PNG\r\n\x1a\n not really a png",
    "cut.jpg": _png(np.full((64, 64, 3), 9, np.uint8), "JPEG")[:200],
  }
  captions = {name: f"caption of {name}" for name in files}
  for name, data in files.items():
    (src / name).write_bytes(data)
  if with_txt:
    for name, caption in captions.items():
      (src / name).with_suffix(".txt").write_text(caption)
    (src / "nocap.png").write_bytes(files["a.png"])  # No .txt: skipped.
  else:
    rows = [{"file": n, "caption": c} for n, c in captions.items()]
    rows.append({"file": "missing.png", "caption": "gone"})
    (src / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.mark.parametrize("with_txt", [True, False], ids=["txt", "jsonl"])
def test_image_captions_skips_and_counts_corrupt_images(tmp_path, caplog, with_txt):
  src = tmp_path / "src"
  _write_folder(src, with_txt)
  with caplog.at_level(logging.WARNING):
    builder = datasets.prepare("image_captions", tmp_path / "tfds", src=src)
  meta = builder.info.metadata
  assert builder.info.splits["train"].num_examples == 3
  assert meta["num_skipped_unreadable"] == 2 if with_txt else 3
  assert meta["num_skipped_no_caption"] == (1 if with_txt else 0)
  assert "bad.png" in meta["skipped_unreadable"]
  assert "bad.png" in caplog.text and "unreadable" in caplog.text
  # The counts survive a reload from disk.
  again = datasets.load_builder("image_captions", tmp_path / "tfds")
  assert again.info.metadata["num_skipped_unreadable"] == (meta["num_skipped_unreadable"])
  ds = pipeline.build_input(
    "image_captions", tmp_path / "tfds", "train", resolution=24, batch_size=3, train=False
  )
  batch = next(iter(ds))
  assert batch["image"].shape == (3, 24, 24, 3)
  assert sorted(batch["caption"]) == [
    "caption of a.png",
    "caption of c.jpg",
    "caption of sub/b.png",
  ]


def test_image_captions_max_resolution(tmp_path):
  src = tmp_path / "src"
  _write_folder(src, with_txt=True)
  builder = datasets.prepare("image_captions", tmp_path / "tfds", src=src, max_resolution=16)
  assert builder.builder_config.name == "max16"
  sides = {min(_decode(ex["image"]).shape[:2]) for ex in builder.as_data_source("train")}
  assert sides == {16}


@pytest.mark.parametrize("make", ["missing", "empty", "uncaptioned"])
def test_image_captions_bad_source_folder(tmp_path, make):
  src = tmp_path / "src"
  if make != "missing":
    src.mkdir()
  if make == "uncaptioned":
    (src / "x.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
  error = FileNotFoundError if make == "missing" else ValueError
  with pytest.raises(error, match=str(src)):
    datasets.prepare("image_captions", tmp_path / "tfds", src=src)


def test_bad_jsonl_line_names_file_and_line(tmp_path):
  (tmp_path / "captions.jsonl").write_text('{"file": "a.png"}\n')
  with pytest.raises(ValueError, match=r"captions.jsonl:1"):
    datasets.prepare("image_captions", tmp_path / "tfds", src=tmp_path)


@pytest.mark.parametrize("make", ["missing", "empty", "other_config"])
def test_reading_a_missing_or_empty_dataset_dir(tmp_path, shapes_dir, make):
  data_dir = {"missing": tmp_path / "nope", "empty": tmp_path, "other_config": shapes_dir}[make]
  match = {"missing": "does not exist", "empty": "is empty", "other_config": "not prepared"}[make]
  with pytest.raises(FileNotFoundError, match=match) as info:
    pipeline.build_input(
      "shapes",
      data_dir,
      "train",
      resolution=32,
      batch_size=2,
      train=True,
      builder_kwargs=dict(resolution=48),
    )
  assert str(data_dir) in str(info.value)


def test_resolution_mismatch_is_logged(shapes_dir, caplog):
  builder = datasets.load_builder("shapes", shapes_dir, **TINY)
  with caplog.at_level(logging.WARNING):
    datasets.check_resolution(builder, 64)
  assert "stores 32x32" in caplog.text and "resolution is 64" in caplog.text


def test_cli(tmp_path, capsys):
  argv = [
    "--dataset",
    "shapes",
    "--data_dir",
    str(tmp_path),
    "--resolution",
    "16",
    "--num_train",
    "8",
    "--num_test",
    "2",
    "--num_holdout",
    "2",
  ]
  assert prepare_cli.main(argv) == 0
  assert "Prepared shapes/res16_" in capsys.readouterr().out
  assert prepare_cli.main(argv) == 0
  assert "already prepared" in capsys.readouterr().out
  assert (
    prepare_cli.main(
      ["--dataset", "image_captions", "--data_dir", str(tmp_path), "--src", str(tmp_path / "no")]
    )
    == 1
  )
  assert "does not exist" in capsys.readouterr().err


def test_two_object_share_of_the_train_split(tmp_path):
  from imagen_jax.data import shapes_builder  # pylint: disable=g-import-not-at-top

  assert [shapes_builder.num_objects("train", i) for i in range(4)] == [1, 2, 1, 2]
  assert sum(shapes_builder.num_objects("train", i, 0.75) == 2 for i in range(400)) == 300
  assert shapes_builder.shapes_config(64).name == "res64"  # default names unchanged
  assert shapes_builder.shapes_config(64, two_object_share=0.75).name != "res64"
  with pytest.raises(ValueError, match="two_object_share"):
    shapes_builder.shapes_config(64, two_object_share=1.5)
  kwargs = dict(resolution=16, num_train=16, num_test=8, num_holdout=4, two_object_share=0.75)
  builder = datasets.prepare("shapes", tmp_path, **kwargs)
  counts = {}
  for split in ("train", "test"):
    source = builder.as_data_source(split=split)
    counts[split] = sum(
      len(shapes.parse_caption(source[i]["caption"].decode())) == 2 for i in range(len(source))
    )
  assert counts == {"train": 12, "test": 4}
  captions = list(
    pipeline.train_captions(
      dict(
        name="shapes",
        data_dir=str(tmp_path),
        split="train",
        builder_kwargs=kwargs,
        prepare=True,
        src="",
        seed=0,
      )
    )
  )
  assert len(captions) == 16 and sum(" and " in c for c in captions) == 12
