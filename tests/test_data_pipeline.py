"""The grain input pipeline: determinism, iterator state, sharding, cropping."""

import io

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P
from PIL import Image

from imagen_jax.data import pipeline


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _source(n=40, h=12, w=16):
  """In-memory examples; example i is filled with value i, captioned `ex i`."""
  return [
    {"image": _png(np.full((h, w, 3), i, np.uint8)), "caption": f"ex {i}".encode()}
    for i in range(n)
  ]


def _ids(batch):
  return [int(c.split()[1]) for c in batch["caption"]]


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_batches_have_the_promised_types_and_shapes():
  ds = pipeline.make_dataset(_source(), resolution=8, batch_size=4, train=True, seed=0)
  batch = next(iter(ds))
  assert batch["image"].shape == (4, 8, 8, 3)
  assert batch["image"].dtype == np.uint8
  assert batch["caption"].shape == (4,)
  assert all(type(c) is str for c in batch["caption"])
  # Each image is the uniform image its caption names.
  for image, i in zip(batch["image"], _ids(batch)):
    assert (image == i).all()


def test_same_seed_same_batches_other_seed_other_order():
  make = lambda seed: pipeline.make_dataset(
    _source(), resolution=8, batch_size=4, train=True, seed=seed
  )
  a, b, c = _take(make(1), 25), _take(make(1), 25), _take(make(2), 25)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    assert list(x["caption"]) == list(y["caption"])
  assert [_ids(x) for x in a] != [_ids(x) for x in c]


def test_train_repeats_forever_and_reshuffles_each_epoch():
  ds = pipeline.make_dataset(_source(20), resolution=8, batch_size=5, train=True, seed=0)
  batches = _take(ds, 12)  # Three epochs.
  epochs = [sum((_ids(b) for b in batches[k : k + 4]), []) for k in range(0, 12, 4)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(20))
  assert epochs[0] != epochs[1]


def test_restoring_iterator_state_reproduces_following_batches():
  make = lambda: pipeline.make_dataset(_source(), resolution=8, batch_size=3, train=True, seed=5)
  it = iter(make())
  for _ in range(17):  # Crosses an epoch boundary after restore too.
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(10)]
  restored = iter(make())
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(got["image"], want["image"])
    assert list(got["caption"]) == list(want["caption"])


@pytest.mark.parametrize("train", [True, False])
def test_process_shards_are_disjoint_and_cover_the_data(train):
  n, count = 43, 3
  seen = []
  for index in range(count):
    ds = pipeline.make_dataset(
      _source(n),
      resolution=8,
      batch_size=2,
      train=train,
      seed=0,
      process_index=index,
      process_count=count,
      num_epochs=1,
      drop_remainder=False,
    )
    seen.append(sum((_ids(b) for b in ds), []))
  sets = [set(s) for s in seen]
  # Equal share each: eval cuts the source to a multiple of the process count,
  # train drops the trailing partial global batch (of 3 × 2 examples).
  share = n // count if not train else n // (2 * count) * 2
  assert all(len(s) == share for s in seen)
  for i in range(count):
    for j in range(i + 1, count):
      assert not sets[i] & sets[j]
  union = set().union(*sets)
  assert len(union) == share * count and union <= set(range(n))
  if not train:
    assert union == set(range(n // count * count))


def _rows(ds, n):
  return [(_ids(b), b["image"][:, 0, 0, 0].tolist()) for b in _take(ds, n)]


def test_train_order_is_global_whatever_the_process_count():
  """Processes' batches concatenate to the one-process global batch (same crops)."""
  make = lambda b, p, count, start=0: pipeline.make_dataset(
    _source(),
    resolution=8,
    batch_size=b,
    train=True,
    seed=3,
    process_index=p,
    process_count=count,
    start_example=start,
  )
  one = _take(make(6, 0, 1), 9)  # Crosses an epoch boundary (40 examples).
  parts = [_take(make(2, p, 3), 9) for p in range(3)]
  for k, whole in enumerate(one):
    np.testing.assert_array_equal(
      np.concatenate([parts[p][k]["image"] for p in range(3)]), whole["image"]
    )
    assert sum((_ids(parts[p][k]) for p in range(3)), []) == _ids(whole)
  # Resuming at example 18 with another batch size and process count continues
  # the same sequence of examples.
  flat = sum((_ids(b) for b in one), [])
  resumed = [_take(make(4, p, 2, start=18), 4) for p in range(2)]
  got = sum((_ids(resumed[p][k]) for k in range(4) for p in range(2)), [])
  assert got == flat[18 : 18 + 32]


def test_eval_keeps_order_and_last_partial_batch():
  ds = pipeline.make_dataset(_source(10), resolution=8, batch_size=4, train=False)
  batches = list(ds)
  assert [_ids(b) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_resize_and_crop():
  image = np.zeros((20, 40, 3), np.uint8)
  image[:, 10:30] = 255  # A bright middle band.
  center = pipeline.resize_and_crop(image, 10)
  assert center.shape == (10, 10, 3)
  assert center[:, 2:8].min() > 200  # The center crop sees the band.
  rng = np.random.default_rng(0)
  lefts = {pipeline.resize_and_crop(image, 10, rng)[:, 0, 0].mean() > 128 for _ in range(40)}
  assert lefts == {True, False}  # Random crops move along the long side.
  tall = pipeline.resize_and_crop(np.zeros((30, 10, 3), np.uint8), 16)
  assert tall.shape == (16, 16, 3)


def test_decode_accepts_decoded_arrays():
  gray = np.full((5, 6), 7, np.uint8)
  assert pipeline.decode_image(gray).shape == (5, 6, 3)
  assert pipeline.decode_image(_png(np.zeros((5, 6, 3), np.uint8))).shape == (5, 6, 3)


def test_bad_sharding_arguments_name_the_values():
  with pytest.raises(ValueError, match="process_index 3"):
    pipeline.make_dataset(
      _source(8), resolution=8, batch_size=2, train=True, process_index=3, process_count=2
    )
  with pytest.raises(ValueError, match="fewer than process_count=16"):
    pipeline.make_dataset(
      _source(8), resolution=8, batch_size=2, train=True, process_index=0, process_count=16
    )


def test_make_global_batch_on_eight_devices():
  devices = np.array(jax.devices()[:8]).reshape(4, 2)
  mesh = Mesh(devices, ("data", "fsdp"))
  batch = next(iter(pipeline.make_dataset(_source(), resolution=8, batch_size=8, train=True)))
  out = pipeline.make_global_batch(batch, mesh, P(("data", "fsdp")))
  assert isinstance(out["image"], jax.Array)
  assert out["image"].shape == (8, 8, 8, 3)
  assert len(out["image"].addressable_shards) == 8
  assert out["image"].addressable_shards[0].data.shape == (1, 8, 8, 3)
  np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
  assert list(out["caption"]) == list(batch["caption"])
