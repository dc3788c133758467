"""Data preparation never loses or mixes data: several captions per image,
encodings, 16-bit and transparent images, source fingerprints, preparation
locks (imagen_jax.lockfile), and own data in one command."""

import io
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from PIL import Image

from imagen_jax import config as config_lib
from imagen_jax import lockfile
from imagen_jax.data import datasets
from imagen_jax.data import images
from imagen_jax.data import pipeline
from imagen_jax.data import prepare as prepare_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(array, mode=None):
  buf = io.BytesIO()
  Image.fromarray(array, mode).save(buf, format="PNG")
  return buf.getvalue()


def _captions(builder):
  return sorted(ex["caption"].decode() for ex in builder.as_data_source("train"))


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _write_lock(path, pid, host, age=0.0):
  """A lock file as another process would have left it."""
  path.write_text(
    json.dumps({"pid": pid, "host": host, "what": "test", "since": "earlier", "token": "theirs"})
  )
  then = time.time() - age
  os.utime(path, (then, then))


# --- imagen_jax.lockfile ---------------------------------------------------


def test_lock_refuses_a_live_holder_in_one_line_naming_pid_and_host(tmp_path):
  path = tmp_path / "x.lock"
  with lockfile.hold(path, what="training workdir") as info:
    assert json.loads(path.read_text())["pid"] == os.getpid() == info["pid"]
    with pytest.raises(lockfile.Locked) as error:
      with lockfile.hold(path, what="training workdir"):
        pass
  message = str(error.value)
  assert isinstance(error.value, RuntimeError) and "\n" not in message
  assert f"pid {os.getpid()}" in message and socket.gethostname() in message
  assert message.startswith("training workdir is locked") and str(path) in message
  assert not path.exists()  # Released on exit.
  with pytest.raises(KeyError):  # Released when the block raises, too.
    with lockfile.hold(path):
      raise KeyError("boom")
  assert not path.exists()


@pytest.mark.parametrize("case", ["dead_pid", "old_heartbeat_other_host"])
def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog, case):
  path = tmp_path / "x.lock"
  if case == "dead_pid":
    pid = _dead_pid()
    _write_lock(path, pid, socket.gethostname())
  else:
    pid = os.getpid()  # Another host: its pid says nothing here.
    _write_lock(path, pid, "elsewhere", age=100)
  with caplog.at_level(logging.WARNING):
    with lockfile.hold(path, stale_after=50) as info:
      assert json.loads(path.read_text())["token"] == info["token"]
  assert f"Taking over the stale lock {path}" in caplog.text
  assert f"pid {pid}" in caplog.text


def test_live_lock_on_another_host_is_respected_and_heartbeats(tmp_path):
  path = tmp_path / "x.lock"
  _write_lock(path, 1, "elsewhere", age=10)
  with pytest.raises(lockfile.Locked, match="pid 1 on host elsewhere"):
    with lockfile.hold(path, stale_after=50):
      pass
  path.unlink()
  with lockfile.hold(path, heartbeat=0.05):
    old = time.time() - 5
    os.utime(path, (old, old))
    time.sleep(0.3)
    assert time.time() - os.stat(path).st_mtime < 1.0  # Touched again.


# --- captions: several per image, encodings ---------------------------------


