"""UNet building blocks: ResBlock, attention with text keys/values, timestep
embeddings, resampling (the text-side layers are in ``text_layers``).

(Over 400 lines: the image-side blocks the UNets share (dense/conv with axis names,
GroupNorm, ResBlock, attention block, resampling, embeddings); each is small and
they are read together.)

Every parameter carries logical axis names (``imagen_jax.axes``) so that one
rules table decides how it shards. Every layer takes a compute ``dtype`` and a
storage ``param_dtype``; normalization statistics and softmax run in float32.

The blocks are written so that DeepFloyd IF's diffusers UNet (ResnetBlock2D
with scale-shift, AttnAddedKVProcessor attention, TextTimeEmbedding pooling)
maps onto them tensor for tensor; see ``imagen_jax/convert``.
"""

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from imagen_jax import axes
from imagen_jax.models import attention as attention_lib

Dtype = Any

_ACTIVATIONS = {
  "silu": nn.silu,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact, as torch nn.GELU()
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": nn.relu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the activation function called ``name``."""
  if name not in _ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def named_init(init: Callable, names: tuple[Optional[str], ...]) -> Callable:
  return nn.with_logical_partitioning(init, names)


def dense(
  features, names, *, dtype, param_dtype, use_bias=True, zero_init=False, name=None
) -> nn.Dense:
  """nn.Dense whose kernel has logical names ``names = (in_axis, out_axis)``."""
  kinit = nn.initializers.zeros_init() if zero_init else nn.linear.default_kernel_init
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=named_init(kinit, names),
    bias_init=named_init(nn.initializers.zeros_init(), names[-1:]),
    name=name,
  )


def conv(
  features, names, *, kernel=3, stride=1, dtype, param_dtype, zero_init=False, name=None
) -> nn.Conv:
  """A 2-D convolution with symmetric (PyTorch-style) padding of ``kernel // 2``.

  ``names = (in_axis, out_axis)``; the spatial kernel axes are never sharded
  (unnamed: flax forbids a logical name twice in one array).
  Symmetric padding matters for stride 2: 'SAME' would pad (0, 1) instead.
  """
  kinit = nn.initializers.zeros_init() if zero_init else nn.linear.default_kernel_init
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=named_init(kinit, (None, None) + tuple(names)),
    bias_init=named_init(nn.initializers.zeros_init(), tuple(names[-1:])),
    name=name,
  )


class GroupNorm(nn.Module):
  """GroupNorm of [B, ..., C] over the middle axes and each group's channels,
  computed in float32 (the output is float32); parameters ``scale`` and ``bias``
  as in ``flax.linen.GroupNorm``, and the same math (variance E[x²] − E[x]²).

  The statistics are reduced per channel over the middle axes first (channels
  stay the contiguous minor dimension), then over each group's channels, which
  XLA:CPU runs several times faster than flax's layout (``benchmarks.kernels``
  GroupNorm rows; figures in benchmarks/RESULTS.md).
  """

  num_groups: int
  epsilon: float = 1e-5
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, c = x.shape[0], x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"{c} channels do not split into {self.num_groups} groups")
    per_group = c // self.num_groups
    scale = self.param(
      "scale", named_init(nn.initializers.ones_init(), (axes.NORM,)), (c,), self.param_dtype
    )
    bias = self.param(
      "bias", named_init(nn.initializers.zeros_init(), (axes.NORM,)), (c,), self.param_dtype
    )
    x = x.astype(jnp.float32)
    middle = tuple(range(1, x.ndim - 1))
    count = per_group * math.prod(x.shape[1:-1])
    group_sum = lambda v: v.sum(middle).reshape(b, self.num_groups, per_group).sum(-1)
    mean = group_sum(x) / count
    var = jnp.maximum(group_sum(jnp.square(x)) / count - jnp.square(mean), 0.0)
    inv = jnp.repeat(jax.lax.rsqrt(var + self.epsilon), per_group, axis=1)  # [B, C]
    mul = inv * scale.astype(jnp.float32)
    add = bias.astype(jnp.float32) - jnp.repeat(mean, per_group, axis=1) * mul
    bshape = (b,) + (1,) * len(middle) + (c,)
    return x * mul.reshape(bshape) + add.reshape(bshape)


