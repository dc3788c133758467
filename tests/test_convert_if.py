"""DeepFloyd IF port: parity with diffusers (UNets, scheduler steps, stage II
conditioning), weight-file variants, sharded loading and streaming memory.

Golden fixtures: tests/fixtures/if_stage{1,2} (tools/make_if_fixtures.py).
The CLI end to end and the bad-input cases are in test_convert_if_cli.py.
"""

import dataclasses
import json
import os
import shutil
import tracemalloc

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from imagen_jax import parallel
from imagen_jax import stages
from imagen_jax.convert import deepfloyd_if, if_config, if_weights
from imagen_jax.safetensors_dir import WeightsReader
from imagen_jax.diffusion import samplers, schedules
from imagen_jax.models import UNet, UNetConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
STAGES = ("if_stage1", "if_stage2")
TOL = 1e-4


def fixture(name):
  return os.path.join(FIXTURES, name)


def reference(name):
  return dict(np.load(os.path.join(fixture(name), "reference.npz")))


def unet_inputs(ref):
  kw = {}
  if "unet_lowres" in ref:
    kw = dict(lowres=ref["unet_lowres"], noise_level=ref["unet_noise_level"])
  return (ref["unet_x"], ref["unet_t"], ref["unet_text"]), kw


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def copy_stage(name, dst):
  """A writable copy of a fixture folder (without reference.npz)."""
  shutil.copytree(fixture(name), dst, ignore=shutil.ignore_patterns("reference.npz"))
  return dst


@pytest.fixture(scope="module")
def loaded():
  """name -> (model, params) loaded once per module."""
  return {name: deepfloyd_if.load_unet(fixture(name)) for name in STAGES}


@pytest.mark.parametrize("name", STAGES)
def test_unet_matches_diffusers(name, loaded):
  model, params = loaded[name]
  ref = reference(name)
  args, kw = unet_inputs(ref)
  out = jax.jit(model.apply)({"params": params}, *args, **kw)
  assert out.shape == ref["unet_out"].shape
  err = max_err(out, ref["unet_out"])
  print(f"{name}: max abs error vs diffusers {err:.2e}")
  assert err < TOL


def test_config_mapping():
  c1 = if_config.diffusers_config_to_model(
    os.path.join(fixture("if_stage1"), "unet", "config.json")
  )
  assert c1["attention"] == ("none", "self_cross", "self_cross")
  assert c1["mid_attention"] == "self_cross"
  assert c1["resample"] == "resblock" and not c1["lowres_cond"] and not c1["aug_embed"]
  assert c1["resblock_out_scale"] == pytest.approx(2**0.5) and c1["mid_out_scale"] == 1.0
  assert c1["text_dim"] == 40 and c1["text_proj_dim"] == 32 and c1["text_norm_groups"] == 32
  assert c1["act"] == "gelu" and c1["time_act"] == "gelu" and not c1["resblock_time_act"]
  with open(os.path.join(fixture("if_stage2"), "unet", "config.json")) as f:
    c2 = if_config.diffusers_config_to_model(json.load(f))
  assert c2["attention"] == ("none", "self_cross", "cross") and c2["mid_attention"] == "cross"
  assert c2["num_res_blocks"] == (2, 1, 2)
  assert c2["lowres_cond"] and c2["aug_embed"] and c2["in_channels"] == 3
  UNetConfig.from_config(c1), UNetConfig.from_config(c2)


@pytest.mark.parametrize("name,max_value", [("if_stage1", 1.5), ("if_stage2", 1.0)])
def test_scheduler_steps_match_diffusers(name, max_value):
  ref = reference(name)
  ac = schedules.alphas_cumprod(schedules.betas_squaredcos_cap_v2(1000))
  step = jax.jit(samplers.if_ddpm_step)
  errs = []
  for i, (t, prev_t) in enumerate(zip(ref["step_t"], ref["step_prev_t"])):
    x_prev, x0 = step(
      ref["step_model_out"][i],
      int(t),
      int(prev_t),
      ref["step_x_t"][i],
      ref["step_noise"][i],
      ac,
      0.95,
      max_value,
    )
    np.testing.assert_allclose(x0, ref["step_x0"][i], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_prev, ref["step_x_prev"][i], rtol=1e-5, atol=1e-5)
    errs.append(max_err(x_prev, ref["step_x_prev"][i]))
  print(f"{name}: scheduler steps {list(ref['step_t'])} max abs error {max(errs):.2e}")


