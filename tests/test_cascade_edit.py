"""Editing through the cascade: samplers, image-to-image, inpainting, SR of a user's image,
negative prompts; and sample.py's flags for them."""

import numpy as np
import pytest
import jax
from PIL import Image

from imagen_jax import cascade as cascade_lib
from imagen_jax.stages import resize, to_float, to_uint8
from test_cascade import PROMPTS, tiny_cascade_parts
from test_sample_cli import make_run

import sample


@pytest.fixture(scope="module")
def cascade():
  config, encoder, params = tiny_cascade_parts()
  return cascade_lib.Cascade(config, params, encoder)


def _image(size, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_strength_zero_returns_the_image_and_one_is_text_to_image(cascade):
  image = _image(16)
  out = cascade.sample(
    PROMPTS, jax.random.key(0), init_image=image, strength=0.0, start_stage="base", progress=False
  )
  assert (out.images["base"] == image).all()  # exactly, after the uint8 trip
  full = cascade.sample(PROMPTS, jax.random.key(0), init_image=image, strength=1.0, progress=False)
  plain = cascade.sample(PROMPTS, jax.random.key(0), progress=False)
  np.testing.assert_array_equal(full.final, plain.final)
  half = cascade.sample(PROMPTS, jax.random.key(0), init_image=image, strength=0.5, progress=False)
  assert not (half.images["base"] == plain.images["base"]).all()


def test_inpainting_keeps_the_unmasked_pixels_at_every_stage(cascade):
  image = _image(32, seed=1)
  mask = np.zeros((32, 32), np.uint8)
  mask[:16, :16] = 255  # regenerate the top-left quadrant
  out = cascade.sample(PROMPTS[:2], jax.random.key(1), init_image=image, mask=mask, progress=False)
  keep = mask == 0
  assert (out.final[:, keep] == image[keep]).all()
  assert not (out.final[:, ~keep] == image[~keep]).all()
  base_keep = keep[::2, ::2]
  # The base stage keeps the image resized to its resolution (rounding of a
  # resized float can differ by one level between the jitted and eager resize).
  small = np.asarray(to_uint8(resize(to_float(image)[None], 16))[0], np.int32)
  diff = np.abs(out.images["base"][:, base_keep].astype(np.int32) - small[base_keep])
  assert diff.max() <= 1, diff.max()


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler", "heun"])
def test_solvers_through_the_cascade(cascade, sampler):
  out = cascade.sample(
    PROMPTS, jax.random.key(2), sampler=[sampler, "ddim"], steps=[4, 2], progress=False
  )
  assert out.settings["base"].sampler == sampler and out.final.shape == (4, 32, 32, 3)
  assert len(np.unique(out.images["base"])) > 10


def test_super_resolve_a_users_image_and_negative_prompts(cascade):
  low = _image(16, seed=3)
  out = cascade.sample(
    PROMPTS[:2], jax.random.key(3), lowres_image=low, start_stage="sr", progress=False
  )
  assert list(out.images) == ["sr"] and out.final.shape == (2, 32, 32, 3)
  a = cascade.sample(PROMPTS[:2], jax.random.key(4), negative_prompt="a red circle", progress=False)
  b = cascade.sample(PROMPTS[:2], jax.random.key(4), progress=False)
  assert not (a.final == b.final).all()
  with pytest.raises(ValueError, match="one per prompt"):
    cascade.sample(PROMPTS[:2], jax.random.key(4), negative_prompt=["x", "y", "z"])


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(strength=1.5, init_image=np.zeros((16, 16, 3), np.uint8)), "strength must be in"),
    (dict(start_stage="sr2"), "not in the cascade"),
    (dict(start_stage="sr"), "needs a low-resolution image"),
    (dict(init_image=np.zeros((16, 12, 3), np.uint8)), "give a square image"),
    (dict(mask=np.zeros((16, 16), np.uint8)), "needs an init image"),
    (dict(sampler="euler_a"), "sampler 'euler_a'"),
  ],
)
def test_bad_edit_inputs(cascade, kwargs, message):
  with pytest.raises(ValueError, match=message):
    cascade.sample(PROMPTS[:1], jax.random.key(0), progress=False, **kwargs)


def test_sample_cli_edit_flags(tmp_path, capsys):
  run = tmp_path / "run"
  make_run(run)
  Image.fromarray(_image(24)).save(tmp_path / "init.png")
  mask = np.zeros((24, 24), np.uint8)
  mask[12:, 12:] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  Image.fromarray(_image(24)[:, :20]).save(tmp_path / "wide.png")
  (tmp_path / "bad.png").write_bytes(b"not an image")
  base = ["--workdir", str(run), "--prompt", "a red circle", "--steps", "2,2"]
  out = tmp_path / "out"
  assert (
    sample.main(
      base
      + [
        "--init_image",
        str(tmp_path / "init.png"),
        "--mask",
        str(tmp_path / "mask.png"),
        "--sampler",
        "dpmpp_2m,ddim",
        "--negative_prompt",
        "blue",
        "--out",
        str(out),
      ]
    )
    == 0
  )
  assert (out / "grid.png").exists()
  capsys.readouterr()
  for extra, needle in [
    (["--init_image", str(tmp_path / "wide.png")], "crop it to a square"),
    (["--init_image", str(tmp_path / "bad.png")], "cannot be read as an image"),
    (["--init_image", str(tmp_path / "nope.png")], "does not exist"),
    (["--init_image", str(tmp_path / "init.png"), "--strength", "2"], "--strength"),
    (["--start_stage", "up"], "--start_stage 'up' is not in the cascade"),
    (["--start_stage", "sr"], "--lowres_image"),
    (["--sampler", "ddim,warp"], "sampler 'warp'"),
    (["--guidance", "nan,1"], "guidance must be a finite number"),
    (["--out", str(tmp_path / "init.png")], "is a file"),
  ]:
    assert sample.main(base + extra) == 2, extra
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, (extra, err)
