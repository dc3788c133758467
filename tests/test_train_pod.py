"""Pod-scale pieces of the train step on 8 fake CPU devices: gradient accumulation
equals the whole-batch update, the T5 inside the step equals precomputed
embeddings, batches that do not split are refused before compiling, a bucket
workdir keeps its gs:// scheme."""

import json
import os

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing

from imagen_jax import config as config_lib
from imagen_jax import parallel
from imagen_jax import run as run_lib
from imagen_jax.stages import build_stage
from imagen_jax.text import TextEncoder
from imagen_jax.train import fingerprint
from imagen_jax.train import embeddings, optim, periodic, state as state_lib, step as step_lib
from imagen_jax.train import trainer

from test_train import _max_abs_diff, _mesh
from tiny import ROOT, tiny_config as _tiny_config


def _step(config, strategy, batch, uncond, text_encoder=None):
  """One train step from the same initial state; returns (params, loss)."""
  stage = build_stage(config.stages.base)
  tc = config.train
  tx = optim.make_optimizer(tc)
  mesh = None if strategy is None else _mesh(strategy)
  rules = parallel.logical_rules(strategy or "dp")
  state, shardings = state_lib.create_train_state(
    jax.random.PRNGKey(0), stage, tx, mesh, rules, text_len=6
  )
  fn = step_lib.jit_train_step(stage, tx, tc, shardings, mesh, rules, text_encoder=text_encoder)
  if mesh is not None:
    split = step_lib.batch_shardings(mesh, tokens=text_encoder is not None)
    batch = {k: jax.device_put(v, split[k]) for k, v in batch.items()}
  params = None if text_encoder is None else text_encoder.params
  state, metrics = fn(state, batch, jax.random.PRNGKey(1), uncond, params)
  return jax.device_get(state.params), float(metrics["loss"])


def _images(config, b):
  r = config.stages.base.resolution
  return np.random.default_rng(0).integers(0, 256, (b, r, r, 3), dtype=np.uint8)


def test_grad_accum_equals_the_whole_batch_update(tmp_path):
  config = _tiny_config(tmp_path, warmup_steps=0, lr=1e-2, batch_size=16)
  rng = np.random.default_rng(1)
  d, length = config.text.dim, 6
  batch = {
    "image": _images(config, 16),
    "text_emb": rng.normal(size=(16, length, d)).astype(np.float32),
    "text_mask": np.arange(length)[None].repeat(16, 0) < rng.integers(1, 7, (16, 1)),
  }
  uncond = {"text_emb": np.zeros((length, d), np.float32), "text_mask": np.zeros(length, bool)}
  ref_params, ref_loss = _step(config, "fsdp", batch, uncond)
  for accum in (2,):
    config.train.grad_accum = accum
    params, loss = _step(config, "fsdp", batch, uncond)
    assert abs(loss - ref_loss) < 1e-5, accum
    assert _max_abs_diff(params, ref_params) < 1e-5, accum
  config.train.grad_accum = 1
  config.train.batch_size = 8
  other, _ = _step(config, "fsdp", {k: v[:8] for k, v in batch.items()}, uncond)
  assert _max_abs_diff(other, ref_params) > 1e-4  # the test can tell batches apart


def test_text_encoder_inside_the_step_equals_precomputed_embeddings(tmp_path):
  config = _tiny_config(tmp_path, warmup_steps=0, lr=1e-2)
  mesh, rules = _mesh("fsdp"), parallel.logical_rules("fsdp")
  encoder = TextEncoder.from_config(config.text, mesh, rules)
  captions = ["a red circle", "", "a blue square in the top left", "x"] * 2
  ids, mask = encoder.tokenize(captions, 6)
  emb = np.asarray(encoder.encode(captions, 6)[0])
  u_ids, u_mask = encoder.tokenize([""], 6)
  u_emb = np.asarray(encoder.encode([""], 6)[0])[0]
  image = _images(config, 8)
  inside, loss_in = _step(
    config,
    "fsdp",
    {"image": image, "text_ids": ids, "text_mask": mask},
    {"text_ids": u_ids[0], "text_mask": u_mask[0]},
    encoder,
  )
  outside, loss_out = _step(
    config,
    "fsdp",
    {"image": image, "text_emb": emb, "text_mask": mask},
    {"text_emb": u_emb, "text_mask": u_mask[0]},
  )
  assert abs(loss_in - loss_out) < 1e-5
  assert _max_abs_diff(inside, outside) < 1e-5