def test_several_captions_per_image_give_one_example_each(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for name, value in (("a.png", 10), ("b.png", 20), ("c.png", 30)):
    (src / name).write_bytes(_png(np.full((8, 8, 3), value, np.uint8)))
  rows = [
    {"file": "a.png", "caption": "a one"},
    {"file": "a.png", "caption": "a two"},
    {"file": "a.png", "caption": "a two"},  # Exact duplicate: once.
    {"file": "b.png", "caption": ["b one", "b two", "b three"]},
    {"file": "c.png", "caption": "c one"},
  ]
  (src / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  builder = datasets.prepare("image_captions", tmp_path / "j", src=src)
  assert _captions(builder) == ["a one", "a two", "b one", "b three", "b two", "c one"]
  for ex in builder.as_data_source("train"):  # Each caption with its image.
    value = {"a": 10, "b": 20, "c": 30}[ex["caption"].decode()[0]]
    assert (pipeline.decode_image(ex["image"]) == value).all()
  # The same with .txt files: one caption per non-empty line.
  (src / "captions.jsonl").unlink()
  (src / "a.txt").write_text("a one\n\n  a two  \n")
  (src / "b.txt").write_text("b one")
  builder = datasets.prepare("image_captions", tmp_path / "t", src=src)
  assert _captions(builder) == ["a one", "a two", "b one"]
  assert builder.info.metadata["num_skipped_no_caption"] == 1  # c.png


def test_byte_order_marks_are_read_and_non_utf8_files_named(tmp_path, caplog, capsys):
  src = tmp_path / "src"
  src.mkdir()
  for name in ("a.png", "b.png", "c.png"):
    (src / name).write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
  (src / "a.txt").write_bytes("\ufeffcafé au lait\n".encode("utf-8"))
  (src / "b.txt").write_text("plain")
  (src / "c.txt").write_bytes("caf\xe9".encode("latin-1"))  # Not UTF-8.
  with caplog.at_level(logging.WARNING):
    builder = datasets.prepare("image_captions", tmp_path / "t", src=src)
  assert _captions(builder) == ["café au lait", "plain"]
  meta = builder.info.metadata
  assert meta["num_skipped_bad_caption"] == 1
  assert str(src / "c.txt") in meta["skipped_bad_caption"][0]
  assert f"caption file {src / 'c.txt'}: not UTF-8" in caplog.text
  # captions.jsonl: a BOM is fine; a non-UTF-8 line stops, naming file:line.
  jsonl = src / "captions.jsonl"
  jsonl.write_bytes(b'\xef\xbb\xbf{"file": "a.png", "caption": "bom"}\n')
  builder = datasets.prepare("image_captions", tmp_path / "j", src=src)
  assert _captions(builder) == ["bom"]
  jsonl.write_bytes(
    b'{"file": "a.png", "caption": "ok"}\n{"file": "b.png", "caption": "caf\xe9"}\n'
  )
  argv = ["--dataset", "image_captions", "--data_dir", str(tmp_path / "k"), "--src", str(src)]
  capsys.readouterr()
  assert prepare_cli.main(argv) == 1
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and f"{jsonl}:2: not UTF-8" in err, err


# --- image modes ---------------------------------------------------------------


def _modes():
  """(name, encoded PNG, expected RGB of every pixel)."""
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[...] = (200, 100, 50, 128)
  la = np.zeros((4, 4, 2), np.uint8)
  la[...] = (200, 51)
  palette = Image.new("P", (4, 4), 1)
  palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
  buf = io.BytesIO()
  palette.save(buf, format="PNG", transparency=1)  # Green, transparent.
  return [
    ("grey16", _png(np.full((4, 4), 32768, np.uint16)), (128, 128, 128)),
    ("grey16_white", _png(np.full((4, 4), 65535, np.uint16)), (255,) * 3),
    ("rgba", _png(rgba, "RGBA"), (100, 50, 25)),  # 200*128/255 = 100.4.
    ("la", _png(la, "LA"), (40, 40, 40)),  # 200*51/255 = 40.
    ("palette_transparent", buf.getvalue(), (0, 0, 0)),
    ("grey8", _png(np.full((4, 4), 77, np.uint8)), (77, 77, 77)),
  ]


def test_16bit_alpha_palette_and_grey_images_convert_to_rgb(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  expected = {}
  for name, data, rgb in _modes():
    (src / f"{name}.png").write_bytes(data)
    (src / f"{name}.txt").write_text(name)
    expected[name] = rgb
    with Image.open(io.BytesIO(data)) as img:  # The rule on its own.
      np.testing.assert_array_equal(np.asarray(images.to_rgb(img))[0, 0], rgb)
    np.testing.assert_array_equal(pipeline.decode_image(data)[0, 0], rgb)
  builder = datasets.prepare("image_captions", tmp_path / "t", src=src)
  stored = {
    ex["caption"].decode(): pipeline.decode_image(ex["image"])
    for ex in builder.as_data_source("train")
  }
  assert sorted(stored) == sorted(expected)
  for name, rgb in expected.items():
    assert stored[name].shape == (4, 4, 3)
    assert (stored[name] == rgb).all(), (name, stored[name][0, 0], rgb)


# --- source fingerprint ----------------------------------------------------


def test_changed_source_is_prepared_again_unchanged_is_not(tmp_path, capsys, caplog):
  src, data_dir = tmp_path / "src", tmp_path / "t"
  src.mkdir()
  (src / "a.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
  (src / "a.txt").write_text("first")
  (src / "notes.md").write_text("not part of the data")
  assert _captions(datasets.prepare("image_captions", data_dir, src=src)) == ["first"]
  capsys.readouterr()
  (src / "notes.md").write_text("edited, still irrelevant")
  datasets.prepare("image_captions", data_dir, src=src)
  assert "already prepared" in capsys.readouterr().out
  edits = [
    lambda: (src / "a.txt").write_text("second"),
    lambda: (src / "b.png").write_bytes(_png(np.ones((8, 8, 3), np.uint8))),
    lambda: (src / "b.txt").write_text("new"),
    lambda: os.utime(src / "a.png", ns=(1, 10**18)),
  ]  # mtime only.
  wanted = [["second"], ["second"], ["new", "second"], ["new", "second"]]
  for edit, captions in zip(edits, wanted, strict=True):
    edit()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      builder = datasets.prepare("image_captions", data_dir, src=src)
    assert "changed since it was prepared" in caplog.text
    assert "Prepared image_captions" in capsys.readouterr().out
    assert _captions(builder) == captions
    assert _captions(datasets.load_builder("image_captions", data_dir)) == captions
  # Nothing left aside; the new fingerprint is recorded.
  assert sorted(os.listdir(data_dir / "image_captions" / "default")) == ["1.0.0"]
  datasets.prepare("image_captions", data_dir, src=src)
  assert "already prepared" in capsys.readouterr().out


# --- preparation lock ------------------------------------------------------

_HOLD_SCRIPT = textwrap.dedent("""
    import sys
    from imagen_jax import lockfile
    with lockfile.hold(sys.argv[1], what='test holder'):
      print('held', flush=True)
      sys.stdin.readline()  # Until the test says so.
""")


def test_two_preparations_of_one_dataset_do_not_race(tmp_path, caplog):
  src, data_dir = tmp_path / "src", tmp_path / "t"
  src.mkdir()
  (src / "a.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
  (src / "a.txt").write_text("a")
  lock = data_dir / "image_captions" / "default.lock"
  lock.parent.mkdir(parents=True)
  # Another process holds the dataset lock: refused at once with wait=0 ...
  proc = subprocess.Popen(
    [sys.executable, "-c", _HOLD_SCRIPT, str(lock)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=ROOT),
  )
  try:
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(lockfile.Locked, match=f"pid {proc.pid} on host"):
      datasets.prepare("image_captions", data_dir, src=src, wait=0)

    # ... or prepared once it is released (the default waits as long as the
    # holder lives; 60 s here so that a bug cannot hang the suite).
    def release():
      proc.stdin.write("go\n")
      proc.stdin.flush()

    threading.Timer(0.5, release).start()
    with caplog.at_level(logging.WARNING):
      builder = datasets.prepare("image_captions", data_dir, src=src, wait=60)
    assert f"Waiting for pid {proc.pid}" in caplog.text
    assert proc.wait(timeout=60) == 0
  finally:
    proc.kill()
    proc.wait()
  assert _captions(builder) == ["a"] and not lock.exists()
  # A lock left by a killed preparation is taken over.
  _write_lock(lock, _dead_pid(), socket.gethostname())
  datasets.prepare("image_captions", data_dir, src=src, wait=0)
  assert not lock.exists()


# --- own data in one command ---------------------------------------------------


def test_builder_settings_of_another_dataset_are_one_line_errors():
  demo = config_lib.load_config(os.path.join(ROOT, "configs/demo.py"))
  demo.data.name = "image_captions"
  demo.data.src = "my_images/"
  with pytest.raises(ValueError) as error:
    datasets.builder_settings(demo.data)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith("config.data.builder_kwargs.holdout: ")
  assert "settings of shapes" in message and "configs/own_data.py" in message
  own = config_lib.load_config(os.path.join(ROOT, "configs/own_data.py"))
  with pytest.raises(ValueError, match=r"^config.data.src is empty"):
    datasets.builder_settings(own.data)
  own.data.src = "my_images/"
  assert datasets.builder_settings(own.data) == {"max_resolution": 64}
  shapes = config_lib.load_config(os.path.join(ROOT, "configs/demo.py"))
  shapes.data.src = "my_images/"
  with pytest.raises(ValueError, match=r"^config.data.src=.* only applies"):
    datasets.builder_settings(shapes.data)


def test_own_data_config_prepares_and_trains_in_one_call(tmp_path):
  from imagen_jax.train import trainer  # pylint: disable=import-outside-toplevel

  src = tmp_path / "my_images"
  src.mkdir()
  rng = np.random.default_rng(0)
  for i in range(8):
    (src / f"img{i}.png").write_bytes(_png(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)))
    (src / f"img{i}.txt").write_text(f"picture {i}\nanother view of {i}\n")
  config = config_lib.load_config(os.path.join(ROOT, "configs/own_data.py:tiny"))
  config.data.update(dict(src=str(src), data_dir=str(tmp_path / "data")))
  config.train.update(dict(num_steps=2, checkpoint_every=2))
  # One UNet level instead of three: the train step compiles several times
  # faster, and the data path is what this test is about.
  config.stages.base.model.update(
    dict(channels=(16,), num_res_blocks=(1,), attention=("self_cross",))
  )
  results = trainer.train_and_evaluate(config, str(tmp_path / "run"), ["base"])
  assert [(r.stage, r.step) for r in results] == [("base", 2)]
  assert np.isfinite(results[0].last_metrics["loss"])
  builder = datasets.load_builder("image_captions", tmp_path / "data", max_resolution=32)
  assert builder.info.splits["train"].num_examples == 16  # 2 captions each.
  assert builder.info.metadata["max_side"] == 32  # 40x48 scaled to 32x38.
