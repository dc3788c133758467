"""Cascade sampling on a tiny two-stage cascade (16 → 32 px) with random params.

Also the helpers other tests import: ``tiny_config`` and ``tiny_cascade_parts``.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

from imagen_jax import cascade as cascade_lib
from imagen_jax import config as config_lib
from imagen_jax import parallel
from imagen_jax.stages import build_stage
from imagen_jax.text import TextEncoder

TEXT_DIM = 32
_UNET = dict(
  channels=(16, 32),
  num_res_blocks=1,
  head_dim=8,
  norm_groups=4,
  text_dim=TEXT_DIM,
  text_pool_heads=2,
  attention=("none", "self_cross"),
)
# Four prompts: every test below samples batches of 4, so the fixture's cascade
# compiles each stage once (plus base without guidance, plus the sharded one).
PROMPTS = [
  "a red circle in the top left",
  "a blue square in the center",
  "a green triangle in the bottom right",
  "a white circle in the top right",
]


def tiny_config():
  """A two-stage cascade config: base 16 px, SR 16 → 32 px, tiny T5, 3 steps each."""
  config = config_lib.base_config()
  config.text.dim = TEXT_DIM
  config.text.max_length = 48  # ByT5: one token per byte
  config.text.dtype = "float32"
  config.text.seed = 0
  config.text.random = dict(d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
  base = config_lib.stage_config("base", 16, dict(_UNET))
  sr = config_lib.stage_config(
    "sr",
    32,
    dict(
      _UNET,
      lowres_cond=True,
      aug_embed=True,
      efficient=True,
      mid_block=False,
      attention=("none", "cross"),
      mid_attention="none",
    ),
    lowres_resolution=16,
  )
  for stage, guidance in ((base, 3.0), (sr, 2.0)):
    stage.sample.steps = 3
    stage.sample.guidance = guidance
    config_lib.add_stage(config, stage)
  config.mesh.shape = {"data": -1}
  config.mesh.strategy = "dp"
  return config


def random_params(stage, seed):
  """Random params of a stage's shapes, drawn with numpy (no init compile).

  Fan-in scaled normals for kernels, ones for norm scales, small normals for
  biases; unlike a real init the output layer is not zero, so the images
  depend on the text and the guidance scale.
  """
  rng = np.random.default_rng(seed)
  abstract = nn.unbox(jax.eval_shape(stage.init, jax.random.key(0)))

  def draw(path, a):
    name = jax.tree_util.keystr(path)
    if a.ndim == 1:
      base = 1.0 if "scale" in name else 0.0
      return (base + 0.02 * rng.standard_normal(a.shape)).astype(a.dtype)
    fan_in = int(np.prod(a.shape[:-1]))
    return (rng.standard_normal(a.shape) / np.sqrt(fan_in)).astype(a.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def tiny_cascade_parts(config=None, seed=0):
  """(config, text encoder, {stage: random params}) for a tiny cascade."""
  config = config or tiny_config()
  encoder = TextEncoder.random_init(dict(config.text.random), seed=config.text.seed)
  params = {
    name: random_params(build_stage(config.stages[name], text_dim=TEXT_DIM), seed + i)
    for i, name in enumerate(config.stage_order)
  }
  return config, encoder, params


@pytest.fixture(scope="module")
def parts():
  return tiny_cascade_parts()


@pytest.fixture(scope="module")
def cascade(parts):
  config, encoder, params = parts
  return cascade_lib.Cascade(config, params, encoder)


def test_shapes_dtypes_and_timings(cascade):
  out = cascade.sample(PROMPTS[:2], jax.random.key(0), num_per_prompt=2, progress=False)
  assert list(out.images) == ["base", "sr"]
  assert out.images["base"].shape == (4, 16, 16, 3)
  assert out.images["sr"].shape == (4, 32, 32, 3)
  assert out.final.dtype == np.uint8 and out.final is out.images["sr"]
  assert out.timings["base"].calls == 1 and out.timings["base"].compile_s > 0
  assert out.settings["sr"].guidance == 2.0 and out.settings["sr"].steps == 3
  assert "compile" in cascade_lib.timings_table(out)


def test_deterministic_and_guidance_changes_images(cascade):
  a = cascade.sample(PROMPTS, jax.random.key(1), progress=False)
  b = cascade.sample(PROMPTS, jax.random.key(1), progress=False)
  np.testing.assert_array_equal(a.final, b.final)
  off = cascade.sample(PROMPTS, jax.random.key(1), guidance=[1.0, None], progress=False)
  assert not off.settings["base"].guided and off.settings["sr"].guidance == 2.0
  assert off.images["base"].shape == (4, 16, 16, 3)
  assert not np.array_equal(off.images["base"], a.images["base"])
  other = cascade.sample(PROMPTS, jax.random.key(2), progress=False)
  assert not np.array_equal(other.final, a.final)


def test_no_recompile_for_another_guidance_scale(cascade):
  cascade.sample(PROMPTS, jax.random.key(2), guidance=[4.0, 3.0], progress=False)
  out = cascade.sample(PROMPTS, jax.random.key(3), guidance=[7.0, 5.0], progress=False)
  assert out.settings["base"].guidance == 7.0
  assert [t.compiles for t in out.timings.values()] == [0, 0]


def test_batches_compile_once(cascade):
  out = cascade.sample(
    PROMPTS[:3], jax.random.key(4), num_per_prompt=2, batch_size=4, progress=False
  )
  assert out.final.shape == (6, 32, 32, 3)  # batches of 4 + 2 (padded to 4)
  assert out.timings["base"].calls == 2
  assert [t.compiles for t in out.timings.values()] == [0, 0]


def test_noise_level_reaches_the_super_resolution_stage(cascade):
  a = cascade.sample(PROMPTS, jax.random.key(6), progress=False)
  b = cascade.sample(PROMPTS, jax.random.key(6), noise_level=0.6, progress=False)
  c = cascade.sample(PROMPTS, jax.random.key(6), noise_level=[None, 0.6], progress=False)
  assert a.settings["sr"].aug_level != 0.6
  assert b.settings["sr"].aug_level == c.settings["sr"].aug_level == 0.6
  np.testing.assert_array_equal(a.images["base"], b.images["base"])
  assert not np.array_equal(a.images["sr"], b.images["sr"])
  np.testing.assert_array_equal(b.images["sr"], c.images["sr"])


@pytest.mark.parametrize("strategy, shape", [("dp", {"data": 8}), ("fsdp", {"data": 2, "fsdp": 4})])
def test_sharded_matches_unsharded(parts, cascade, strategy, shape):
  assert jax.device_count() == 8
  config, encoder, params = parts
  mesh = parallel.make_mesh({"shape": shape})
  sharded = cascade_lib.Cascade(config, params, encoder, mesh, parallel.logical_rules(strategy))
  assert sharded.num_shards == 8
  ref = cascade.sample(PROMPTS, jax.random.key(5), progress=False)
  # 4 images are padded to 8 rows and cut back; the noise of a row does not
  # depend on the batch size, so the images match the unsharded ones.
  out = sharded.sample(PROMPTS, jax.random.key(5), progress=False)
  for name in ref.images:
    diff = np.abs(ref.images[name].astype(int) - out.images[name].astype(int))
    assert diff.max() <= 2, name
    assert diff.mean() < 0.05, name


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(steps=[3]), "steps has 1 value but the cascade has 2 stages"),
    (dict(guidance=[1.0, 2.0, 3.0]), "guidance has 3 values"),
    (dict(steps={"nope": 3}), "unknown stages"),
    (dict(steps=[0, 3]), "steps must be >= 1"),
    (dict(noise_level=[0.1, 0.2]), "stage 'base' takes no low-resolution input"),
    (dict(noise_level=1.5), r"aug_level must be in \[0, 1\]"),
  ],
)
def test_bad_overrides(cascade, kwargs, match):
  with pytest.raises(ValueError, match=match):
    cascade.sample(PROMPTS, jax.random.key(0), progress=False, **kwargs)


def test_bad_prompts_and_stages(parts, cascade):
  with pytest.raises(ValueError, match="non-empty list"):
    cascade.sample([], jax.random.key(0))
  with pytest.raises(ValueError, match="non-empty list"):
    cascade.sample("a red circle in the center", jax.random.key(0))
  config, encoder, params = parts
  with pytest.raises(ValueError, match=r"no params for stages \['sr'\]"):
    cascade_lib.Cascade(config, {"base": params["base"]}, encoder)


def test_grid():
  images = np.full((5, 4, 4, 3), 200, np.uint8)
  grid = cascade_lib.make_grid(images, cols=3, pad=1, borders=[(0, 255, 0)] * 5)
  assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
  assert (grid[1:5, 1:5] == 200).all() and tuple(grid[0, 0]) == (0, 255, 0)
