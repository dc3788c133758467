"""Latent stages (Stable Diffusion, the x4 upscaler) in the cascade and sample.py.

The tiny SD fixtures (converted once per session with a tiny CLIP tokenizer,
conftest's `sd_converted`) and the tiny IF stages (`if_converted`) compose cascades:
IF-I → IF-II → x4 through sample.py; the latent stage through ``Cascade`` against
``stage.sample`` (parity-tested against diffusers in test_stages_latent.py) on CLIP
states computed here with transformers' tokenizer and the converted tower; every
encoder run once per prompt set; bad input.
"""

import collections
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import sample
from imagen_jax import run
from imagen_jax.cascade import Cascade
from imagen_jax.convert import stable_diffusion as sd
from imagen_jax.diffusion import guidance as guidance_lib
from imagen_jax.parallel import offload
from imagen_jax.stages import stage_text_dim, to_uint8
from imagen_jax.stages.latent import LatentStage
from imagen_jax.text import TextEncoder
from imagen_jax.text.clip_encoder import CLIPEncoder, load_tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def if_x4(if_converted, sd_converted) -> str:
  return f"{if_converted}/if_I,{if_converted}/if_II,{sd_converted}/sd_x4_tiny"


def test_read_config_orders_and_chains_the_stages(if_converted, sd_converted, tmp_path):
  config = run.read_config(if_x4(if_converted, sd_converted))
  assert config.stage_order == ("if_I", "if_II", "x4")
  # The upscaler takes IF-II's 16px output and makes 4x that (its own fixture: 8 → 32).
  assert (config.stages.x4.lowres_resolution, config.stages.x4.resolution) == (16, 64)
  assert stage_text_dim(config, "x4") == 16 and stage_text_dim(config, "if_I") == config.text.dim
  root = tmp_path / "all"  # a parent folder: names sorting against the cascade order
  root.mkdir()
  for link, target in (("a", sd_converted / "sd_x4_tiny"), ("b", if_converted / "if_II")):
    os.symlink(target, root / link)
  os.symlink(if_converted / "if_I", root / "c")
  assert run.read_config(str(root)).stage_order == ("if_I", "if_II", "x4")
  alone = run.read_config(str(sd_converted / "sd_v1_tiny"))
  assert alone.stage_order == ("sd",) and alone.stages.sd.resolution == 16


def test_clip_encoder_penultimate_layer_and_one_trace(sd_converted):
  """A stage whose text_encoder.penultimate is set gets the tower's penultimate layer
  (transformers' final_layer_norm(hidden_states[-2]) in the fixture's reference); the
  encoder's jitted function traces once per shape."""
  from imagen_jax.cascade import text as text_lib  # pylint: disable=import-outside-toplevel

  folder = str(sd_converted / "sd_v2_tiny")
  config = run.read_config(folder)
  config.stages.sd.text_encoder.penultimate = True
  encoder = text_lib.load_encoders(config)["sd"]
  ref = np.load(os.path.join(FIXTURES, "sd_v2_tiny", "reference.npz"))
  got = np.asarray(encoder.encode_tokens(ref["text_ids"]))
  err = np.abs(got - ref["text_hidden_skip1"]).max() / np.abs(ref["text_hidden_skip1"]).max()
  assert err < 1e-4, err
  emb, mask = encoder.encode(["a cat", ""], encoder.max_length)
  encoder.encode(["dog", "b"], encoder.max_length)
  assert emb.shape == (2, 7, 16) and mask.tolist()[1] == [True, True] + [False] * 5
  assert encoder.trace_count == 1


def reference_clip_states(folder, prompts):
  """(cond [P, L, D], uncond [L, D]): transformers' tokenizer padded to its
  model_max_length, the converted tower applied without a mask (as diffusers' SD)."""
  stage = sd.read_converted_config(folder)
  tower = sd.converted_modules(stage)["text_encoder"]
  _, params = run.read_sd_stage(folder)
  tok = load_tokenizer(os.path.join(folder, "tokenizer"))
  ids = tok(
    list(prompts) + [""],
    padding="max_length",
    max_length=tok.model_max_length,
    truncation=True,
    return_tensors="np",
  )["input_ids"]
  states = np.asarray(tower.apply({"params": params["text_encoder"]}, ids))
  return states[:-1], states[-1]


