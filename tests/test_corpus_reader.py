"""Shard readers (imagen_jax.data.corpus): patterns, webdataset and parquet records, skips."""

import collections
import os

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import corpus_testdata as td
from imagen_jax.data import corpus

WDS = corpus.CorpusOptions("webdataset")
PQ = corpus.CorpusOptions("parquet")


def _read_all(exp, opts):
  good, skipped = [], collections.Counter()
  for path in exp.shards:
    for r in corpus.read_shard(path, opts):
      if r.skip is None and corpus.decode_image(r.image) is None:
        skipped["undecodable_image"] += 1
      elif r.skip is None:
        good.append((r.key, r.caption))
      else:
        skipped[r.skip] += 1
  return good, skipped


def test_expand_sources_brace_glob_and_errors(tmp_path):
  for i in range(12):
    (tmp_path / f"{i:03d}.tar").write_bytes(b"")
  (tmp_path / "x.parquet").write_bytes(b"")
  got = corpus.expand_sources(str(tmp_path / "{008..011}.tar"))
  assert [os.path.basename(p) for p in got] == ["008.tar", "009.tar", "010.tar", "011.tar"]
  got = corpus.expand_sources([str(tmp_path / "00*.tar"), str(tmp_path / "{000,001}.tar")])
  assert [os.path.basename(p) for p in got] == [f"{i:03d}.tar" for i in range(10)]
  assert corpus.expand_sources(str(tmp_path / "{x.parquet,011.tar}")) == sorted(
    [str(tmp_path / "x.parquet"), str(tmp_path / "011.tar")]
  )
  for bad, words in [
    (str(tmp_path / "*.zip"), "matches no file"),
    (str(tmp_path / "{001..}.tar"), "Malformed brace"),
    (str(tmp_path / "{001..003.tar"), "Malformed brace"),
    (str(tmp_path / "{a{b}}.tar"), "Malformed brace"),
    (str(tmp_path / "nope.tar"), "does not exist"),
    ("", "empty"),
  ]:
    with pytest.raises(ValueError, match=words) as e:
      corpus.expand_sources(bad)
    assert "\n" not in str(e.value)


def test_webdataset_records_and_skips(tmp_path):
  exp = td.make_webdataset(str(tmp_path))
  good, skipped = _read_all(exp, WDS)
  decodable = [k for k in exp.all_good if exp.captions[k] != "broken"]
  assert [k for k, _ in good] == decodable
  assert all(c == exp.captions[k] for k, c in good)
  assert skipped == exp.skipped
  assert set(skipped) == {
    "undecodable_image",
    "no_caption",
    "no_image",
    "truncated_shard",
    "damaged_member",
  }


def test_webdataset_decodes_each_format(tmp_path):
  exp = td.make_webdataset(str(tmp_path), num_shards=1, bad=False)
  records = list(corpus.read_shard(exp.shards[0], WDS))
  for n, r in enumerate(records):
    image = corpus.decode_image(r.image)
    assert image.shape == (24, 40, 3) and image.dtype == np.uint8
    assert abs(td.red(image) - n) <= 1  # jpg / png / webp in turn
  assert records[1].caption == "caption 1"  # from the json member


def test_parquet_records_skips_and_start(tmp_path):
  exp = td.make_parquet(str(tmp_path))
  good, skipped = _read_all(exp, PQ)
  assert [k for k, _ in good] == exp.all_good
  assert skipped == exp.skipped
  path = exp.shards[1]
  keys = [r.key for r in corpus.read_shard(path, PQ)]
  for start in range(len(keys) + 1):
    assert [r.key for r in corpus.read_shard(path, PQ, start=start)] == keys[start:]


def test_parquet_row_index_keys_and_missing_column(tmp_path):
  exp = td.make_parquet(str(tmp_path), num_shards=1, key=False)
  keys = [r.key for r in corpus.read_shard(exp.shards[0], PQ) if r.skip is None]
  assert keys == exp.good[exp.shards[0]]
  assert corpus.parquet_columns(exp.shards[0]) == ["jpg", "caption", "width"]
  with pytest.raises(ValueError, match=r"data.image_column='image'.*columns: jpg, caption, width"):
    list(corpus.read_shard(exp.shards[0], corpus.CorpusOptions("parquet", image_column="image")))


def test_missing_and_unreadable_shards(tmp_path):
  bad = tmp_path / "bad.tar"
  bad.write_bytes(b"\x01" * 100)
  for path, opts in [(tmp_path / "gone.tar", WDS), (bad, WDS), (bad, PQ)]:
    with pytest.raises(corpus.ShardError, match=str(path)) as e:
      list(corpus.read_shard(str(path), opts))
    assert "\n" not in str(e.value)


def test_options_from_config():
  import ml_collections

  cfg = ml_collections.ConfigDict(dict(format="parquet", image_column="png", src="x"))
  assert corpus.options_from_config(cfg) == corpus.CorpusOptions("parquet", image_column="png")
  with pytest.raises(ValueError, match="data.format='tfrecord'"):
    corpus.CorpusOptions("tfrecord")


class _FakeGCS(MemoryFileSystem):
  """An in-memory stand-in for gcsfs: 'gs://bucket/x' paths, no leading '/'."""

  protocol = ("gs", "gcs")
  root_marker = ""
  store: dict = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = path[len("gs://") :] if path.startswith("gs://") else path
    return path.rstrip("/")


@pytest.fixture
def fake_gcs(monkeypatch):
  """epath's fsspec backend for gs:// served from memory."""
  from etils.epath import backend, gpath

  fsspec.register_implementation("gcs", _FakeGCS, clobber=True)
  fsspec.register_implementation("gs", _FakeGCS, clobber=True)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", backend.fsspec_backend)
  backend.fsspec_backend._get_filesystem.cache_clear()
  _FakeGCS.store.clear()
  yield _FakeGCS()
  backend.fsspec_backend._get_filesystem.cache_clear()


def test_gs_paths_through_epath(tmp_path, fake_gcs):
  exp = td.make_webdataset(str(tmp_path / "w"), num_shards=3, bad=False)
  pq = td.make_parquet(str(tmp_path / "p"), num_shards=1)
  for path in exp.shards + pq.shards:
    with open(path, "rb") as f:
      fake_gcs.pipe(f"gs://bucket/laion/{os.path.basename(path)}", f.read())
  shards = corpus.expand_sources("gs://bucket/laion/{00000..00002}.tar")
  assert shards == [f"gs://bucket/laion/{i:05d}.tar" for i in range(3)]
  assert corpus.expand_sources("gs://bucket/laion/*.tar") == shards
  assert corpus.expand_sources("gs://bucket/*/*.parquet") == ["gs://bucket/laion/00000.parquet"]
  keys = [r.key for s in shards for r in corpus.read_shard(s, WDS)]
  assert keys == exp.all_good
  pq_keys = [r.key for r in corpus.read_shard("gs://bucket/laion/00000.parquet", PQ) if not r.skip]
  assert pq_keys == pq.all_good
  with pytest.raises(ValueError, match="matches no file"):
    corpus.expand_sources("gs://bucket/laion/*.zip")
  with pytest.raises(ValueError, match="'gs://bucket/laion/00003.tar' does not exist"):
    corpus.expand_sources("gs://bucket/laion/{00000..00009}.tar")
  with pytest.raises(corpus.ShardError, match="gs://bucket/laion/00009.tar"):
    list(corpus.read_shard("gs://bucket/laion/00009.tar", WDS))
