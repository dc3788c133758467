"""Stable Diffusion components (UNet, VAE, CLIP text) against diffusers / transformers
(tiny random pipeline folders from tools/make_sd_fixtures.py), the converter CLI, its
bad input, and the export round trip."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from imagen_jax.convert import __main__ as cli
from imagen_jax.convert import stable_diffusion as sd
from imagen_jax.safetensors_dir import WeightsReader

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NAMES = ("sd_v1_tiny", "sd_v2_tiny", "sd_x4_tiny")
TOL = 1e-4  # relative to the output's scale, float32 (the T5 and IF bar)


def close(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  err = np.abs(actual - expected).max() / np.abs(expected).max()
  assert err < TOL, err


@pytest.fixture(scope="module", params=NAMES)
def loaded(request):
  """(name, reference, {component: (model, params)}) from the pipeline folder."""
  src = os.path.join(FIXTURES, request.param)
  ref = np.load(os.path.join(src, "reference.npz"))
  parts = dict(unet=sd.load_unet(src), vae=sd.load_vae(src), text=sd.load_text_encoder(src))
  return request.param, ref, parts


def unet_out(model, params, ref, x=None, t=None, text=None):
  kw = {}
  if "unet_lowres" in ref:
    kw = dict(lowres=ref["unet_lowres"], noise_level=ref["unet_noise_level"])
  x = ref["unet_x"] if x is None else x
  t = ref["unet_t"] if t is None else t
  text = ref["unet_text"] if text is None else text
  return model.apply({"params": params}, x, t, text, **kw)


def test_unet_matches_diffusers(loaded):
  _, ref, parts = loaded
  close(unet_out(*parts["unet"], ref), ref["unet_out"])


def test_vae_matches_diffusers(loaded):
  _, ref, parts = loaded
  model, params = parts["vae"]
  close(model.apply({"params": params}, ref["vae_x"], method="encode"), ref["vae_mean"])
  close(model.apply({"params": params}, ref["vae_z"], method="decode"), ref["vae_decoded"])


def test_text_encoder_matches_transformers(loaded):
  _, ref, parts = loaded
  model, params = parts["text"]
  close(model.apply({"params": params}, ref["text_ids"]), ref["text_hidden"])
  skip = model.apply({"params": params}, ref["text_ids"], skip_layers=1)
  close(skip, ref["text_hidden_skip1"])  # the penultimate layer, diffusers' clip_skip=1
  penultimate = model.clone(skip_layers=1).apply({"params": params}, ref["text_ids"])
  np.testing.assert_array_equal(penultimate, skip)


def test_configs_read_as_diffusers(loaded):
  name, _, parts = loaded
  unet, vae = parts["unet"][0].config, parts["vae"][0].config
  if name == "sd_v1_tiny":
    assert not unet.use_linear_projection and unet.heads == (2, 2)
    assert parts["text"][0].config.tower.act == "quick_gelu"
    assert vae.scaling_factor == 0.18215 and vae.downsample_factor == 2
  if name == "sd_v2_tiny":
    assert unet.use_linear_projection and unet.upcast_attention and unet.heads == (1, 2)
    assert parts["text"][0].config.tower.act == "gelu"
  if name == "sd_x4_tiny":
    assert unet.in_channels == 7 and unet.num_class_embeds == 360
    assert unet.only_cross_attention == (True, True, False)
    assert vae.scaling_factor == 0.08333 and vae.downsample_factor == 4


def _alphas(start, end, n=1000):
  betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2  # scaled_linear
  return np.cumprod(1.0 - betas)


def test_two_step_pipeline_reference(loaded):
  """Our components in diffusers' DDIM loop (2 steps, guidance 7.5) reproduce the
  pipeline outputs stored for the latent stage: checks those fixtures and the
  converted sampling settings together."""
  name, ref, parts = loaded
  src = os.path.join(FIXTURES, name)
  settings = sd.sd_config.pipeline_settings(src)
  s = settings["scheduler"]
  alphas = _alphas(s["beta_start"], s["beta_end"], s["num_train_steps"])
  (unet, pu), (vae, pv) = parts["unet"], parts["vae"]
  text = np.concatenate([ref["pipe_negative_embeds"], ref["pipe_prompt_embeds"]])
  x, kw = ref["pipe_latents"].astype(np.float64), {}
  if "pipe_lowres" in ref:
    low = settings["low_res_scheduler"]
    a = _alphas(low["beta_start"], low["beta_end"])[int(ref["pipe_noise_level"])]
    lowres = np.sqrt(a) * ref["pipe_lowres"] + np.sqrt(1 - a) * ref["pipe_noise"]
    kw = dict(lowres=np.concatenate([lowres] * 2), noise_level=np.full(2, ref["pipe_noise_level"]))
    assert settings["max_noise_level"] == 350
  step = s["num_train_steps"] // 2
  for t in (step + s["steps_offset"], s["steps_offset"]):
    out = unet.apply(
      {"params": pu}, np.concatenate([x] * 2).astype(np.float32), np.full(2, t), text, **kw
    )
    out = np.asarray(out, np.float64)
    out = out[:1] + 7.5 * (out[1:] - out[:1])
    a, a_prev = alphas[t], alphas[t - step] if t >= step else alphas[0]
    if s["prediction"] == "v_prediction":
      x0, eps = np.sqrt(a) * x - np.sqrt(1 - a) * out, np.sqrt(a) * out + np.sqrt(1 - a) * x
    else:
      x0, eps = (x - np.sqrt(1 - a) * out) / np.sqrt(a), out
    x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
  close(x, ref["pipe_out_latents"])
  image = vae.apply(
    {"params": pv}, (x / vae.config.scaling_factor).astype(np.float32), method="decode"
  )
  close(np.clip(np.asarray(image) / 2 + 0.5, 0, 1), ref["pipe_image"])


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_loaders_take_the_component_folder(component, tmp_path):
  src = os.path.join(FIXTURES, "sd_v1_tiny")
  loader = {"unet": sd.load_unet, "vae": sd.load_vae, "text_encoder": sd.load_text_encoder}
  _, from_pipeline = loader[component](src)
  _, from_folder = loader[component](os.path.join(src, component))
  flat = lambda p: dict(sd.if_weights.flat_params(p))  # noqa: E731
  a, b = flat(from_pipeline), flat(from_folder)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  other = "vae" if component != "vae" else "unet"
  with pytest.raises(ValueError, match="describes"):
    loader[component](os.path.join(src, other))


def run(*argv):
  return cli.main([str(a) for a in argv])


@pytest.mark.parametrize("name", ["sd_v1_tiny", "sd_x4_tiny"])
def test_cli_convert_load_and_export_round_trip(tmp_path, name):
  src, out, back = os.path.join(FIXTURES, name), tmp_path / name, tmp_path / f"{name}_back"
  assert run("stable-diffusion", "--src", src, "--out", out) == 0
  stage, params = sd.load_converted(str(out))
  assert stage.kind == "latent" and stage.pipeline.startswith("StableDiffusion")
  assert stage.sampling.scheduler.schedule == "scaled_linear"
  if name == "sd_x4_tiny":
    assert stage.sampling.max_noise_level == 350
    assert stage.sampling.low_res_scheduler.beta_end == 0.02
    assert stage.sampling.scheduler.prediction == "v_prediction"
  modules = sd.converted_modules(stage)
  ref = np.load(os.path.join(src, "reference.npz"))
  close(unet_out(modules["unet"], params["unet"], ref), ref["unet_out"])
  assert run("export-diffusers", "--src", out, "--out", back) == 0
  assert set(os.listdir(back)) == set(os.listdir(src)) - {"reference.npz"}
  for component in sd.COMPONENTS:
    with open(os.path.join(src, component, "config.json")) as f:
      want_config = json.load(f)
    with open(back / component / "config.json") as f:
      assert json.load(f) == want_config
    with WeightsReader(os.path.join(src, component), None, sd.WEIGHTS_NAME[component]) as r:
      want = {k: np.asarray(r.get(k), np.float32) for k in r.keys()}
    with WeightsReader(str(back / component), None, sd.WEIGHTS_NAME[component]) as r:
      got = {k: r.get(k) for k in r.keys()}
    assert got.keys() == want.keys()
    for k in want:  # bit for bit in float32
      assert got[k].dtype == np.float32
      np.testing.assert_array_equal(got[k].view(np.uint32), want[k].view(np.uint32))


def test_bfloat16_loading():
  model, params = sd.load_vae(os.path.join(FIXTURES, "sd_v2_tiny"), dtype="bfloat16")
  assert params["encoder"]["conv_in"]["kernel"].dtype == np.dtype("bfloat16")
  ref = np.load(os.path.join(FIXTURES, "sd_v2_tiny", "reference.npz"))
  out = np.asarray(model.apply({"params": params}, ref["vae_z"], method="decode"))
  assert out.dtype == np.float32
  err = np.abs(out - ref["vae_decoded"]).max() / np.abs(ref["vae_decoded"]).max()
  assert err < 0.05, err  # bfloat16 weights and compute: close, not exact


def _copy(tmp_path, name="sd_v1_tiny"):
  path = tmp_path / "src"
  shutil.copytree(os.path.join(FIXTURES, name), path, ignore=shutil.ignore_patterns("*.npz"))
  return path


def _edit_json(file, **changes):
  with open(file) as f:
    data = json.load(f)
  for k, v in changes.items():
    if v is None:
      data.pop(k, None)
    else:
      data[k] = v
  with open(file, "w") as f:
    json.dump(data, f)


def _bad(tmp_path, capsys, *expected):
  out = tmp_path / "out"
  assert run("stable-diffusion", "--src", tmp_path / "src", "--out", out) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and err.startswith("error: "), err
  for e in expected:
    assert e in err, err
  assert not out.exists() and [p for p in os.listdir(tmp_path) if p != "src"] == []


def test_cli_another_pipeline_kind(tmp_path, capsys):
  _edit_json(_copy(tmp_path) / "model_index.json", _class_name="IFPipeline")
  _bad(tmp_path, capsys, "IFPipeline", "StableDiffusionPipeline", "StableDiffusionUpscalePipeline")


def test_cli_missing_component(tmp_path, capsys):
  shutil.rmtree(_copy(tmp_path) / "vae")
  _bad(tmp_path, capsys, "vae")


def test_cli_missing_tensor(tmp_path, capsys):
  file = _copy(tmp_path) / "unet" / "diffusion_pytorch_model.safetensors"
  tensors = load_file(file)
  del tensors["mid_block.attentions.0.proj_in.weight"]
  save_file(tensors, file)
  _bad(tmp_path, capsys, "missing", "mid_block.attentions.0.proj_in.weight")


def test_cli_unsupported_unet(tmp_path, capsys):
  _edit_json(_copy(tmp_path) / "unet" / "config.json", resnet_time_scale_shift="scale_shift")
  _bad(tmp_path, capsys, "resnet_time_scale_shift", "scale_shift")


def test_cli_not_a_folder_and_output_exists(tmp_path, capsys):
  assert run("stable-diffusion", "--src", tmp_path / "nope", "--out", tmp_path / "o") == 2
  assert "nope" in capsys.readouterr().err
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  src = os.path.join(FIXTURES, "sd_v1_tiny")
  assert run("stable-diffusion", "--src", src, "--out", tmp_path / "full") == 2
  assert "not an empty directory" in capsys.readouterr().err


@pytest.mark.parametrize("value,shown", [(None, "no scaling_factor"), (1000.0, "1000.0")])
def test_cli_vae_scaling_factor_warns(tmp_path, capsys, value, shown):
  _edit_json(_copy(tmp_path) / "vae" / "config.json", scaling_factor=value)
  out = tmp_path / "out"
  assert run("stable-diffusion", "--src", tmp_path / "src", "--out", out) == 0
  warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
  assert len(warnings) == 1 and shown in warnings[0] and "using 0.18215" in warnings[0]
  assert sd.read_converted_config(str(out)).vae.scaling_factor == 0.18215


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_every_parameter_has_logical_axes(component):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  src = os.path.join(FIXTURES, "sd_x4_tiny", component)
  with open(os.path.join(src, "config.json")) as f:
    model = sd.build(component, json.load(f))
  boxed = sd.abstract_params(model)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  unnamed = [x for x in leaves if not isinstance(x, nn.Partitioned)]
  assert leaves and not unnamed


def test_chunked_attention_backend_matches():
  src = os.path.join(FIXTURES, "sd_v2_tiny")
  ref = np.load(os.path.join(src, "reference.npz"))
  model, params = sd.load_unet(src, attention_impl="chunked")
  assert model.config.attention_impl == "chunked"
  close(unet_out(model, params, ref), ref["unet_out"])
