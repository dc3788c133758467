"""The latent stage (Stable Diffusion, the x4 upscaler) end to end against diffusers.

The tiny pipeline folders of tools/make_sd_fixtures.py are converted, read back
through ``run.read_sd_stage`` and sampled through ``stages.build_stage``; the
references are diffusers' pipeline runs (2 DDIM steps, guidance 7.5) on the same
starting latents (and, for the upscaler, the same low-res noise).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import run
from imagen_jax.diffusion import sampling
from imagen_jax.stages import LatentStage, build_stage

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NAMES = ("sd_v1_tiny", "sd_v2_tiny", "sd_x4_tiny")
TOL = 1e-4  # relative to the output's scale, float32 (the repository's parity bar)


def close(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  err = np.abs(actual - expected).max() / np.abs(expected).max()
  assert err < TOL, err


@pytest.fixture(scope="module")
def converted(sd_converted):
  """name → the converted folder (the session's, converted once)."""
  return {name: str(sd_converted / name) for name in NAMES}


def loaded(converted, name):
  """(stage at the references' size, stage params, reference) of a fixture."""
  config, params = run.read_sd_stage(converted[name])
  ref = np.load(os.path.join(FIXTURES, name, "reference.npz"))
  size = ref["pipe_latents"].shape[1]
  config.resolution = size * 2 ** (len(config.vae.block_out_channels) - 1)
  if config.get("lowres_resolution"):
    config.lowres_resolution = size
  stage = build_stage(config)
  return stage, {"unet": params["unet"], "vae": params["vae"]}, ref


def pipeline_args(stage, params, ref):
  """The sampler's args of the reference run: [negative; prompt] embeddings, the
  upscaler's low-res image noised with the pipeline's noise."""
  text = np.concatenate([ref["pipe_negative_embeds"], ref["pipe_prompt_embeds"]])
  args = {"params": params, "text_emb": jnp.asarray(text)}
  if stage.is_sr:
    level = jnp.full((1,), int(ref["pipe_noise_level"]), jnp.int32)
    lowres = stage.lowres_from(jnp.asarray(ref["pipe_lowres"]), level, ref["pipe_noise"])
    args.update(lowres=jnp.concatenate([lowres] * 2), noise_level=jnp.concatenate([level] * 2))
  return args


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_matches_diffusers(converted, name):
  """Latents and decoded image of the 2-step guided DDIM run match the pipeline's."""
  stage, params, ref = loaded(converted, name)
  assert isinstance(stage, LatentStage) and stage.is_sr == (name == "sd_x4_tiny")
  settings = stage.sample_settings(
    stage.config.sample, steps=int(ref["pipe_steps"]), guidance=float(ref["pipe_guidance_scale"])
  )
  assert settings.sampler == "ddim" and settings.timesteps == (501, 1)  # leading + offset 1
  args = pipeline_args(stage, params, ref)
  edit = {"noise": ref["pipe_latents"]}
  rng = jax.random.PRNGKey(0)
  close(stage.sample_latents(args, settings, 1, rng, edit), ref["pipe_out_latents"])
  image = stage.sample(args, settings, 1, rng, edit)
  assert image.shape == (1,) + stage.image_shape
  close(np.clip(np.asarray(image) / 2 + 0.5, 0, 1), ref["pipe_image"])


def test_upscaler_lowres_inputs_and_noise_level(converted):
  """The cascade's entry: a previous stage's image → noised low-res input at the level."""
  stage, _, _ = loaded(converted, "sd_x4_tiny")
  settings = stage.sample_settings(stage.config.sample)
  assert settings.aug_level == 100 and stage.max_noise_level == 350
  prev = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3), minval=-1, maxval=1)
  inputs = stage.lowres_inputs(prev, settings, jax.random.PRNGKey(2))
  assert inputs["lowres"].shape == (2, 4, 4, 3)
  np.testing.assert_array_equal(inputs["noise_level"], [100, 100])
  with pytest.raises(ValueError, match="noise_level"):
    stage.sample_settings(dict(stage.config.sample, noise_level=351))
  with pytest.raises(ValueError, match="noise_level must be an integer level, got 20.5"):
    stage.sample_settings(dict(stage.config.sample, noise_level=20.5))
  assert stage.sample_settings(dict(stage.config.sample, noise_level=20.0)).aug_level == 20


