"""Export back to diffusers and bare UNet folders.

Round trip: the diffusers fixture folder → ours (convert) → export-diffusers →
the exported safetensors hold exactly the fixture's tensors and the exported
config.json is the fixture's UNet config; the exported folder, read back as a
bare UNet folder by ``load_unet``, reproduces diffusers' reference outputs.
A training run's stage exports its EMA params; a non-IF-layout stage is refused.
(That real diffusers loads an export is checked by tools/check_export_roundtrip.py.)
"""

import json
import os
import shutil
import types

import jax
import numpy as np
import pytest

from imagen_jax import run as run_lib
from imagen_jax.convert import __main__ as cli
from imagen_jax.convert import deepfloyd_if, if_config, if_export, if_weights
from imagen_jax.safetensors_dir import WeightsReader
from imagen_jax.train import checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
STAGES = ("if_stage1", "if_stage2")
TOL = 1e-5


def fixture(name, *parts):
  return os.path.join(FIXTURES, name, *parts)


def reference(name):
  return dict(np.load(fixture(name, "reference.npz")))


def read_json(path):
  with open(path) as f:
    return json.load(f)


def tensors(folder):
  with WeightsReader(folder) as r:
    return {k: r.get(k) for k in r.keys()}


def apply(model, params, ref):
  kw = {}
  if "unet_lowres" in ref:
    kw = dict(lowres=ref["unet_lowres"], noise_level=ref["unet_noise_level"])
  return jax.jit(model.apply)(
    {"params": params}, ref["unet_x"], ref["unet_t"], ref["unet_text"], **kw
  )


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def export_cli(src, out, *extra):
  return cli.main(["export-diffusers", "--src", str(src), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """name -> a converted (float32) copy of each fixture stage, via the CLI."""
  root = tmp_path_factory.mktemp("converted")
  out = {}
  for name in STAGES:
    out[name] = str(root / name)
    assert cli.main(["deepfloyd-if", "--src", fixture(name), "--out", out[name]]) == 0
  return out


@pytest.mark.parametrize("name", STAGES)
def test_roundtrip_fixture_to_diffusers(name, converted, tmp_path):
  out = tmp_path / "unet"
  assert export_cli(converted[name], out) == 0
  assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
  assert os.listdir(tmp_path) == ["unet"]  # no temp folder left
  original = tensors(fixture(name, "unet"))
  exported = tensors(str(out))
  assert sorted(exported) == sorted(original)
  for k, v in original.items():
    assert exported[k].dtype == np.float32 and exported[k].shape == v.shape, k
    # bf16 / fp16 fixture weights widen to float32 exactly: bitwise equal.
    np.testing.assert_array_equal(
      exported[k].view(np.uint32), v.astype(np.float32).view(np.uint32), err_msg=k
    )
  assert read_json(out / "config.json") == read_json(fixture(name, "unet", "config.json"))

  # The export is a bare UNet folder: it loads back and matches diffusers' outputs
  # (stage II only, to save a compile: it has every block kind stage I has, plus
  # the low-res input, the noise-level embedding and cross-only attention).
  if name == "if_stage2":
    model, params = deepfloyd_if.load_unet(str(out))
    ref = reference(name)
    err = max_err(apply(model, params, ref), ref["unet_out"])
    print(f"{name}: exported folder vs diffusers reference, max abs error {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("name", STAGES)
def test_derived_config_is_the_diffusers_config(name):
  """Without the kept source config, the config derived from ours is diffusers' own."""
  cfg = read_json(fixture(name, "unet", "config.json"))
  model = if_config.diffusers_config_to_model(cfg)
  assert if_export.check_if_layout(model, cfg["sample_size"], name) == cfg


def test_export_without_kept_config_and_in_half_precision(converted, tmp_path):
  src = tmp_path / "conv"
  shutil.copytree(converted["if_stage2"], src)
  meta = read_json(src / "config.json")
  del meta["stage"]["diffusers_unet"]
  with open(src / "config.json", "w") as f:
    json.dump(meta, f)
  assert export_cli(src, tmp_path / "unet", "--dtype", "float16", "--stage", "if_II") == 0
  assert read_json(tmp_path / "unet" / "config.json") == read_json(
    fixture("if_stage2", "unet", "config.json")
  )
  original = tensors(fixture("if_stage2", "unet"))  # stored in fp16
  exported = tensors(str(tmp_path / "unet"))
  assert all(
    np.array_equal(exported[k], v) and exported[k].dtype == np.float16 for k, v in original.items()
  )


def test_to_torch_inverts_to_flax():
  rng = np.random.default_rng(0)
  cases = [
    (("conv_in", "kernel"), (3, 3, 4, 8)),
    (("x", "q", "kernel"), (8, 2, 4)),
    (("x", "out", "kernel"), (2, 4, 8)),
    (("x", "proj", "kernel"), (5, 7)),
    (("x", "q", "bias"), (2, 4)),
    (("x", "norm", "scale"), (8,)),
  ]
  for path, shape in cases:
    ours = rng.standard_normal(shape).astype(np.float32)
    torch = if_weights.to_torch(path, ours)
    assert torch.shape == if_weights.torch_shape(path, shape)
    np.testing.assert_array_equal(if_weights.to_flax(path, torch, shape), ours)


def make_run(workdir, stage_config, ema, params):
  """A run workdir as the trainer leaves it: config.json + one orbax checkpoint."""
  config = types.SimpleNamespace(
    to_json=lambda indent=2: json.dumps(
      {"stages": {stage_config["name"]: stage_config}}, indent=indent
    )
  )
  run_lib.write_config(str(workdir), config)
  ckpt = checkpoint.StageCheckpointer(str(workdir), stage_config["name"], async_save=False)
  state = types.SimpleNamespace(step=np.int32(7), params=params, opt_state={}, ema_params=ema)
  ckpt.save(7, state, {}, {"stage": stage_config["name"], "step": 7}, force=True)
  ckpt.close()


def test_export_from_a_run_reads_the_ema_params(converted, tmp_path):
  stage, params = deepfloyd_if.load_converted(converted["if_stage1"])
  ema = jax.tree.map(lambda a: np.asarray(a) * 0.5 + 0.25, params)
  train = jax.tree.map(np.zeros_like, ema)
  run = tmp_path / "run"
  make_run(run, stage.to_dict(), ema, train)
  out = tmp_path / "unet"
  assert export_cli(run, out, "--stage", "if_I") == 0
  assert read_json(out / "config.json") == read_json(fixture("if_stage1", "unet", "config.json"))
  exported = tensors(str(out))
  n = len(stage.model.channels)
  for path, a in if_weights.flat_params(ema):
    np.testing.assert_array_equal(
      exported[if_weights.diffusers_name(path, n)], if_weights.to_torch(path, a)
    )


def test_non_if_layout_stage_is_refused(tmp_path, capsys):
  import configs.demo as demo  # pylint: disable=g-import-not-at-top

  run = tmp_path / "run"
  run_lib.write_config(str(run), demo.get_config("tiny"))
  out = tmp_path / "unet"
  assert export_cli(run, out, "--stage", "sr") == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "stage 'sr'" in err and "not IF-layout" in err, err
  assert "efficient=True" in err and "resample='conv'" in err, err
  assert export_cli(run, out) == 2  # two stages: --stage needed
  assert "pick one with --stage" in capsys.readouterr().err
  assert export_cli(run, out, "--stage", "nope") == 2
  assert "no stage 'nope'" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["run"]


def test_export_failure_leaves_nothing(converted, tmp_path, monkeypatch):
  real = if_weights.to_torch
  calls = []

  def failing(path, array):
    calls.append(path)
    if len(calls) == 10:
      raise OSError("disk full")
    return real(path, array)

  monkeypatch.setattr(if_weights, "to_torch", failing)
  assert export_cli(converted["if_stage1"], tmp_path / "unet") == 2
  assert os.listdir(tmp_path) == []
  (tmp_path / "unet").mkdir()
  (tmp_path / "unet" / "mine.txt").write_text("keep")
  assert export_cli(converted["if_stage1"], tmp_path / "unet") == 2
  assert os.listdir(tmp_path / "unet") == ["mine.txt"]


def copy_bare(name, dst):
  """The fixture's unet/ subfolder alone."""
  return shutil.copytree(fixture(name, "unet"), dst)


@pytest.mark.parametrize("name", STAGES)
def test_bare_unet_folder(name, tmp_path):
  bare = copy_bare(name, tmp_path / "unet")
  # (Loading a bare folder's weights: the round trip loads its export.)
  # Scheduler settings: IF's defaults for the stage, told apart by the UNet config.
  folder = deepfloyd_if.read_folder(str(bare))
  stage = deepfloyd_if.build_stage_config(folder)
  sr = name == "if_stage2"
  assert stage.name == ("if_II" if sr else "if_I") and bool(stage.model.lowres_cond) == sr
  assert stage.sample.max_value == (1.0 if sr else 1.5)
  assert (stage.sample.threshold, stage.sample.quantile, stage.sample.variance) == (
    "dynamic",
    0.95,
    "learned_range",
  )
  assert stage.diffusion.num_train_steps == 1000 and stage.text.encoder == ""
  if sr:
    assert stage.diffusion.aug_num_train_steps == 1000 and stage.sample.noise_level == 250
  # The same settings the fixture's pipeline folder gives.
  full = deepfloyd_if.build_stage_config(deepfloyd_if.read_folder(fixture(name)))
  assert stage.sample.to_dict() == full.sample.to_dict()
  assert stage.diffusion.to_dict() == full.diffusion.to_dict()


def test_bare_unet_scheduler_from_a_folder(tmp_path, capsys):
  bare = copy_bare("if_stage1", tmp_path / "unet")
  sched = tmp_path / "sched"
  sched.mkdir()
  cfg = read_json(fixture("if_stage1", "scheduler", "scheduler_config.json"))
  with open(sched / "scheduler_config.json", "w") as f:
    json.dump(dict(cfg, sample_max_value=1.25, thresholding=False), f)
  out = tmp_path / "conv"
  assert (
    cli.main(["deepfloyd-if", "--src", str(bare), "--out", str(out), "--scheduler", str(sched)])
    == 0
  )
  stage = deepfloyd_if.read_converted_config(str(out))
  assert stage.sample.max_value == 1.25 and stage.sample.threshold == "static"
  assert read_json(out / "config.json")["pipeline"] == "UNet2DConditionModel"
  assert (
    cli.main(
      [
        "deepfloyd-if",
        "--src",
        str(bare),
        "--out",
        str(tmp_path / "o2"),
        "--scheduler",
        str(tmp_path / "nowhere"),
      ]
    )
    == 2
  )
  assert "scheduler_config.json" in capsys.readouterr().err
  # A unet/ inside a pipeline folder takes the pipeline's scheduler.
  pipe = shutil.copytree(fixture("if_stage1"), tmp_path / "pipe")
  with open(pipe / "scheduler" / "scheduler_config.json", "w") as f:
    json.dump(dict(cfg, sample_max_value=1.75), f)
  shutil.copytree(os.path.join(FIXTURES, "t5_v1_1"), pipe / "text_encoder")
  stage = deepfloyd_if.build_stage_config(deepfloyd_if.read_folder(str(pipe / "unet")))
  assert stage.sample.max_value == 1.75
  assert stage.text.encoder == str(pipe / "text_encoder")
