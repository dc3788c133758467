"""The UNet's text-side layers: attention pooling of the text tokens (IF's
TextTimeEmbedding) and the optional trainable text adapter over the frozen
encoder's tokens.

Split from ``layers`` (the image-side blocks); parameters carry logical axis
names as there, and take the same ``dtype`` / ``param_dtype``.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax import axes
from imagen_jax.models import attention as attention_lib
from imagen_jax.models import layers

Dtype = Any


class AttentionPool(nn.Module):
  """Pools text embeddings into one vector with a learned query (IF's
  TextTimeEmbedding): LayerNorm → attention pooling → dense → LayerNorm.

  The query is the (masked) mean token plus a learned position embedding; it
  attends over itself and every (unmasked) token.
  """

  features: int
  num_heads: int
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """text: [B, L, D], mask: [B, L] bool or None → [B, features]."""
    b, _, d = text.shape
    if d % self.num_heads:
      raise ValueError(f"text width {d} is not divisible by {self.num_heads} pooling heads")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.layer_norm(self.eps, param_dtype=self.param_dtype, name="norm_in")(text)
    if mask is None:
      mean = x.mean(axis=1, keepdims=True)
    else:
      m = mask[..., None].astype(x.dtype)
      mean = (x * m).sum(1, keepdims=True) / jnp.maximum(m.sum(1, keepdims=True), 1.0)
      mask = jnp.concatenate([jnp.ones((b, 1), bool), mask.astype(bool)], axis=1)
    pos = self.param(
      "pos_embed",
      layers.named_init(nn.initializers.normal(d**-0.5), (None, axes.TEXT_EMBED)),
      (1, d),
      self.param_dtype,
    )
    cls = mean + pos.astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1)
    dh = d // self.num_heads
    proj = lambda n: layers.dense(d, (axes.TEXT_EMBED, axes.HEADS), name=n, **kw)
    q = proj("q")(cls).reshape(b, 1, self.num_heads, dh) * dh**-0.5
    k = proj("k")(x).reshape(b, -1, self.num_heads, dh)
    v = proj("v")(x).reshape(b, -1, self.num_heads, dh)
    pooled = attention_lib.xla_attention(q, k, v, mask).reshape(b, d)  # one query
    h = layers.dense(self.features, (axes.TEXT_EMBED, axes.EMBED), name="proj", **kw)(pooled)
    return layers.layer_norm(self.eps, param_dtype=self.param_dtype, name="norm_out")(h)


class TextTransformer(nn.Module):
  """Trainable transformer layers over the frozen encoder's tokens (text adapter).

  Pre-LayerNorm self-attention (padding keys masked) and GELU MLP blocks. Token
  order enters twice: fixed sinusoidal positions added first, and a learned
  per-head bias on the attention logits for each relative offset (clipped to
  ``max_offset``; 0 = none), so "the words next to me" is one bias to learn. Part of the
  UNet and trained with it: the text encoder itself stays frozen. Off by
  default (``text_layers=0``); the paper's UNets and DeepFloyd IF have none.
  """

  num_layers: int
  num_heads: int
  mlp_ratio: int = 2
  max_offset: int = 16
  conv_kernel: int = 0
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """text: [B, L, D], mask: [B, L] bool or None → [B, L, D]."""
    b, length, d = text.shape
    if d % self.num_heads:
      raise ValueError(f"text width {d} is not divisible by {self.num_heads} adapter heads")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dh = d // self.num_heads
    pos = jnp.arange(length)
    offsets = jnp.clip(pos[None, :] - pos[:, None], -self.max_offset, self.max_offset)
    offsets = offsets + self.max_offset  # [L, L] index into the bias table
    x = text + layers.sinusoidal_positions(length, d).astype(text.dtype)[None]
    if self.conv_kernel:
      # A 1-D convolution over the tokens: each token reads its neighbours with
      # one weight matrix per offset, so a word's own phrase (which color and
      # shape precede this position word) is one linear map, not an attention
      # pattern to discover. Padding tokens are zeroed first.
      if self.conv_kernel % 2 == 0:
        raise ValueError(f"text conv kernel must be odd, got {self.conv_kernel}")
      h = layers.layer_norm(self.eps, param_dtype=self.param_dtype, name="conv_norm")(x)
      if mask is not None:
        h = h * mask[..., None].astype(h.dtype)
      pad = self.conv_kernel // 2
      h = nn.Conv(
        d,
        (self.conv_kernel,),
        padding=((pad, pad),),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=layers.named_init(
          nn.linear.default_kernel_init, (None, axes.TEXT_EMBED, axes.MLP)
        ),
        bias_init=layers.named_init(nn.initializers.zeros_init(), (axes.MLP,)),
        name="conv",
      )(h.astype(self.dtype))
      x = x + layers.dense(d, (axes.MLP, axes.TEXT_EMBED), name="conv_out", **kw)(nn.gelu(h))
    for i in range(self.num_layers):
      h = layers.layer_norm(self.eps, param_dtype=self.param_dtype, name=f"layer{i}_norm1")(x)
      proj = lambda n, h=h: layers.dense(d, (axes.TEXT_EMBED, axes.HEADS), name=n, **kw)(h).reshape(
        b, length, self.num_heads, dh
      )
      q, k, v = proj(f"layer{i}_q"), proj(f"layer{i}_k"), proj(f"layer{i}_v")
      bias = None
      if self.max_offset > 0:
        table = self.param(
          f"layer{i}_relpos",
          layers.named_init(nn.initializers.zeros_init(), (axes.HEADS, None)),
          (self.num_heads, 2 * self.max_offset + 1),
          self.param_dtype,
        )
        bias = table[:, offsets]  # [heads, L, L]
      a = attention_lib.xla_attention(q * dh**-0.5, k, v, mask, bias).reshape(b, length, d)
      x = x + layers.dense(d, (axes.HEADS, axes.TEXT_EMBED), name=f"layer{i}_o", **kw)(a)
      h = layers.layer_norm(self.eps, param_dtype=self.param_dtype, name=f"layer{i}_norm2")(x)
      mlp = d * self.mlp_ratio
      h = layers.dense(mlp, (axes.TEXT_EMBED, axes.MLP), name=f"layer{i}_mlp_in", **kw)(h)
      h = layers.dense(d, (axes.MLP, axes.TEXT_EMBED), name=f"layer{i}_mlp_out", **kw)(nn.gelu(h))
      x = x + h
    return x
