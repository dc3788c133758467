"""The stage interface: both kinds build from one schema, train and validate settings."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from imagen_jax import config as config_lib
from imagen_jax import run as run_lib
from imagen_jax.convert import deepfloyd_if, if_config
from imagen_jax.diffusion import losses, schedules
from imagen_jax.stages import ContinuousStage, DiscreteStage, build_stage

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def if_stage_config(name="if_stage1"):
  """The converted IF stage-I fixture's config in the common stage schema."""
  folder = if_config.read_if_folder(os.path.join(FIXTURES, name))
  stage = deepfloyd_if.build_stage_config(folder)
  return ml_collections.ConfigDict(run_lib.normalize_converted_stage(stage.to_dict()))


def test_vb_term_vanishes_at_the_true_posterior():
  ac = schedules.alphas_cumprod(schedules.betas_squaredcos_cap_v2(1000))
  rng = np.random.default_rng(0)
  x0 = np.tanh(rng.standard_normal((3, 4, 4, 3))).astype(np.float32)
  eps = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.array([5, 400, 999])
  abar = ac[t][:, None, None, None]
  x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
  # v = -1 puts the model's variance at the posterior's (log β̃_t); ε̂ = ε gives
  # the posterior mean: the KL is zero.
  vb = losses.learned_range_vb(eps, -np.ones_like(x0), x0, x_t, t, ac)
  np.testing.assert_allclose(vb, 0.0, atol=1e-4)
  # v = +1 (variance β_t) is off the posterior where β_t and β̃_t differ (small t).
  off = losses.learned_range_vb(eps, np.ones_like(x0), x0, x_t, t, ac)
  assert off[0] > 1e-3 and off[0] > 10 * abs(float(vb[0])) + 1e-3
  # At t = 0 it is the decoder's NLL: positive, finite.
  nll = losses.learned_range_vb(eps, np.zeros_like(x0), x0, x_t, np.zeros(3, int), ac)
  assert np.isfinite(nll).all() and (np.asarray(nll) > 0).all()


def test_kinds_from_one_schema():
  stage = build_stage(if_stage_config())
  assert isinstance(stage, DiscreteStage) and stage.kind == "discrete"
  assert stage.variance == "learned_range" and not stage.use_text_mask
  s = stage.sample_settings(stage.config.sample, steps=4, guidance="off")
  assert s.timesteps == (750, 500, 250, 0) and not s.guided
  s = stage.sample_settings(stage.config.sample)
  assert s.steps == 100 and s.guidance == 7.0 and s.max_value == 1.5
  legacy = if_stage_config()
  legacy.diffusion.kind = "if_ddpm"
  assert isinstance(build_stage(legacy), DiscreteStage)


def test_if_sr_noise_level_is_an_integer_level_in_range():
  stage = build_stage(if_stage_config("if_stage2"))
  assert stage.is_sr
  assert stage.sample_settings(dict(stage.config.sample, noise_level=20.0)).aug_level == 20
  with pytest.raises(ValueError, match="noise_level must be an integer level, got 0.5"):
    stage.sample_settings(dict(stage.config.sample, noise_level=0.5))
  with pytest.raises(ValueError, match="noise_level must be in"):
    stage.sample_settings(dict(stage.config.sample, noise_level=-1))


@pytest.mark.parametrize(
  "override, message",
  [
    (dict(sampler="euler_x"), "sampler 'euler_x'"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(guidance=float("nan")), "guidance must be a finite number"),
    (dict(guidance=-2), "guidance must be a finite number"),
  ],
)
def test_bad_settings_name_the_stage(override, message):
  stage = build_stage(if_stage_config())
  with pytest.raises(ValueError, match=message):
    stage.sample_settings(stage.config.sample, **override)
  bad = if_stage_config()
  bad.diffusion.high_noise_share = 0.3
  with pytest.raises(ValueError, match="high_noise_share is a continuous-time setting"):
    build_stage(bad)
  bad = if_stage_config()
  bad.diffusion.kind = "flow"
  with pytest.raises(ValueError, match="diffusion.kind='flow'"):
    build_stage(bad)


