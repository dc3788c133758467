"""UNet family: shapes and dtypes of every variant, logical names, bad input, scale."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import config as config_lib
from imagen_jax.models import UNet, UNetConfig, count_params, dummy_inputs, init_abstract
from imagen_jax.models import __main__ as models_cli

TINY = dict(
  channels=(16, 32), num_res_blocks=1, head_dim=8, norm_groups=4, text_dim=12, text_pool_heads=2
)

VARIANTS = {
  "base": dict(TINY, attention=("none", "self_cross")),
  "efficient": dict(
    TINY,
    channels=(16, 32, 32),
    num_res_blocks=(1, 2, 1),
    attention=("none", "none", "self_cross"),
    efficient=True,
    mid_block=False,
    skip_scale=2**-0.5,
    resample="avgpool",
  ),
  "no_self_attention": dict(
    TINY, attention=("none", "cross"), mid_attention="cross", efficient=True, skip_scale=2**-0.5
  ),
  "sr": dict(
    TINY,
    attention=("none", "self_cross"),
    lowres_cond=True,
    aug_embed=True,
    efficient=True,
    text_proj_dim=16,
    text_pool_projected=True,
  ),
  "if_like": dict(
    TINY,
    attention=("none", "self_cross"),
    resample="resblock",
    act="gelu",
    time_act="gelu",
    resblock_time_act=False,
    text_proj_dim=16,
    out_channels=6,
    text_norm="group_norm",
    lowres_cond=True,
    aug_embed=True,
  ),
  "patch2": dict(TINY, attention=("none", "self"), patch_size=2, text_pool="mean", num_heads=1),
}


def _apply(model):
  """Jitted apply: one compile instead of op-by-op dispatch of every layer."""
  return jax.jit(model.apply)


def _run(cfg, res=16, batch=2, seed=0):
  model = UNet(cfg)
  inputs = dummy_inputs(cfg, batch, res, text_len=5)
  rng = np.random.default_rng(seed)
  inputs = {
    k: (jnp.asarray(rng.normal(size=v.shape), v.dtype) if v.dtype != jnp.bool_ else v)
    for k, v in inputs.items()
  }
  variables = model.init(jax.random.PRNGKey(seed), **inputs)
  return model, variables, inputs


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_output_shape_and_dtype(name):
  cfg = UNetConfig(**VARIANTS[name])
  model, variables, inputs = _run(cfg)
  out = _apply(model)(variables, **inputs)
  assert out.shape == (2, 16, 16, cfg.out_channels)
  assert out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("name", ["base", "sr"])
def test_bf16_compute_fp32_params(name):
  cfg = UNetConfig(**VARIANTS[name], dtype="bfloat16", param_dtype="float32")
  model, variables, inputs = _run(cfg)
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(nn.unbox(variables["params"]))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  out = _apply(model)(variables, **inputs)
  assert out.dtype == jnp.bfloat16


def test_output_depends_on_every_input():
  """Perturbing x, t, text, lowres or the noise level changes the output."""
  cfg = UNetConfig(**VARIANTS["sr"])
  model, variables, inputs = _run(cfg)
  # Zero-initialized output layers make a fresh UNet constant; randomize them.
  params = jax.tree_util.tree_map(
    lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype),
    nn.unbox(variables["params"]),
  )
  apply = _apply(model)
  base = apply({"params": params}, **inputs)
  for key in ("x", "t", "text_emb", "lowres", "noise_level"):
    changed = dict(inputs, **{key: inputs[key] + 1.0})
    assert not np.allclose(base, apply({"params": params}, **changed)), key


def test_text_mask_hides_padding():
  cfg = UNetConfig(**VARIANTS["base"])
  model, variables, inputs = _run(cfg)
  params = jax.tree_util.tree_map(
    lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape, p.dtype),
    nn.unbox(variables["params"]),
  )
  mask = jnp.array([[1, 1, 1, 0, 0]] * 2, bool)
  apply = _apply(model)
  out1 = apply({"params": params}, **dict(inputs, text_mask=mask))
  noisy_pad = inputs["text_emb"].at[:, 3:].add(5.0)
  out2 = apply({"params": params}, **dict(inputs, text_mask=mask, text_emb=noisy_pad))
  np.testing.assert_allclose(out1, out2, atol=1e-5)
  out3 = apply({"params": params}, **dict(inputs, text_emb=noisy_pad))  # no mask
  assert not np.allclose(out1, out3, atol=1e-3)


def test_remat_matches_plain():
  cfg = UNetConfig(**VARIANTS["base"])
  model, variables, inputs = _run(cfg)
  remat_model = UNet(UNetConfig(**VARIANTS["base"], remat=True))
  np.testing.assert_allclose(
    _apply(model)(variables, **inputs), _apply(remat_model)(variables, **inputs), atol=1e-6
  )


@pytest.mark.parametrize("name", ["base", "if_like", "efficient"])
def test_every_param_has_logical_names(name):
  cfg = UNetConfig(**VARIANTS[name])
  abstract = init_abstract(UNet(cfg), batch=1, resolution=16)
  leaves = jax.tree_util.tree_leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), leaf
    assert len(leaf.names) == leaf.value.ndim


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(x=jnp.zeros((2, 16, 16, 4))), r"\[B, H, W, 3\].*\(2, 16, 16, 4\)"),
    (dict(x=jnp.zeros((2, 10, 10, 3))), r"10×10 must be divisible by 4"),
    (dict(text_emb=jnp.zeros((2, 5, 7))), r"\[B, L, 12\].*\(2, 5, 7\)"),
    (dict(lowres=None), r"needs lowres"),
    (dict(noise_level=None), r"needs noise_level"),
  ],
)
def test_bad_inputs(change, match):
  cfg = UNetConfig(**VARIANTS["sr"])
  model, variables, inputs = _run(cfg)
  with pytest.raises(ValueError, match=match):
    _apply(model)(variables, **dict(inputs, **change))


def test_bad_config():
  with pytest.raises(ValueError, match="unknown attention kind 'selfie'"):
    UNetConfig(**dict(TINY, attention=("none", "selfie")))
  with pytest.raises(ValueError, match="2 levels"):
    UNetConfig(**dict(TINY, num_res_blocks=(1, 2, 3)))
  with pytest.raises(ValueError, match=r"unknown model config keys \['widht'\]"):
    UNetConfig.from_config(dict(TINY, widht=3))


@pytest.mark.parametrize(
  "path, target",
  [("configs/base64.py", 2.0e9), ("configs/sr256.py", 600e6), ("configs/sr1024.py", 400e6)],
)
def test_paper_scale_param_counts(path, target):
  config = config_lib.load_config(path)
  (name,) = config.stage_order
  stage = config.stages[name]
  params = init_abstract(UNet(UNetConfig.from_config(stage.model)), resolution=stage.resolution)
  n = count_params(params)
  assert abs(n / target - 1) <= 0.10, (path, n)


def test_cli_prints_table_and_total(capsys):
  models_cli.main(["--config", "configs/sr1024.py"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith("stage sr1024: 1024×1024")
  assert any("down4 attention" in line for line in lines)
  total = int(lines[-1].removeprefix("total params: "))
  assert 360e6 <= total <= 440e6


@pytest.mark.parametrize(
  "shape, groups", [((2, 8, 8, 32), 8), ((3, 5, 40), 4), ((2, 4, 4, 4, 16), 16)]
)
def test_group_norm_matches_flax(shape, groups):
  """Our GroupNorm (per-channel sums first) is flax's GroupNorm, values and gradients."""
  from imagen_jax.models.layers import GroupNorm  # pylint: disable=import-outside-toplevel

  x = jax.random.normal(jax.random.PRNGKey(0), shape) * 3.0 + 1.0
  ours = GroupNorm(num_groups=groups, epsilon=1e-5)
  params = nn.unbox(ours.init(jax.random.PRNGKey(1), x))
  params = jax.tree.map(
    lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(2), a.shape), params
  )
  ref = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=jnp.float32)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=5e-6)
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)
  with pytest.raises(ValueError, match="do not split into"):
    GroupNorm(num_groups=3).init(jax.random.PRNGKey(0), x)


def test_paper_cascade_config_composes_the_stage_files():
  cascade = config_lib.load_config("configs/imagen.py")
  assert cascade.stage_order == ("base64", "sr256", "sr1024")
  for name in cascade.stage_order:
    (alone,) = config_lib.load_config(f"configs/{name}.py").stages.values()
    assert cascade.stages[name].to_dict() == alone.to_dict(), name
