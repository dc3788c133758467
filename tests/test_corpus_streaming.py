"""Streaming training input (imagen_jax.data.streaming): disjoint shares, exact resume, skips."""

import collections
import itertools

import ml_collections
import numpy as np
import pytest

import corpus_testdata as td
from imagen_jax.data import pipeline, streaming


def _data(src, fmt="webdataset", **kw):
  base = dict(format=fmt, src=src, seed=3, shuffle_buffer=5, interleave=2, decode_workers=2)
  return ml_collections.ConfigDict(base | kw)


def _one_epoch(data, p, n):
  """(keys of epoch 0 in order, skipped count when the first epoch-1 example came, slot)."""
  it = pipeline.train_input(data, resolution=16, batch_size=1, process_index=p, process_count=n)
  keys = []
  while True:
    batch = next(it)
    assert batch["image"].shape == (1, 16, 16, 3) and batch["image"].dtype == np.uint8
    if it.epoch == 1:
      return keys, it.skipped, it.slot
    keys.append(batch["key"][0])


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_two_processes_cover_every_good_example_once(tmp_path, fmt):
  make = td.make_webdataset if fmt == "webdataset" else td.make_parquet
  exp = make(str(tmp_path))
  pattern = str(tmp_path / ("*.tar" if fmt == "webdataset" else "{00000..00002}.parquet"))
  good = {k for k in exp.all_good if exp.captions[k] != "broken"}
  shares, skipped, extra = [], 0, 0
  for p in range(2):
    keys, counts, slot = _one_epoch(_data(pattern, fmt), p, 2)
    assert len(keys) == len(set(keys))
    shares.append(set(keys))
    skipped += sum(counts.values())
    extra += slot - 1  # epoch-1 records skipped before its first example
  assert not shares[0] & shares[1]
  assert shares[0] | shares[1] == good
  assert skipped == sum(exp.skipped.values()) + extra


def test_skip_reasons_counted(tmp_path):
  exp = td.make_webdataset(str(tmp_path))
  data = _data(str(tmp_path / "*.tar"))
  _, counts, slot = _one_epoch(data, 0, 1)
  # Also counted: epoch 1's records before its first example.
  spec = streaming.spec_from_config(data, 0, 1)
  want = collections.Counter(exp.skipped)
  for _, _, record in itertools.islice(streaming.epoch_slots(spec, 1), slot - 1):
    want[record.skip or "undecodable_image"] += 1
  assert counts == want


def test_resume_continues_exactly(tmp_path):
  td.make_webdataset(str(tmp_path))
  data = _data(str(tmp_path / "*.tar"))
  kw = dict(resolution=16, batch_size=3, process_count=2)
  for p in range(2):
    it = pipeline.train_input(data, process_index=p, **kw)
    batches = [next(it) for _ in range(9)]  # crosses into later epochs
    for stop in (2, 5):
      examples = stop * 3 * 2
      rows = [[0, 0], [0, 0]]
      rows[p] = list(it.position(examples))
      resumed = pipeline.train_input(
        data, process_index=p, start_example=examples, data_state={"stream": rows}, **kw
      )
      for want in batches[stop:]:
        got = next(resumed)
        assert list(got["key"]) == list(want["key"])
        np.testing.assert_array_equal(got["image"], want["image"])
      resumed.close()
    it.close()


def test_checkpoint_fields_single_process(tmp_path):
  td.make_parquet(str(tmp_path))
  data = _data(str(tmp_path / "*.parquet"), "parquet")
  it = pipeline.train_input(data, resolution=8, batch_size=2)
  for _ in range(4):
    next(it)
  assert streaming.checkpoint_fields(it, 8) == {"stream": [list(it.position(8))]}
  assert streaming.checkpoint_fields(iter([]), 8) == {}
  metrics = streaming.input_metrics(it)
  assert set(metrics) == {f"skipped_{r}" for r in streaming.corpus.SKIP_REASONS}


def test_other_process_count_starts_next_epoch(tmp_path, caplog):
  td.make_webdataset(str(tmp_path))
  spec = streaming.spec_from_config(_data(str(tmp_path / "*.tar")), 0, 1)
  assert streaming.start_position({"stream": [[2, 7], [3, 1]]}, spec) == (4, 0)
  assert "re-assigned" in caplog.text
  assert streaming.start_position({"examples": 5}, spec) == (0, 0)


def test_bad_streaming_settings(tmp_path):
  exp = td.make_webdataset(str(tmp_path / "w"), num_shards=2, bad=False)
  td.make_parquet(str(tmp_path / "p"), num_shards=1)
  cases = [
    (_data(str(tmp_path / "w/*.tar")), 3, "2 shard\\(s\\), fewer than the 3 processes"),
    (_data(str(tmp_path / "w/*.zip")), 1, "matches no file"),
    (_data(str(tmp_path / "w/{0..")), 1, "Malformed brace"),
    (_data(str(tmp_path / "p/*.parquet"), "parquet", caption_column="text"), 1, "columns: key"),
    (_data(str(tmp_path / "w/*.tar"), "tfrecord"), 1, "config.data.format='tfrecord'"),
    (_data(str(tmp_path / "w/*.tar"), shuffle_buffer=0), 1, "shuffle_buffer=0"),
  ]
  for data, n, words in cases:
    with pytest.raises(ValueError, match=words) as e:
      streaming.check_config(data, n)
    assert "\n" not in str(e.value)
  streaming.check_config(_data(str(tmp_path / "w/*.tar")), 2)
  assert exp.shards


def test_no_decodable_example(tmp_path):
  td.write_tar(str(tmp_path / "0.tar"), [("a", {"jpg": b"bad", "txt": b"x"}), ("b", {"txt": b"y"})])
  it = pipeline.train_input(_data(str(tmp_path / "0.tar")), resolution=8, batch_size=1)
  with pytest.raises(ValueError, match="No decodable example") as e:
    next(it)
  assert "\n" not in str(e.value)


def test_train_captions_of_a_streamed_corpus(tmp_path):
  exp = td.make_parquet(str(tmp_path))
  got = list(pipeline.train_captions(_data(str(tmp_path / "*.parquet"), "parquet")))
  assert got == [exp.captions[k] for k in exp.all_good]
