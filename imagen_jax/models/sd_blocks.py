"""Blocks of diffusers' Stable Diffusion UNet and VAE, NHWC: ResnetBlock2D (the
"default" additive time embedding), Transformer2DModel (GroupNorm, 1×1-conv or linear
projections, BasicTransformerBlock: self/cross attention, GEGLU feed-forward), the
VAE's stride-2 downsampling with (0, 1) padding.

Module names mirror diffusers' (``to_out.0``, ``ff.net.0.proj``, ...), so a Flax
parameter path joined with dots is the diffusers tensor name (``imagen_jax.convert.
stable_diffusion``). GroupNorm, convolutions, dense layers, activations and the
attention backends (``attention_impl``) are those of ``imagen_jax.models.layers`` and
``imagen_jax.models.attention``.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax import axes
from imagen_jax.models import attention as attention_lib
from imagen_jax.models import layers

Dtype = Any


class ResnetBlock(nn.Module):
  """GroupNorm → SiLU → conv → (+ time projection) → GroupNorm → SiLU → conv, plus a
  (1×1-conv) shortcut, divided by ``out_scale`` (diffusers' ResnetBlock2D with
  ``time_embedding_norm='default'``)."""

  features: int
  groups: int = 32
  eps: float = 1e-5
  out_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: Optional[jax.Array] = None) -> jax.Array:
    """x: [B, H, W, C], emb: [B, E] or None (the VAE) → [B, H, W, features]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda n: layers.group_norm(  # noqa: E731
      self.groups, self.eps, param_dtype=self.param_dtype, name=n
    )
    h = layers.conv(self.features, (axes.EMBED, axes.MLP), name="conv1", **kw)(
      nn.silu(norm("norm1")(x))
    )
    if emb is not None:
      e = layers.dense(self.features, (axes.EMBED, axes.MLP), name="time_emb_proj", **kw)(
        nn.silu(emb)
      )
      h = h + e[:, None, None, :]
    h = layers.conv(self.features, (axes.MLP, axes.EMBED), name="conv2", **kw)(
      nn.silu(norm("norm2")(h))
    )
    if x.shape[-1] != self.features:
      x = layers.conv(self.features, (axes.EMBED, axes.MLP), kernel=1, name="conv_shortcut", **kw)(
        x
      )
    out = (x.astype(h.dtype) + h) / self.out_scale
    return nn.with_logical_constraint(out, (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.EMBED))


class Attention(nn.Module):
  """diffusers' ``Attention`` of a transformer block: bias-free to_q/to_k/to_v, to_out.0
  with bias; keys/values from ``context`` (cross) or from ``x`` (self)."""

  heads: int
  head_dim: int
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    """x: [B, T, D], context: [B, S, Dc] or None → [B, T, D]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner, dh = self.heads * self.head_dim, self.head_dim
    src, src_axis = (x, axes.EMBED) if context is None else (context, axes.TEXT_EMBED)
    proj = (
      lambda n, v, a: layers.dense(  # noqa: E731
        inner, (a, axes.HEADS), use_bias=False, name=n, **kw
      )(v).reshape(v.shape[:2] + (self.heads, dh))
    )
    q = proj("to_q", x, axes.EMBED) * dh**-0.5
    k, v = proj("to_k", src, src_axis), proj("to_v", src, src_axis)
    out = attention_lib.attention(q.astype(self.dtype), k, v, None, impl=self.attention_impl)
    out = out.reshape(x.shape[:2] + (inner,))
    return layers.dense(x.shape[-1], (axes.HEADS, axes.EMBED), name="to_out.0", **kw)(out)


class FeedForward(nn.Module):
  """GEGLU feed-forward: proj → value · GELU(gate) → dense (diffusers' FeedForward)."""

  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, T, D] → [B, T, D]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    h = layers.dense(2 * self.mult * d, (axes.EMBED, axes.MLP), name="net.0.proj", **kw)(x)
    value, gate = jnp.split(h, 2, axis=-1)
    h = value * layers.get_activation("gelu")(gate)
    return layers.dense(d, (axes.MLP, axes.EMBED), name="net.2", **kw)(h)


class BasicTransformerBlock(nn.Module):
  """x + attn1(LN x), x + attn2(LN x, text), x + ff(LN x). With ``only_cross`` the
  first attention also reads the text (diffusers' ``only_cross_attention``)."""

  heads: int
  head_dim: int
  only_cross: bool = False
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, text: jax.Array) -> jax.Array:
    """x: [B, T, D], text: [B, S, Dt] → [B, T, D]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = lambda n: Attention(self.heads, self.head_dim, self.attention_impl, name=n, **kw)  # noqa: E731
    norm = lambda n: layers.layer_norm(1e-5, param_dtype=self.param_dtype, name=n)  # noqa: E731
    x = x + attn("attn1")(norm("norm1")(x), text if self.only_cross else None).astype(x.dtype)
    x = x + attn("attn2")(norm("norm2")(x), text).astype(x.dtype)
    return x + FeedForward(name="ff", **kw)(norm("norm3")(x)).astype(x.dtype)


class Transformer2D(nn.Module):
  """GroupNorm → proj_in → transformer blocks over the H·W tokens → proj_out, plus the
  input (diffusers' Transformer2DModel, continuous input). Projections are 1×1
  convolutions, or dense layers with ``linear_projection``."""

  heads: int
  groups: int = 32
  num_layers: int = 1
  linear_projection: bool = False
  only_cross: bool = False
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, text: jax.Array) -> jax.Array:
    """x: [B, H, W, C], text: [B, S, Dt] → [B, H, W, C]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hgt, wid, c = x.shape
    if c % self.heads:
      raise ValueError(f"{c} channels do not split into {self.heads} attention heads")
    h = layers.group_norm(self.groups, 1e-6, param_dtype=self.param_dtype, name="norm")(x)
    if self.linear_projection:
      proj = lambda n, a: layers.dense(c, a, name=n, **kw)  # noqa: E731
      h = proj("proj_in", (axes.EMBED, axes.MLP))(h.reshape(b, hgt * wid, c))
    else:
      proj = lambda n, a: layers.conv(c, a, kernel=1, name=n, **kw)  # noqa: E731
      h = proj("proj_in", (axes.EMBED, axes.MLP))(h).reshape(b, hgt * wid, c)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(
        self.heads,
        c // self.heads,
        self.only_cross,
        self.attention_impl,
        name=f"transformer_blocks.{i}",
        **kw,
      )(h, text)
    if self.linear_projection:
      h = proj("proj_out", (axes.MLP, axes.EMBED))(h).reshape(b, hgt, wid, c)
    else:
      h = proj("proj_out", (axes.MLP, axes.EMBED))(h.reshape(b, hgt, wid, c))
    return h + x.astype(h.dtype)


class PaddedDownsample(nn.Module):
  """Pad the bottom and right by one, then a stride-2 3×3 convolution without padding
  (the VAE encoder's Downsample2D, ``padding=0``)."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] → [B, H/2, W/2, features]."""
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return nn.Conv(
      self.features,
      (3, 3),
      strides=(2, 2),
      padding="VALID",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(
        nn.linear.default_kernel_init, (None, None, axes.EMBED, axes.MLP)
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.MLP,)),
      name="conv",
    )(x)