def test_if_stage_fine_tunes():
  """IF's objective (ε MSE + vb) on one batch: Adam steps lower the loss."""
  stage = build_stage(if_stage_config())
  params = jax.tree.map(jnp.asarray, deepfloyd_if.load_unet(os.path.join(FIXTURES, "if_stage1"))[1])
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(np.tanh(rng.standard_normal((4, 16, 16, 3))), jnp.float32)
  text = jnp.asarray(rng.standard_normal((4, 6, 40)), jnp.float32)
  mask = jnp.ones((4, 6), bool)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(
      lambda p: stage.loss(p, x0, text, mask, jax.random.PRNGKey(0)).mean()
    )(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  curve = []
  for _ in range(12):
    params, opt_state, loss = step(params, opt_state)
    curve.append(float(loss))
  assert np.isfinite(curve).all()
  assert curve[-1] < 0.7 * curve[0], curve


def test_high_noise_share_of_training_t():
  from imagen_jax.stages.continuous import focus_high_noise  # pylint: disable=g-import-not-at-top

  t = jnp.linspace(0.0, 1.0, 20001)[:-1]
  assert focus_high_noise(t, 0.9, 0.0) is t  # off: uniform t untouched
  f = np.asarray(focus_high_noise(t, 0.9, 0.3))
  assert (np.diff(f) >= 0).all() and f.min() == 0.0 and f.max() < 1.0
  # 10% of uniform t lies above 0.9; the extra 30% share brings it to 37%, spread
  # evenly there, and the rest stays uniform below.
  np.testing.assert_allclose((f >= 0.9).mean(), 0.37, atol=1e-3)
  np.testing.assert_allclose((f >= 0.95).mean(), 0.185, atol=1e-3)
  np.testing.assert_allclose((f < 0.45).mean(), 0.315, atol=1e-3)
  config = config_lib.load_config(
    os.path.join(os.path.dirname(FIXTURES), "..", "configs", "demo.py:tiny")
  )
  config.stages.base.diffusion.high_noise_share = 1.0
  with pytest.raises(ValueError, match="stage base: diffusion.high_noise_share"):
    build_stage(config.stages.base, text_dim=config.text.dim)
  config.stages.base.diffusion.high_noise_share = 0.5
  stage = build_stage(config.stages.base, text_dim=config.text.dim)
  t = stage.loss_noise(jax.random.PRNGKey(0), jnp.zeros((64, 16, 16, 3)))["t"]
  assert 0.5 < float((t >= 0.9).mean()) < 0.6  # 0.1·0.5 + 0.5 = 55%


def test_continuous_stage_loss_shapes():
  config = config_lib.load_config(
    os.path.join(os.path.dirname(FIXTURES), "..", "configs", "demo.py:tiny")
  )
  stage = build_stage(config.stages.sr, text_dim=config.text.dim)
  assert isinstance(stage, ContinuousStage) and stage.is_sr
  params = jax.tree.map(jnp.asarray, stage.init(jax.random.PRNGKey(0)))
  x0 = jnp.zeros((2, 32, 32, 3))
  loss = stage.loss(
    params, x0, jnp.zeros((2, 5, 32)), jnp.ones((2, 5), bool), jax.random.PRNGKey(1)
  )
  assert loss.shape == (2,) and np.isfinite(loss).all()


def test_stage_sampling_compiles_once_per_sampler():
  """Stages turn settings into a spec and traced options: steps and guidance never recompile."""
  from imagen_jax.diffusion import sampling  # pylint: disable=g-import-not-at-top

  stage = build_stage(if_stage_config())
  params = jax.tree.map(jnp.asarray, deepfloyd_if.load_unet(os.path.join(FIXTURES, "if_stage1"))[1])
  rng = np.random.default_rng(2)
  args = {
    "params": params,
    "text_emb": jnp.asarray(rng.standard_normal((4, 6, 40)), jnp.float32),
    "text_mask": jnp.ones((4, 6), bool),
  }
  # One sampler here (each compiles the UNet); tests/test_diffusion_samplers.py
  # checks every sampler on both schedule kinds.
  for sampler in ("ddpm",):
    before = sampling._sample_jit._cache_size()  # pylint: disable=protected-access
    outs = []
    for steps, guidance in ((2, 3.0), (3, 5.0)):
      s = stage.sample_settings(
        stage.config.sample, steps=steps, guidance=guidance, sampler=sampler
      )
      outs.append(stage.sample(args, s, 2, jax.random.PRNGKey(0)))
      assert outs[-1].shape == (2,) + stage.image_shape and np.isfinite(outs[-1]).all()
    assert sampling._sample_jit._cache_size() == before + 1, sampler  # pylint: disable=protected-access
    assert not np.allclose(outs[0], outs[1])
