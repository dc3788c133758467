"""The UNet family: Imagen's base UNet, the Efficient UNet, and DeepFloyd IF's UNets.

(Over 400 lines: one module for the whole UNet family (its config and validation,
embedding, the down/mid/up walk), so that Imagen's and IF's UNets stay one code
path; the blocks are in ``layers`` and ``text_layers``.)

One module, configured by ``UNetConfig`` (built from ``config.model``):

* Imagen base 64×64: ``efficient=False``, ResBlocks with scale-shift time
  conditioning, 'self_cross' attention (image self-attention whose keys/values
  also hold the projected text tokens) at the 32/16/8 levels, attention-pooled
  text added to the time embedding.
* Efficient UNet (Imagen §Efficient U-Net): ``efficient=True`` — per-level
  block counts, skips scaled by 1/√2 (``skip_scale``), downsampling BEFORE a
  level's blocks on the way down and upsampling AFTER them on the way up, one
  skip per level (the level's output, concatenated before the first up block
  of the same level) plus the stem's output joined after the last upsample by a
  full-resolution ResBlock ('final_res'); attention only at the lowest level
  ('cross' for the no-self-attention 256→1024 variant).
* DeepFloyd IF (diffusers UNet2DConditionModel with ResnetDownsampleBlock2D /
  SimpleCrossAttn blocks): ``efficient=False``, ``resample='resblock'``, exact
  GELU, ``time_act='gelu'``, ``resblock_time_act=False``, a text projection,
  6 output channels, ``aug_embed=True`` for stage II's noise level.

Skip structure when ``efficient=False`` (ADM / diffusers): the output of
``conv_in``, of every down block and of every downsampler is kept; each up level
has ``num_res_blocks + 1`` blocks, each consuming one kept tensor.
"""

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax import axes
from imagen_jax.models import attention, layers, text_layers

ATTENTION_KINDS = ("none", "self", "cross", "self_cross")

