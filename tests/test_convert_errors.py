"""Damaged inputs to the converter, the exporter and the T5 loader: one line naming the file.

Each case copies a tiny fixture to tmp_path and damages it: a zero-byte or
truncated safetensors file, a sharded index without ``weight_map`` (or not
JSON), an invalid T5 config.json, a missing tensor, a tensor of the wrong
shape, a damaged converted checkpoint. The CLI must exit 2 with one line on
stderr naming the file and nothing written next to ``--out``; the T5 loader
must raise one ValueError or KeyError whose one-line message names the file.
(Missing, unmapped and misshaped UNet tensors through the CLI:
test_convert_if_cli.py.)
"""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from imagen_jax.convert import __main__ as cli
from imagen_jax.safetensors_dir import WeightsReader
from imagen_jax.text import TextEncoder, loading

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
UNET_FILE = "diffusion_pytorch_model.safetensors"
SHARD = "diffusion_pytorch_model-00001-of-00001.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def truncate(file, keep):
  with open(file, "rb") as f:
    data = f.read()
  with open(file, "wb") as f:
    f.write(data[: keep if keep >= 0 else len(data) + keep])


def convert_fails(src, tmp_path, capsys, *needles):
  """The converter CLI exits 2 with one stderr line holding every needle; no output."""
  out = tmp_path / "out"
  before = sorted(os.listdir(tmp_path))
  assert cli.main(["deepfloyd-if", "--src", str(src), "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  for needle in needles:
    assert str(needle) in err, (needle, err)
  assert sorted(os.listdir(tmp_path)) == before  # no output, no temp folder
  return err


def unet_copy(tmp_path, text=False):
  src = shutil.copytree(
    os.path.join(FIXTURES, "if_stage1"),
    tmp_path / "src",
    ignore=shutil.ignore_patterns("reference.npz"),
  )
  if text:
    shutil.copytree(os.path.join(FIXTURES, "t5_v1_1"), src / "text_encoder")
  return src


@pytest.mark.parametrize(
  "keep,needle",
  [(0, "header too small"), (-100, "not fully covered"), (20, "invalid header length")],
)
def test_damaged_unet_safetensors(keep, needle, tmp_path, capsys):
  src = unet_copy(tmp_path)
  file = src / "unet" / UNET_FILE
  truncate(file, keep)
  convert_fails(src, tmp_path, capsys, file, "not a readable safetensors file", needle)


@pytest.mark.parametrize(
  "index,needle",
  [
    ({"metadata": {}}, "no 'weight_map'"),
    ("{not json", "not valid JSON"),
    ({"weight_map": {"conv_in.weight": 3}}, "name no file"),
  ],
)
def test_bad_sharded_index(index, needle, tmp_path, capsys):
  src = unet_copy(tmp_path)
  os.rename(src / "unet" / UNET_FILE, src / "unet" / SHARD)
  with open(src / "unet" / INDEX, "w") as f:
    f.write(index if isinstance(index, str) else json.dumps(index))
  convert_fails(src, tmp_path, capsys, src / "unet" / INDEX, needle)


def test_index_naming_a_shard_without_the_tensor(tmp_path, capsys):
  src = unet_copy(tmp_path)
  with WeightsReader(str(src / "unet")) as r:
    names = sorted(r.keys())
  os.rename(src / "unet" / UNET_FILE, src / "unet" / SHARD)
  save_file({"other": np.zeros(2, np.float32)}, str(src / "unet" / "other.safetensors"))
  weight_map = {n: SHARD for n in names}
  weight_map["conv_in.weight"] = "other.safetensors"
  with open(src / "unet" / INDEX, "w") as f:
    json.dump({"weight_map": weight_map}, f)
  convert_fails(src, tmp_path, capsys, INDEX, "conv_in.weight", "does not hold it")


@pytest.mark.parametrize(
  "text,needle",
  [
    ("{bad", "is not valid JSON"),
    ("[1, 2]", "not a config object"),
    (json.dumps({"model_type": "t5", "d_model": "wide"}), "d_model='wide'"),
    (json.dumps({"model_type": "bert"}), "model_type='bert'"),
  ],
)
def test_invalid_t5_config_in_pipeline(text, needle, tmp_path, capsys):
  src = unet_copy(tmp_path, text=True)
  config = src / "text_encoder" / "config.json"
  config.write_text(text)
  convert_fails(src, tmp_path, capsys, config, needle)


def t5_copy(tmp_path):
  return str(shutil.copytree(os.path.join(FIXTURES, "t5_v1_1"), tmp_path / "t5"))


def t5_fails(path, exc, *needles):
  with pytest.raises(exc) as info:
    TextEncoder.from_pretrained(path)
  msg = info.value.args[0]
  assert "\n" not in msg, msg
  for needle in needles:
    assert str(needle) in msg, (needle, msg)


@pytest.mark.parametrize("keep", [0, -64])
def test_t5_damaged_safetensors(keep, tmp_path):
  path = t5_copy(tmp_path)
  truncate(os.path.join(path, "model.safetensors"), keep)
  t5_fails(
    path, ValueError, os.path.join(path, "model.safetensors"), "not a readable safetensors file"
  )


def test_t5_index_without_weight_map(tmp_path):
  path = t5_copy(tmp_path)
  os.rename(
    os.path.join(path, "model.safetensors"), os.path.join(path, "model-00001-of-00001.safetensors")
  )
  index = os.path.join(path, "model.safetensors.index.json")
  with open(index, "w") as f:
    json.dump({"metadata": {"total_size": 1}}, f)
  t5_fails(path, ValueError, index, "weight_map")


@pytest.mark.parametrize(
  "text,needle",
  [("", "is not valid JSON"), (json.dumps({"model_type": "t5", "num_heads": 0}), "num_heads=0")],
)
def test_t5_invalid_config(text, needle, tmp_path):
  path = t5_copy(tmp_path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(text)
  with pytest.raises(ValueError) as info:
    loading.read_config(path)
  msg = str(info.value)
  assert os.path.join(path, "config.json") in msg and needle in msg and "\n" not in msg, msg


def _rewrite_t5(path, fn):
  file = os.path.join(path, "model.safetensors")
  with WeightsReader(path, weights_name="model") as r:
    tensors = {k: r.get(k) for k in r.keys()}
  fn(tensors)
  save_file(tensors, file)
  return file


def test_t5_missing_tensor(tmp_path):
  path = t5_copy(tmp_path)
  name = "encoder.block.1.layer.0.SelfAttention.k.weight"
  file = _rewrite_t5(path, lambda ts: ts.pop(name))
  t5_fails(path, KeyError, file, name, "missing")


def test_t5_wrong_shape(tmp_path):
  path = t5_copy(tmp_path)
  name = "encoder.block.0.layer.0.SelfAttention.q.weight"
  file = _rewrite_t5(path, lambda ts: ts.update({name: np.zeros((7, 40), np.float32)}))
  t5_fails(path, ValueError, file, name, "(7, 40)")


def test_export_from_damaged_converted_params(tmp_path, capsys):
  conv = tmp_path / "conv"
  assert (
    cli.main(["deepfloyd-if", "--src", os.path.join(FIXTURES, "if_stage1"), "--out", str(conv)])
    == 0
  )
  capsys.readouterr()
  truncate(conv / "params" / "_METADATA", 10)
  assert cli.main(["export-diffusers", "--src", str(conv), "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and str(conv / "params") in err and "cannot restore" in err, err
  assert sorted(os.listdir(tmp_path)) == ["conv"]