def direct(stage, params, cond, uncond, settings, rng, lowres=None):
  """``stage.sample`` on [uncond; cond] rows with the cascade's keys for stage k, batch 0."""
  rng_aug, rng_sample = jax.random.split(rng)
  b = len(cond)
  text = jnp.concatenate([jnp.broadcast_to(uncond, cond.shape), cond])
  args = {"params": params, "text_emb": text}
  if lowres is not None:
    prev = jnp.broadcast_to(lowres, (b,) + lowres.shape)
    args.update(guidance_lib.cfg_batch(stage.lowres_inputs(prev, settings, rng_aug)))
  return np.asarray(to_uint8(jnp.clip(stage.sample(args, settings, b, rng_sample), -1.0, 1.0)))


def test_cascade_latent_stages_equal_the_stage_on_clip_states(sd_converted):
  """SD text-to-image, and the x4 upscaler started on a given low-res image, through the
  Cascade give the images of ``stage.sample`` on the same CLIP rows and keys."""
  v1, x4 = str(sd_converted / "sd_v1_tiny"), str(sd_converted / "sd_x4_tiny")
  cascade = Cascade.from_workdir(f"{v1},{x4}", mesh=None)
  assert all(isinstance(e, CLIPEncoder) for e in cascade.text_encoders.values())
  prompts = ["a red cat", "blue"]
  rng = jax.random.key(3)
  out = cascade.sample(prompts, rng, steps=2, guidance=7.5)
  assert out.images["sd"].shape == (2, 16, 16, 3) and out.final.shape == (2, 64, 64, 3)
  stage = cascade.stages["sd"]
  cond, uncond = reference_clip_states(v1, prompts)
  settings = stage.sample_settings(stage.config.sample, steps=2, guidance=7.5)
  _, params = run.read_sd_stage(v1)
  unet_vae = {"unet": params["unet"], "vae": params["vae"]}
  key = jax.random.fold_in(jax.random.fold_in(rng, 0), 0)
  expected = direct(stage, unet_vae, cond, uncond, settings, key)
  assert np.abs(out.images["sd"].astype(int) - expected).max() <= 1
  # The upscaler alone from a user's low-res image (--start_stage x4 --lowres_image).
  small = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  out = cascade.sample(
    prompts[:1], rng, steps=2, guidance=7.5, start_stage="x4", lowres_image=small
  )
  stage = cascade.stages["x4"]
  cond, uncond = reference_clip_states(x4, prompts[:1])
  settings = stage.sample_settings(stage.config.sample, steps=2, guidance=7.5)
  _, params = run.read_sd_stage(x4)
  key = jax.random.fold_in(jax.random.fold_in(rng, 1), 0)
  lowres = jnp.asarray(small, jnp.float32) / 127.5 - 1.0
  expected = direct(stage, {"unet": params["unet"], "vae": params["vae"]}, cond, uncond,
                    settings, key, lowres)  # fmt: skip
  assert np.abs(out.final.astype(int) - expected).max() <= 1


def test_offloaded_cascade_samples_the_same_images(sd_converted, monkeypatch):
  """offload "text" and "stages" (sample.py --offload) give the images of the resident
  cascade; the encoders are on the devices only while they encode (the stages then in
  host memory), a stage's params only for its turn with "stages"."""
  workdir = f"{sd_converted}/sd_v1_tiny,{sd_converted}/sd_x4_tiny"
  prompts, rng = ["a red cat", "blue"], jax.random.key(3)
  expected = Cascade.from_workdir(workdir, mesh=None).sample(prompts, rng, steps=2, guidance=7.5)
  for mode in ("text", "stages"):
    cascade = Cascade.from_workdir(workdir, mesh=None, offload=mode)
    encoders = list({id(e): e for e in cascade.text_encoders.values()}.values())
    assert len(encoders) == 2 and all(offload.on_host(e.params) for e in encoders)
    assert all(offload.on_host(p) for p in cascade.params.values())
    seen = []

    def encode(self, prompts, max_length, _orig=CLIPEncoder.encode, cascade=cascade, seen=seen):
      stages = {n: offload.on_host(p) for n, p in cascade.params.items()}
      seen.append(("encode", offload.on_host(self.params), stages))
      return _orig(self, prompts, max_length)

    def sample_fn(self, args, *a, _orig=LatentStage.sample, cascade=cascade, seen=seen,
                  encoders=encoders):  # fmt: skip
      stages = {n: offload.on_host(p) for n, p in cascade.params.items()}
      seen.append((self.name, [offload.on_host(e.params) for e in encoders], stages))
      assert not offload.on_host(args["params"])
      return _orig(self, args, *a)

    monkeypatch.setattr(CLIPEncoder, "encode", encode)
    assert {type(s) for s in cascade.stages.values()} == {LatentStage}
    monkeypatch.setattr(LatentStage, "sample", sample_fn)
    out = cascade.sample(prompts, rng, steps=2, guidance=7.5)
    monkeypatch.undo()
    for name in ("sd", "x4"):
      np.testing.assert_array_equal(out.images[name], expected.images[name])
    host = {"sd": True, "x4": True}
    assert [s for s in seen if s[0] == "encode"] == [("encode", False, host)] * 4
    for name in ("sd", "x4"):
      (row,) = [s for s in seen if s[0] == name]
      assert row[1] == [True, True]  # both encoders back in host memory
      assert row[2] == ({"sd": False, "x4": False} if mode == "text" else {**host, name: False})
    assert all(offload.on_host(e.params) for e in encoders)
    assert all(offload.on_host(p) == (mode == "stages") for p in cascade.params.values())
  with pytest.raises(ValueError, match="offload must be one of none, text, stages"):
    Cascade.from_workdir(workdir, mesh=None, offload="all")