def group_norm(groups: int, eps: float, *, param_dtype, name=None) -> GroupNorm:
  """GroupNorm computed in float32 (its output is float32)."""
  return GroupNorm(num_groups=groups, epsilon=eps, param_dtype=param_dtype, name=name)


def layer_norm(eps: float, *, param_dtype, name=None) -> nn.LayerNorm:
  """LayerNorm computed in float32 (its output is float32)."""
  return nn.LayerNorm(
    epsilon=eps,
    dtype=jnp.float32,
    param_dtype=param_dtype,
    scale_init=named_init(nn.initializers.ones_init(), (axes.NORM,)),
    bias_init=named_init(nn.initializers.zeros_init(), (axes.NORM,)),
    name=name,
  )


def upsample_nearest(x: jax.Array) -> jax.Array:
  """x: [B, H, W, C] → [B, 2H, 2W, C] by repetition (nearest neighbour)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample_avg(x: jax.Array) -> jax.Array:
  """x: [B, H, W, C] → [B, H/2, W/2, C] by 2×2 average pooling."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
  """x: [B, H, W, C] → [B, H/p, W/p, p·p·C]."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
  """Inverse of ``space_to_depth``: [B, h, w, p·p·C] → [B, h·p, w·p, C]."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c // (p * p))


def timestep_embedding(
  t: jax.Array,
  dim: int,
  *,
  flip_sin_to_cos: bool = True,
  freq_shift: float = 0.0,
  max_period: float = 10000.0,
) -> jax.Array:
  """Sinusoidal embedding of a scalar per example (timestep or noise level).

  Args:
    t: [B] float or int, the value to embed (e.g. 1000·t for continuous time,
      or IF's integer timesteps 0–999).
    dim: embedding width.
    flip_sin_to_cos: put the cosines first (diffusers' convention in IF).
    freq_shift: the ``downscale_freq_shift`` of diffusers' ``Timesteps``.
    max_period: the longest period of the frequencies.

  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepMLP(nn.Module):
  """Two dense layers over a sinusoidal embedding (diffusers' TimestepEmbedding)."""

  features: int
  act: str = "silu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, emb: jax.Array) -> jax.Array:
    """emb: [B, D_in] → [B, features]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.features, (axes.NORM, axes.EMBED), name="linear_1", **kw)(emb)
    h = get_activation(self.act)(h)
    return dense(self.features, (axes.EMBED, axes.MLP), name="linear_2", **kw)(h)


def sinusoidal_positions(length: int, dim: int, scale: float = 1.0) -> jax.Array:
  """[length, dim] fixed sine/cosine codes of positions 0, scale, 2·scale, ... (Transformer)."""
  positions = jnp.arange(length, dtype=jnp.float32) * scale
  return timestep_embedding(positions, dim, flip_sin_to_cos=False)


def positions_2d(height: int, width: int, dim: int) -> jax.Array:
  """[height, width, dim] fixed codes: half the channels code the row, half the column,
  each as fractions of the side (the same code at every resolution)."""
  half = dim // 2
  rows = sinusoidal_positions(height, half, scale=64.0 / height)
  cols = sinusoidal_positions(width, dim - half, scale=64.0 / width)
  return jnp.concatenate(
    [
      jnp.broadcast_to(rows[:, None], (height, width, half)),
      jnp.broadcast_to(cols[None], (height, width, dim - half)),
    ],
    axis=-1,
  )


class ResBlock(nn.Module):
  """GroupNorm → act → [resample] → conv → scale-shift(time) → act → conv, plus skip.

  Attributes:
    features: output channels.
    resample: None, 'up' (nearest ×2) or 'down' (2×2 average), applied to both
      branches after the first activation (BigGAN / IF style).
    time_act: apply the activation to the embedding before its projection
      (False where the UNet already activated it: IF's ``skip_time_act``).
    out_scale: the sum is divided by this (IF's ``output_scale_factor``).
  """

  features: int
  groups: int = 32
  eps: float = 1e-5
  act: str = "silu"
  resample: Optional[str] = None
  time_act: bool = True
  out_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    """x: [B, H, W, C], emb: [B, E] → [B, H', W', features]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = get_activation(self.act)
    h = act(group_norm(self.groups, self.eps, param_dtype=self.param_dtype, name="norm1")(x))
    skip = x
    if self.resample == "up":
      h, skip = upsample_nearest(h), upsample_nearest(skip)
    elif self.resample == "down":
      h, skip = downsample_avg(h), downsample_avg(skip)
    elif self.resample is not None:
      raise ValueError(f"unknown resample {self.resample!r}; expected None, 'up' or 'down'")
    h = conv(self.features, (axes.EMBED, axes.MLP), name="conv1", **kw)(h)
    h = nn.with_logical_constraint(h, (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.MLP))
    e = act(emb) if self.time_act else emb
    e = dense(2 * self.features, (axes.EMBED, axes.MLP), name="time_proj", **kw)(e)
    scale, shift = jnp.split(e[:, None, None, :].astype(jnp.float32), 2, axis=-1)
    h = group_norm(self.groups, self.eps, param_dtype=self.param_dtype, name="norm2")(h)
    h = act(h * (1 + scale) + shift)
    h = conv(self.features, (axes.MLP, axes.EMBED), zero_init=True, name="conv2", **kw)(h)
    if x.shape[-1] != self.features:
      skip = conv(self.features, (axes.EMBED, axes.MLP), kernel=1, name="skip", **kw)(skip)
    out = (skip.astype(h.dtype) + h) / self.out_scale
    return nn.with_logical_constraint(out, (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.EMBED))


class AttentionBlock(nn.Module):
  """Multi-head attention over image tokens, text tokens, or both, with a residual.

  kind:
    'self'       — keys/values from the image tokens;
    'cross'      — keys/values from the text tokens only;
    'self_cross' — keys/values from text tokens AND image tokens (Imagen's text
                   conditioning; IF's AttnAddedKVProcessor).
  Queries always come from the GroupNorm-ed image tokens. ``text_norm`` optionally
  normalizes the text before its key/value projections ('layer_norm' or
  'group_norm', IF's ``cross_attention_norm``); ``text_norm_groups`` sets the
  groups of the latter (None: ``groups``; diffusers always uses 32).
  ``attention_impl`` picks the backend (``imagen_jax.models.attention``); the
  attention output is named ``attention_out`` for remat policies.
  """

  kind: str
  head_dim: int = 64
  num_heads: Optional[int] = None
  groups: int = 32
  eps: float = 1e-5
  text_norm: Optional[str] = None
  text_norm_groups: Optional[int] = None
  use_bias: bool = True
  attention_impl: str = "auto"
  pos_embed: bool = False
  query_pos: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _heads(self, channels: int) -> tuple[int, int]:
    if self.num_heads:
      if channels % self.num_heads:
        raise ValueError(f"{channels} channels do not split into {self.num_heads} heads")
      return self.num_heads, channels // self.num_heads
    if channels % self.head_dim:
      raise ValueError(f"{channels} channels do not split into heads of {self.head_dim}")
    return channels // self.head_dim, self.head_dim

  @nn.compact
  def __call__(
    self, x: jax.Array, text: Optional[jax.Array] = None, text_mask: Optional[jax.Array] = None
  ) -> jax.Array:
    """x: [B, H, W, C], text: [B, L, Dt] or None, text_mask: [B, L] bool or None."""
    if self.kind not in ("self", "cross", "self_cross"):
      raise ValueError(
        f"unknown attention kind {self.kind!r}; expected 'self', 'cross' or 'self_cross'"
      )
    b, hgt, wid, c = x.shape
    heads, dh = self._heads(c)
    # Flat [in, heads·head_dim] kernels: the head split is a reshape. (flax's
    # DenseGeneral re-runs a flat-shaped boxed init under a mesh and fails.)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
    proj = lambda n, in_axis, zero=False: (
      lambda v: dense(heads * dh, (in_axis, axes.HEADS), name=n, zero_init=zero, **kw)(v).reshape(
        v.shape[:2] + (heads, dh)
      )
    )
    h = group_norm(self.groups, self.eps, param_dtype=self.param_dtype, name="norm")(x)
    if self.pos_embed:
      h = h + positions_2d(hgt, wid, c).astype(h.dtype)[None]
    h = h.reshape(b, hgt * wid, c)
    # With query_pos the queries start from where they are alone: their projection
    # of the image features starts at zero (at high noise those features are noise).
    q = proj("q", axes.EMBED, self.query_pos)(h)
    if self.query_pos:
      # Where the query sits, through its own projection: unlike pos_embed, it is
      # not mixed with the image features.
      codes = positions_2d(hgt, wid, c).reshape(1, hgt * wid, c).astype(self.dtype)
      q = q + proj("q_pos", None)(codes)
    q = q * dh**-0.5
    keys, values, masks = [], [], []
    if self.kind in ("cross", "self_cross"):
      if text is None:
        raise ValueError(f"'{self.kind}' attention needs text embeddings, got None")
      ctx = text
      if self.text_norm == "layer_norm":
        ctx = layer_norm(1e-5, param_dtype=self.param_dtype, name="text_norm")(ctx)
      elif self.text_norm == "group_norm":
        ctx = group_norm(
          self.text_norm_groups or self.groups, 1e-5, param_dtype=self.param_dtype, name="text_norm"
        )(ctx)
      elif self.text_norm is not None:
        raise ValueError(f"unknown text_norm {self.text_norm!r}")
      keys.append(proj("text_k", axes.TEXT_EMBED)(ctx))
      values.append(proj("text_v", axes.TEXT_EMBED)(ctx))
      masks.append(jnp.ones(ctx.shape[:2], bool) if text_mask is None else text_mask.astype(bool))
    if self.kind in ("self", "self_cross"):
      keys.append(proj("k", axes.EMBED)(h))
      values.append(proj("v", axes.EMBED)(h))
      masks.append(jnp.ones((b, hgt * wid), bool))
    mask = None if text_mask is None else jnp.concatenate(masks, axis=1)
    out = attention_lib.attention(
      q.astype(self.dtype),
      jnp.concatenate(keys, 1),
      jnp.concatenate(values, 1),
      mask,
      impl=self.attention_impl,
    )
    out = checkpoint_name(out, "attention_out")
    out = dense(c, (axes.HEADS, axes.EMBED), zero_init=True, name="out", **kw)(
      out.reshape(b, hgt * wid, heads * dh)
    )
    return x + out.reshape(b, hgt, wid, c).astype(x.dtype)


class Downsample(nn.Module):
  """Halves the resolution: a stride-2 3×3 conv ('conv') or 2×2 average pooling
  followed by a 1×1 conv when the width changes ('avgpool')."""

  features: int
  kind: str = "conv"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.kind == "conv":
      return conv(self.features, (axes.EMBED, axes.MLP), stride=2, name="conv", **kw)(x)
    if self.kind == "avgpool":
      x = downsample_avg(x)
      if x.shape[-1] != self.features:
        x = conv(self.features, (axes.EMBED, axes.MLP), kernel=1, name="conv", **kw)(x)
      return x
    raise ValueError(f"unknown downsample kind {self.kind!r}; expected 'conv' or 'avgpool'")


class Upsample(nn.Module):
  """Doubles the resolution: nearest neighbour then a 3×3 conv."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return conv(
      self.features,
      (axes.EMBED, axes.MLP),
      name="conv",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )(upsample_nearest(x))