# model.remat: which block activations a backward pass keeps instead of
# recomputing (jax.checkpoint_policies). 'none' does not rematerialize;
# 'full' keeps only the block inputs; 'save_attention_out' keeps the attention
# kernel's output (the ``attention_out`` name in layers.AttentionBlock).
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def _dtype(name: Any):
  return jnp.dtype(name) if isinstance(name, str) else name


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Static description of one UNet (hashable; built from ``config.model``).

  Per-level sequences run from the highest resolution (level 0) to the lowest.
  """

  channels: tuple[int, ...] = (128, 256, 384, 512)
  num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
  attention: tuple[str, ...] = ("none", "self_cross", "self_cross", "self_cross")
  mid_attention: str = "self_cross"  # 'none' drops the attention; see mid_block
  mid_block: bool = True  # resblock [+ attention] + resblock at the bottom
  in_channels: int = 3
  out_channels: int = 3
  head_dim: int = 64
  num_heads: Optional[int] = None  # overrides head_dim when set
  time_embed_dim: Optional[int] = None  # default 4·channels[0]
  text_dim: Optional[int] = 4096  # width of incoming text embeddings; None: no text
  text_proj_dim: Optional[int] = None  # project text before attention (IF encoder_hid_proj)
  text_pool: str = "attention"  # 'attention' | 'mean' | 'none'
  # Trainable transformer layers over the frozen text tokens, before pooling and
  # attention (0: none, as in the paper and IF); their heads.
  text_layers: int = 0
  text_layer_max_offset: int = 16  # their learned relative-position bias (0: none)
  # A 1-D convolution over the tokens ahead of those layers: its kernel (odd; 0: none).
  text_conv_kernel: int = 0
  # Add fixed 2-D sine/cosine position codes to the image tokens before the
  # attention projections, so queries know where they are (off in the paper and IF).
  attention_pos_embed: bool = False
  # Add a learned projection of those codes to the attention queries alone, and
  # start the queries' projection of the image features at zero.
  attention_query_pos: bool = False
  text_layer_heads: int = 4
  text_pool_heads: int = 64
  text_pool_projected: bool = False  # pool the projected text (Imagen) or the raw (IF)
  text_norm: Optional[str] = None  # norm of text before attention k/v projections
  text_norm_groups: Optional[int] = None  # groups of text_norm='group_norm' (None: norm_groups)
  lowres_cond: bool = False  # SR stage: low-res image concatenated on channels
  aug_embed: bool = False  # embed the noise-augmentation level like t
  efficient: bool = False
  resample: str = "conv"  # 'conv' | 'avgpool' | 'resblock'
  skip_scale: float = 1.0
  resblock_out_scale: float = 1.0
  mid_out_scale: Optional[float] = None  # out_scale of the mid ResBlocks (None: resblock_out_scale)
  norm_groups: int = 32
  norm_eps: float = 1e-5
  act: str = "silu"
  time_act: Optional[str] = None  # act on the summed embedding (IF)
  resblock_time_act: bool = True  # act on the embedding inside each ResBlock
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  attn_bias: bool = True
  patch_size: int = 1  # space-to-depth stem ("simple diffusion")
  remat: Any = "none"  # a REMAT_POLICIES name (True/False: 'full'/'none')
  attention_impl: str = "auto"  # imagen_jax.models.attention.IMPLS
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    n = len(self.channels)
    for field in ("num_res_blocks", "attention"):
      value = getattr(self, field)
      if isinstance(value, (int, str)):
        object.__setattr__(self, field, (value,) * n)
      elif len(value) != n:
        raise ValueError(f"model.{field} has {len(value)} entries, model.channels has {n} levels")
      else:
        object.__setattr__(self, field, tuple(value))
    object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
    for kind in self.attention + (self.mid_attention,):
      if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; expected one of {ATTENTION_KINDS}")
    if self.text_dim is None and any("cross" in k for k in self.attention + (self.mid_attention,)):
      raise ValueError("text attention needs model.text_dim")
    if self.resample not in ("conv", "avgpool", "resblock"):
      raise ValueError(
        f"unknown resample {self.resample!r}; expected 'conv', 'avgpool' or 'resblock'"
      )
    if self.text_pool not in ("attention", "mean", "none"):
      raise ValueError(
        f"unknown text_pool {self.text_pool!r}; expected 'attention', 'mean' or 'none'"
      )
    if self.text_conv_kernel < 0 or (self.text_conv_kernel and self.text_conv_kernel % 2 == 0):
      raise ValueError(f"model.text_conv_kernel must be 0 or odd, got {self.text_conv_kernel}")
    if self.text_conv_kernel and self.text_dim is None:
      raise ValueError("model.text_conv_kernel needs model.text_dim")
    if self.text_layers < 0:
      raise ValueError(f"model.text_layers must be >= 0, got {self.text_layers}")
    if self.text_layers and (self.text_dim is None or self.text_dim % self.text_layer_heads):
      raise ValueError(
        f"model.text_layers needs a text_dim divisible by text_layer_heads "
        f"({self.text_dim} and {self.text_layer_heads})"
      )
    layers.get_activation(self.act)
    if isinstance(self.remat, bool):  # configs and config.json files before policies
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(
        f"unknown model.remat {self.remat!r}; expected one of {sorted(REMAT_POLICIES)} or a bool"
      )
    attention.check_impl(self.attention_impl)

  @classmethod
  def from_config(cls, model_config) -> "UNetConfig":
    """Builds from a ConfigDict / mapping; unknown keys are an error."""
    d = dict(model_config)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; known: {sorted(names)}")
    for k, v in d.items():
      if isinstance(v, list):
        d[k] = tuple(v)
    return cls(**d)

  @property
  def emb_dim(self) -> int:
    return self.time_embed_dim or 4 * self.channels[0]

  @property
  def downsample_factor(self) -> int:
    return self.patch_size * 2 ** (len(self.channels) - (0 if self.efficient else 1))


class UNet(nn.Module):
  """Text-conditional diffusion UNet. See the module docstring for variants."""

  config: UNetConfig

  def _kw(self):
    return dict(dtype=_dtype(self.config.dtype), param_dtype=_dtype(self.config.param_dtype))

  def _remat(self, cls):
    if self.config.remat == "none":
      return cls
    return nn.remat(cls, policy=REMAT_POLICIES[self.config.remat])

  def _res(self, features, name, resample=None, out_scale=None):
    c = self.config
    cls = self._remat(layers.ResBlock)
    out_scale = c.resblock_out_scale if out_scale is None else out_scale
    return cls(
      features,
      groups=c.norm_groups,
      eps=c.norm_eps,
      act=c.act,
      resample=resample,
      time_act=c.resblock_time_act,
      out_scale=out_scale,
      name=name,
      **self._kw(),
    )

  def _attn(self, kind, name):
    c = self.config
    cls = self._remat(layers.AttentionBlock)
    return cls(
      kind,
      head_dim=c.head_dim,
      num_heads=c.num_heads,
      groups=c.norm_groups,
      eps=c.norm_eps,
      text_norm=c.text_norm,
      text_norm_groups=c.text_norm_groups,
      use_bias=c.attn_bias,
      attention_impl=c.attention_impl,
      pos_embed=c.attention_pos_embed,
      query_pos=c.attention_query_pos,
      name=name,
      **self._kw(),
    )

  def _check_inputs(self, x, t, text_emb, lowres, noise_level):
    c = self.config
    if x.ndim != 4 or x.shape[-1] != c.in_channels:
      raise ValueError(f"x must be [B, H, W, {c.in_channels}], got shape {x.shape}")
    f = c.downsample_factor
    if x.shape[1] % f or x.shape[2] % f:
      raise ValueError(
        f"image size {x.shape[1]}×{x.shape[2]} must be divisible by {f} "
        f"({len(c.channels)} levels, patch size {c.patch_size})"
      )
    if t.shape != (x.shape[0],):
      raise ValueError(f"t must have shape [B]=({x.shape[0]},), got {t.shape}")
    if c.text_dim is not None:
      if text_emb is None or text_emb.ndim != 3 or text_emb.shape[-1] != c.text_dim:
        got = None if text_emb is None else text_emb.shape
        raise ValueError(f"text_emb must be [B, L, {c.text_dim}], got {got}")
    if c.lowres_cond:
      if lowres is None or lowres.shape != x.shape:
        got = None if lowres is None else lowres.shape
        raise ValueError(
          f"this super-resolution UNet needs lowres with x's shape "
          f"{x.shape} (already resized), got {got}"
        )
    elif lowres is not None:
      raise ValueError("lowres given to a UNet without model.lowres_cond")
    if c.aug_embed and (noise_level is None or noise_level.shape != (x.shape[0],)):
      raise ValueError(
        f"this UNet needs noise_level of shape ({x.shape[0]},), got "
        f"{None if noise_level is None else noise_level.shape}"
      )

  def _embed(self, t, text_emb, text_mask, noise_level):
    """Time (+ noise level) (+ pooled text) embedding: [B, emb_dim]."""
    c, kw = self.config, self._kw()
    sin = lambda v: layers.timestep_embedding(
      v, c.channels[0], flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift
    )
    emb = layers.TimestepMLP(c.emb_dim, act=c.act, name="time_embed", **kw)(sin(t))
    if c.aug_embed:
      emb = emb + layers.TimestepMLP(c.emb_dim, act=c.act, name="aug_embed", **kw)(sin(noise_level))
    if c.text_dim is not None and c.text_pool == "attention":
      emb = emb + text_layers.AttentionPool(c.emb_dim, c.text_pool_heads, name="text_pool", **kw)(
        text_emb, text_mask
      )
    elif c.text_dim is not None and c.text_pool == "mean":
      m = (jnp.ones(text_emb.shape[:2]) if text_mask is None else text_mask)[..., None]
      pooled = (text_emb * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
      emb = emb + layers.dense(c.emb_dim, (axes.TEXT_EMBED, axes.EMBED), name="text_pool", **kw)(
        pooled
      )
    if c.time_act:
      emb = layers.get_activation(c.time_act)(emb)
    return emb

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    text_emb: Optional[jax.Array] = None,
    text_mask: Optional[jax.Array] = None,
    *,
    lowres: Optional[jax.Array] = None,
    noise_level: Optional[jax.Array] = None,
  ) -> jax.Array:
    """Predicts the diffusion target.

    Args:
      x: [B, H, W, in_channels] float, the noisy image.
      t: [B] float, the time value fed to the sinusoidal embedding (1000·t for
        continuous time; IF's integer timesteps).
      text_emb: [B, L, text_dim] float text-encoder output (None if text_dim is None).
      text_mask: [B, L] bool, True on real tokens; None attends to every token.
      lowres: [B, H, W, in_channels], the resized, noise-augmented low-resolution
        image (super-resolution UNets only).
      noise_level: [B], the augmentation level fed to the same kind of embedding
        as t (UNets with ``aug_embed``).

    Returns:
      [B, H, W, out_channels] in the compute dtype.
    """
    c, kw = self.config, self._kw()
    t = jnp.asarray(t)
    if t.ndim == 0:
      t = jnp.broadcast_to(t, (x.shape[0],))
    self._check_inputs(x, t, text_emb, lowres, noise_level)
    if (c.text_layers or c.text_conv_kernel) and text_emb is not None:
      text_emb = text_layers.TextTransformer(
        c.text_layers,
        c.text_layer_heads,
        max_offset=c.text_layer_max_offset,
        conv_kernel=c.text_conv_kernel,
        name="text_adapter",
        **kw,
      )(text_emb, text_mask)
    ctx = text_emb
    if ctx is not None and c.text_proj_dim:
      ctx = layers.dense(c.text_proj_dim, (axes.TEXT_EMBED, axes.EMBED), name="text_proj", **kw)(
        ctx
      )
    emb = self._embed(t, ctx if c.text_pool_projected else text_emb, text_mask, noise_level)

    h = x if lowres is None else jnp.concatenate([x, lowres], axis=-1)
    if c.patch_size > 1:
      h = layers.space_to_depth(h, c.patch_size)
    h = layers.conv(c.channels[0], (None, axes.EMBED), name="conv_in", **kw)(h.astype(kw["dtype"]))
    h = self._down_mid_up(h, emb, ctx, text_mask)
    h = layers.get_activation(c.act)(
      layers.group_norm(c.norm_groups, c.norm_eps, param_dtype=kw["param_dtype"], name="norm_out")(
        h
      )
    )
    out_ch = c.out_channels * c.patch_size**2
    h = layers.conv(out_ch, (axes.EMBED, None), zero_init=True, name="conv_out", **kw)(h)
    if c.patch_size > 1:
      h = layers.depth_to_space(h, c.patch_size)
    return h

  def _block(self, h, emb, ctx, mask, features, kind, prefix):
    h = self._res(features, f"{prefix}_res")(h, emb)
    if kind != "none":
      h = self._attn(kind, f"{prefix}_attn")(h, ctx, mask)
    return h

  def _resample(self, h, emb, features, direction, name):
    c = self.config
    if c.resample == "resblock":
      return self._res(features, name, resample=direction)(h, emb)
    if direction == "down":
      return layers.Downsample(features, kind=c.resample, name=name, **self._kw())(h)
    return layers.Upsample(features, name=name, **self._kw())(h)

  def _down_mid_up(self, h, emb, ctx, mask):
    c = self.config
    n = len(c.channels)
    stem = h
    skips = [] if c.efficient else [h]
    for lvl, ch in enumerate(c.channels):
      if c.efficient:
        h = self._resample(h, emb, ch, "down", f"down{lvl}_downsample")
      for i in range(c.num_res_blocks[lvl]):
        h = self._block(h, emb, ctx, mask, ch, c.attention[lvl], f"down{lvl}_{i}")
        if not c.efficient:
          skips.append(h)
      if c.efficient:
        skips.append(h)
      elif lvl < n - 1:
        h = self._resample(h, emb, ch, "down", f"down{lvl}_downsample")
        skips.append(h)

    if c.mid_block:
      h = self._res(c.channels[-1], "mid_res0", out_scale=c.mid_out_scale)(h, emb)
      if c.mid_attention != "none":
        h = self._attn(c.mid_attention, "mid_attn")(h, ctx, mask)
      h = self._res(c.channels[-1], "mid_res1", out_scale=c.mid_out_scale)(h, emb)

    for lvl in reversed(range(n)):
      ch = c.channels[lvl]
      for i in range(c.num_res_blocks[lvl] + (0 if c.efficient else 1)):
        if i == 0 or not c.efficient:
          skip = skips.pop()
          h = jnp.concatenate([h, skip * c.skip_scale if c.skip_scale != 1 else skip], -1)
        h = self._block(h, emb, ctx, mask, ch, c.attention[lvl], f"up{lvl}_{i}")
      if lvl > 0 or c.efficient:
        h = self._resample(h, emb, ch, "up", f"up{lvl}_upsample")
    if c.efficient:
      # Every level of an Efficient UNet runs below full resolution; without this
      # full-resolution skip, x_t reaches the output only through a stride-2 path
      # and low-noise denoising (near-identity) is out of reach.
      h = jnp.concatenate([h, stem * c.skip_scale if c.skip_scale != 1 else stem], -1)
      h = self._res(c.channels[0], "final_res")(h, emb)
    assert not skips, "every kept tensor is consumed"
    return h


def count_params(tree: Any) -> int:
  """Number of scalars in a (possibly abstract, possibly boxed) parameter tree."""
  leaves = jax.tree_util.tree_leaves(nn.unbox(tree))
  return int(sum(math.prod(x.shape) for x in leaves))


def init_abstract(model: UNet, batch: int = 1, resolution: int = 64, text_len: int = 8) -> Any:
  """Parameter shapes via ``jax.eval_shape`` (no memory allocated)."""
  return jax.eval_shape(
    lambda: model.init(
      jax.random.PRNGKey(0), **dummy_inputs(model.config, batch, resolution, text_len)
    )
  )["params"]


def dummy_inputs(
  c: UNetConfig, batch: int, resolution: int, text_len: int = 8, dtype=jnp.float32
) -> dict:
  """Zero inputs of the right shapes for ``UNet.__call__`` (init, tracing, tests)."""
  shape = (batch, resolution, resolution, c.in_channels)
  inputs = dict(x=jnp.zeros(shape, dtype), t=jnp.zeros((batch,), jnp.float32))
  if c.text_dim is not None:
    inputs["text_emb"] = jnp.zeros((batch, text_len, c.text_dim), dtype)
    inputs["text_mask"] = jnp.ones((batch, text_len), bool)
  if c.lowres_cond:
    inputs["lowres"] = jnp.zeros(shape, dtype)
  if c.aug_embed:
    inputs["noise_level"] = jnp.zeros((batch,), jnp.float32)
  return inputs