def test_sample_py_if_to_x4_encodes_once_per_encoder(
  if_converted, sd_converted, tmp_path, monkeypatch
):
  """IF-I → IF-II → x4 through sample.py --offload text: 64px images; the T5 and the CLIP
  tower each encode the prompts once and the empty prompt once, at their own lengths,
  on the devices (in host memory otherwise: test_offloaded_cascade_samples_the_same_images)."""
  calls = collections.defaultdict(list)
  for cls in (TextEncoder, CLIPEncoder):

    def counted(self, prompts, max_length, _orig=cls.encode):
      assert not offload.on_host(self.params)
      calls[type(self).__name__].append((tuple(prompts), max_length))
      return _orig(self, prompts, max_length)

    monkeypatch.setattr(cls, "encode", counted)
  out = tmp_path / "o"
  argv = ["--workdir", if_x4(if_converted, sd_converted), "--steps", "2,2,2", "--offload", "text"]
  argv += ["--prompt", "a photo of a corgi", "--prompt", "a cat", "--out", str(out)]
  assert sample.main(argv) == 0
  image = np.asarray(Image.open(out / "001_00.png"))
  assert image.shape == (64, 64, 3) and image.std() > 0
  assert os.path.isfile(out / "grid_x4.png") and os.path.isfile(out / "grid.png")
  prompts = ("a photo of a corgi", "a cat")
  t5_len = run.read_config(str(if_converted / "if_I")).text.max_length
  assert calls["TextEncoder"] == [(prompts, t5_len), (("",), t5_len)]
  assert calls["CLIPEncoder"] == [(prompts, 7), (("",), 7)]


@pytest.mark.parametrize("samplers", ["dpmpp_2m,euler", "heun,ddpm"])
def test_sample_py_every_sampler_on_latent_stages(sd_converted, tmp_path, samplers):
  workdir = f"{sd_converted}/sd_v1_tiny,{sd_converted}/sd_x4_tiny"
  out = tmp_path / "o"
  argv = ["--workdir", workdir, "--steps", "2,2", "--sampler", samplers, "--guidance", "5,off"]
  assert sample.main(argv + ["--prompt", "a dog", "--out", str(out)]) == 0
  image = np.asarray(Image.open(out / "000_00.png"))
  assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0


def test_sample_py_inpaints_with_a_latent_stage(sd_converted, tmp_path):
  """--init_image with --mask on SD runs the edit plan through the latent stage (its VAE
  encodes the image, the mask is pooled to the latent grid; the stage's inpainting
  itself is checked in test_stages_latent.py) and writes the image."""
  rng = np.random.default_rng(2)
  Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "in.png")
  mask = np.zeros((16, 16), np.uint8)
  mask[8:, 8:] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  out = tmp_path / "o"
  argv = ["--workdir", str(sd_converted / "sd_v1_tiny"), "--steps", "2", "--prompt", "a dog"]
  argv += ["--init_image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png")]
  assert sample.main(argv + ["--out", str(out)]) == 0
  assert np.asarray(Image.open(out / "000_00.png")).shape == (16, 16, 3)


def test_sd_folder_without_tokenizer_is_one_line_exit_2(sd_converted, tmp_path, capsys):
  folder = tmp_path / "sd"
  shutil.copytree(sd_converted / "sd_v1_tiny", folder)
  shutil.rmtree(folder / "tokenizer")
  argv = ["--workdir", str(folder), "--prompt", "a dog", "--out", str(tmp_path / "o")]
  assert sample.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "has no tokenizer/" in err, err
  assert not os.path.exists(tmp_path / "o")
  argv = ["--workdir", str(sd_converted / "sd_v1_tiny"), "--t5", "t5_dir", "--prompt", "a dog"]
  assert sample.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "no stage of this cascade takes T5" in err, err