def test_batch_not_divisible_by_dp_times_accum_is_refused(tmp_path):
  config = _tiny_config(tmp_path / "data", batch_size=8, grad_accum=2)
  with pytest.raises(
    ValueError,
    match=r"config.train.batch_size=8 is not divisible by the "
    r"data-parallel size 8 \(mesh axes data×fsdp\) × "
    r"config.train.grad_accum=2 = 16",
  ):
    trainer.train_and_evaluate(config, str(tmp_path / "a"), ["base"])


def test_data_position_is_kept_in_examples():
  assert trainer.data_position(None, 0, 8) == 0
  assert trainer.data_position({"examples": 40, "batch_size": 8}, 5, 16) == 40
  assert trainer.data_position({"next_index": 5}, 5, 8) == 40  # older checkpoints


def _bucket_as_directory(root):
  """mock_epath functions that serve gs://bucket/... from the local ``root``."""

  def local(path):
    path = os.fspath(path)
    return str(root) + path[len("gs://bucket") :] if path.startswith("gs://bucket") else path

  seen = []

  def one(original, path, *args, **kwargs):
    seen.append(os.fspath(path))
    return original(local(path), *args, **kwargs)

  def two(original, src, dst, *args, **kwargs):
    seen.append(os.fspath(dst))
    return original(local(src), local(dst), *args, **kwargs)

  fns = dict.fromkeys(
    (
      "open",
      "exists",
      "isdir",
      "listdir",
      "makedirs",
      "mkdir",
      "glob",
      "stat",
      "walk",
      "remove",
      "rmtree",
    ),
    one,
  )
  fns.update(dict.fromkeys(("replace", "rename", "copy"), two))
  return fns, seen


def test_a_bucket_workdir_keeps_its_scheme(tmp_path):
  """config.json, metrics.jsonl and sample grids go through epath to gs:// paths."""
  config = _tiny_config(tmp_path / "data")
  fns, seen = _bucket_as_directory(tmp_path)
  with epath_testing.mock_epath(**fns):
    assert run_lib.stage_dir("gs://bucket/run", "base") == "gs://bucket/run/base"
    assert run_lib.checkpoint_dir("gs://bucket/run", "base") == ("gs://bucket/run/base/checkpoints")
    run_lib.write_config("gs://bucket/run", config)
    assert run_lib.read_config("gs://bucket/run").to_dict() == json.loads(config.to_json())
    fingerprint.check_workdir("gs://bucket/run", config, ["base"])
    writer = periodic.MetricWriter("gs://bucket/run/base")
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"loss": 0.5})
    writer.close()
    samples = epath.Path("gs://bucket/run/base/samples")
    samples.mkdir(parents=True)
    run_lib.write_png(samples / "step_1.png", np.zeros((4, 4, 3), np.uint8))
  lines = (tmp_path / "run" / "base" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x)["step"] for x in lines] == [1, 2]
  assert (tmp_path / "run" / "base" / "samples" / "step_1.png").stat().st_size > 0
  # The file system saw the bucket paths themselves (the mock mapped them).
  assert {
    "gs://bucket/run/config.json",
    "gs://bucket/run/base/metrics.jsonl",
    "gs://bucket/run/base/samples/step_1.png",
  } <= set(seen)


@pytest.mark.slow
def test_precomputed_embeddings_train_as_the_encoder_in_the_step(tmp_path, copy_shapes):
  # A copy of the session's shapes: the embeddings are written into its data dir.
  config = _tiny_config(copy_shapes, num_steps=2, checkpoint_every=100, async_checkpoint=False)
  with pytest.raises(FileNotFoundError, match="python -m imagen_jax.train.embeddings"):
    config.text.precomputed = True
    trainer.train_and_evaluate(config, str(tmp_path / "none"), ["base"])
  embeddings.write(config)
  trainer.train_and_evaluate(config, str(tmp_path / "cached"), ["base"])
  config.text.precomputed = False
  trainer.train_and_evaluate(config, str(tmp_path / "encoder"), ["base"])
  read = lambda run: [
    json.loads(x)["loss"]
    for x in (tmp_path / run / "base" / "metrics.jsonl").read_text().splitlines()
  ]
  cached, encoded = read("cached"), read("encoder")
  assert len(cached) == 2 and np.allclose(cached, encoded, rtol=0, atol=1e-5)


def test_sharding_benchmark_refuses_a_batch_that_does_not_split_into_microbatches():
  from benchmarks import sharding as bench  # pylint: disable=import-outside-toplevel

  config = config_lib.load_config(os.path.join(ROOT, "configs/demo.py:tiny"))
  row = bench.bench_strategy(config, "base", "dp", jax.devices()[:8], batch=8, grad_accum=2)
  assert row.status == (
    "error: batch 8 does not split over the 8 data-parallel devices × 2 microbatches"
  )
  assert "| 2 |" in bench.format_table([row])