def test_one_compile_across_step_counts(converted):
  """Steps and guidance are traced: 2 then 3 steps at two scales compile once."""
  stage, params, ref = loaded(converted, "sd_v1_tiny")
  args = pipeline_args(stage, params, ref)
  before = sampling._sample_jit._cache_size()  # pylint: disable=protected-access
  outs = []
  for steps, guidance in ((2, 7.5), (3, 5.0)):
    settings = stage.sample_settings(stage.config.sample, steps=steps, guidance=guidance)
    outs.append(stage.sample(args, settings, 1, jax.random.PRNGKey(0)))
    assert np.isfinite(outs[-1]).all()
  assert sampling._sample_jit._cache_size() == before + 1  # pylint: disable=protected-access
  assert not np.allclose(outs[0], outs[1])


def test_img2img_and_inpainting_in_latent_space(converted):
  """Edits encode to latents; strength 0 and an all-keep mask give back the VAE's
  reconstruction, a full mask is text-to-image with the same key."""
  stage, params, ref = loaded(converted, "sd_v1_tiny")
  args = pipeline_args(stage, params, ref)
  settings = stage.sample_settings(stage.config.sample, steps=3, guidance=7.5)
  image = jax.random.uniform(jax.random.PRNGKey(3), (1, 8, 8, 3), minval=-1, maxval=1)
  recon = stage.decode(params, stage.encode(params, image))
  rng = jax.random.PRNGKey(4)
  same = stage.sample(args, settings, 1, rng, {"x_init": image, "strength": 0.0})
  np.testing.assert_allclose(same, recon, atol=1e-6)
  half = stage.sample(args, settings, 1, rng, {"x_init": image, "strength": 0.6})
  assert np.isfinite(half).all() and not np.allclose(half, recon, atol=1e-3)
  mask = np.zeros((1, 8, 8, 1), np.float32)
  keep = stage.sample(args, settings, 1, rng, {"known": image, "mask": mask})
  np.testing.assert_allclose(keep, recon, atol=1e-6)
  mask[:, :2, :2] = 1.0  # one latent pixel regenerated
  assert stage.latent_edit(params, {"mask": mask}, 1)["mask"].sum() == 1
  part = stage.sample(args, settings, 1, rng, {"known": image, "mask": mask})
  assert np.isfinite(part).all() and not np.allclose(part, recon, atol=1e-3)
  full = stage.sample(args, settings, 1, rng, {"known": image, "mask": np.ones_like(mask)})
  np.testing.assert_allclose(full, stage.sample(args, settings, 1, rng), atol=1e-5)


@pytest.mark.parametrize("name", ["sd_v2_tiny", "sd_x4_tiny"])
def test_train_step_gradients_only_reach_the_unet(converted, name):
  """A finite per-example loss; the frozen VAE gets zero gradient, the UNet not."""
  stage, params, ref = loaded(converted, name)
  x0 = jax.random.uniform(jax.random.PRNGKey(5), (2,) + stage.image_shape, minval=-1, maxval=1)
  text = jnp.asarray(np.concatenate([ref["pipe_prompt_embeds"]] * 2))
  loss_fn = lambda p: stage.loss(p, x0, text, None, jax.random.PRNGKey(6)).mean()  # noqa: E731
  loss, grads = jax.value_and_grad(loss_fn)(params)
  assert np.isfinite(loss) and loss > 0
  assert all(not np.any(g) for g in jax.tree.leaves(grads["vae"]))
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["unet"])) > 0
  assert stage.loss(params, x0, text, None, jax.random.PRNGKey(6)).shape == (2,)


def test_stage_config_and_bad_input(converted, tmp_path):
  config, _ = run.read_sd_stage(converted["sd_v2_tiny"])
  assert config.diffusion.kind == "latent" and config.diffusion.prediction == "v_prediction"
  assert config.resolution == 16 and config.sample.sampler == "ddim"
  stage = build_stage(config)
  assert stage.prediction == "v" and stage.latent_shape == (8, 8, 4)
  assert stage.text_encoder_spec == {"folder": config.source, "penultimate": False}
  with pytest.raises(ValueError, match="32-wide"):
    build_stage(config, text_dim=32)
  bad = config.copy_and_resolve_references()
  bad.resolution = 6
  with pytest.raises(ValueError, match="resolution 6"):
    build_stage(bad)
  with pytest.raises(ValueError, match="stable_diffusion"):
    run.read_sd_stage(str(tmp_path))