def test_leading_timesteps_match_diffusers():
  ref = reference("if_stage1")
  for n in (27, 50, 100):
    assert schedules.if_timesteps(n) == tuple(int(t) for t in ref[f"timesteps_leading_{n}"])


def test_stage2_conditioning_matches_diffusers():
  ref = reference("if_stage2")
  up = stages.upscale_align_corners(ref["up_lowres"], ref["up_out"].shape[1])
  out = stages.noise_lowres(up, int(ref["up_noise_level"]), ref["up_noise"])
  err = max_err(out, ref["up_out"])
  print(f"stage II upscale + add_noise max abs error {err:.2e}")
  assert err < 1e-5


def _rewrite_weights(folder, transform, name="diffusion_pytorch_model.safetensors"):
  """Reads the stage's weights, applies transform(dict) and writes them as `name`."""
  unet = os.path.join(folder, "unet")
  with WeightsReader(unet) as r:
    tensors = {k: r.get(k) for k in sorted(r.keys())}
  for f in os.listdir(unet):
    if f.endswith((".safetensors", ".json")) and f != "config.json":
      os.remove(os.path.join(unet, f))
  result = transform(tensors)
  if isinstance(result, dict):
    save_file(result, os.path.join(unet, name))


def _shard(tensors, unet, variant=""):
  keys = sorted(tensors)
  halves = (keys[: len(keys) // 2], keys[len(keys) // 2 :])
  infix = f".{variant}" if variant else ""
  weight_map = {}
  for i, part in enumerate(halves):
    file = f"diffusion_pytorch_model{infix}-0000{i + 1}-of-00002.safetensors"
    save_file({k: tensors[k] for k in part}, os.path.join(unet, file))
    weight_map.update({k: file for k in part})
  with open(os.path.join(unet, f"diffusion_pytorch_model.safetensors.index{infix}.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("layout", ["fp32", "fp16_variant", "sharded", "sharded_fp16"])
def test_weight_file_variants(layout, loaded, tmp_path):
  folder = copy_stage("if_stage1", str(tmp_path / "src"))
  unet = os.path.join(folder, "unet")
  to = lambda dt: lambda ts: {k: v.astype(np.float32).astype(dt) for k, v in ts.items()}
  if layout == "fp32":
    _rewrite_weights(folder, to(np.float32))
  elif layout == "fp16_variant":
    _rewrite_weights(folder, to(np.float16), "diffusion_pytorch_model.fp16.safetensors")
  else:
    dt = np.float16 if layout == "sharded_fp16" else np.float32
    _rewrite_weights(
      folder, lambda ts: _shard(to(dt)(ts), unet, "fp16" if dt == np.float16 else "")
    )
  _, params = deepfloyd_if.load_unet(folder)
  _, expected = loaded["if_stage1"]
  errs = jax.tree.map(max_err, params, expected)
  assert max(jax.tree.leaves(errs)) < 1e-6


def test_full_precision_preferred_over_fp16_variant(tmp_path):
  folder = copy_stage("if_stage2", str(tmp_path / "src"))
  unet = os.path.join(folder, "unet")
  with WeightsReader(unet) as r:
    assert r.source.endswith("diffusion_pytorch_model.fp16.safetensors")
    tensors = {k: r.get(k).astype(np.float32) for k in r.keys()}
  save_file(tensors, os.path.join(unet, "diffusion_pytorch_model.safetensors"))
  with WeightsReader(unet) as r:
    assert r.source.endswith("diffusion_pytorch_model.safetensors")
    assert r.get("conv_in.weight").dtype == np.float32
  with WeightsReader(unet, variant="fp16") as r:
    assert r.get("conv_in.weight").dtype == np.float16


def test_load_sharded_on_mesh(loaded):
  """FSDP over 8 fake devices: the training presets shard the converted params."""
  mesh = parallel.make_mesh({"shape": {"fsdp": -1}})
  rules = parallel.logical_rules("fsdp")
  model, params = deepfloyd_if.load_unet(fixture("if_stage1"), mesh=mesh, rules=rules)
  kernel = params["down1_0_res"]["conv1"]["kernel"]
  assert len(kernel.sharding.device_set) == len(jax.devices())
  assert not kernel.sharding.is_fully_replicated
  ref = reference("if_stage1")
  args, kw = unet_inputs(ref)
  out = jax.jit(model.apply)({"params": params}, *args, **kw)
  assert max_err(out, ref["unet_out"]) < TOL


def _synthetic_folder(path, channels):
  """An IF folder with random weights for a wider stage-I config (no torch)."""
  copy_stage("if_stage1", path)
  cfg_file = os.path.join(path, "unet", "config.json")
  with open(cfg_file) as f:
    cfg = json.load(f)
  cfg.update(block_out_channels=list(channels), norm_num_groups=8)
  with open(cfg_file, "w") as f:
    json.dump(cfg, f)
  model = UNet(UNetConfig.from_config(if_config.diffusers_config_to_model(cfg)))
  abstract = nn.unbox(deepfloyd_if.abstract_params(model))
  rng = np.random.default_rng(0)
  tensors = {}
  for p, a in if_weights.flat_params(abstract):
    shape = if_weights.torch_shape(p, a.shape)
    tensors[if_weights.diffusers_name(p, len(channels))] = rng.standard_normal(shape).astype(
      np.float32
    )
  _rewrite_weights(path, lambda _: tensors)
  return path


def _stream_peak(path):
  """(peak traced bytes while streaming every tensor and dropping it, total, largest)."""
  folder, _, model = deepfloyd_if._prepare(path, "float32")
  boxed = deepfloyd_if.abstract_params(model)
  sizes = []
  tracemalloc.start()
  base = tracemalloc.get_traced_memory()[0]
  for _, array in deepfloyd_if._stream(folder, model, boxed, None):
    sizes.append(array.nbytes)
    del array
  peak = tracemalloc.get_traced_memory()[1] - base
  tracemalloc.stop()
  return peak, sum(sizes), max(sizes)


def test_streaming_reads_one_tensor_at_a_time(tmp_path):
  small = _stream_peak(_synthetic_folder(str(tmp_path / "small"), (16, 32, 32)))
  large = _stream_peak(_synthetic_folder(str(tmp_path / "large"), (64, 128, 128)))
  print(f"streaming peak / total / largest tensor (bytes): small {small}, large {large}")
  assert large[1] > 10 * small[1]
  # Bounded by a few copies of the largest tensor plus fixed overhead, far below
  # the total: nothing accumulates across tensors.
  assert large[0] < 3 * large[2] + 512 * 1024
  assert large[0] < large[1] / 3


@pytest.mark.parametrize("option", ["mid_out_scale", "text_norm_groups"])
def test_unet_options_added_for_diffusers(option, loaded):
  """Each UNet option the port added is needed: its default (None: the old
  behaviour) breaks parity with diffusers' IF UNet."""
  assert getattr(UNetConfig(), option) is None
  model, params = loaded["if_stage1"]
  assert getattr(model.config, option) is not None
  changed = UNet(dataclasses.replace(model.config, **{option: None}))
  ref = reference("if_stage1")
  args, kw = unet_inputs(ref)
  out = jax.jit(changed.apply)({"params": params}, *args, **kw)
  assert max_err(out, ref["unet_out"]) > 1e-3
