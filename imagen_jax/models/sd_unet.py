"""diffusers' ``UNet2DConditionModel`` as used by Stable Diffusion 1.x/2.x and the x4
upscaler, in Flax (NHWC).

  model = SDUNet(SDUNetConfig(...))
  eps_or_v = model.apply({'params': p}, x_t, t, text_emb)          # [B, H, W, out]
  eps_or_v = model.apply({'params': p}, x_t, t, text_emb,
                         lowres=image, noise_level=labels)         # the x4 upscaler

``x_t``: [B, H, W, C] latents, ``t``: [B] (or scalar) timesteps, ``text_emb``:
[B, L, D] CLIP hidden states; ``lowres``: [B, H, W, C'] concatenated on channels after
``x_t``; ``noise_level``: [B] int class labels (``num_class_embeds``). The output is
float32. Blocks: ResnetBlock2D, Transformer2DModel (``sd_blocks``); down blocks
CrossAttnDownBlock2D / DownBlock2D, mid UNetMidBlock2DCrossAttn, up blocks
CrossAttnUpBlock2D / UpBlock2D. ``heads`` is diffusers' per-block head count (its
``num_attention_heads``, or ``attention_head_dim`` in configs that name it so: SD's
historical misnomer). ``upcast_attention`` changes nothing here: logits and softmax
always run in float32. Parameter paths joined with dots are diffusers' tensor names.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax import axes
from imagen_jax.models import attention as attention_lib
from imagen_jax.models import layers
from imagen_jax.models.sd_blocks import ResnetBlock, Transformer2D

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclasses.dataclass(frozen=True)
class SDUNetConfig:
  """The UNet's architecture (diffusers' config names where they exist).

  Per-block tuples (``heads``, ``only_cross_attention``) follow ``down_block_types``.
  """

  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  layers_per_block: int = 2
  heads: tuple[int, ...] = (8, 8, 8, 8)
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  upcast_attention: bool = False
  only_cross_attention: tuple[bool, ...] = (False, False, False, False)
  transformer_layers_per_block: int = 1
  num_class_embeds: Optional[int] = None
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  mid_block_scale_factor: float = 1.0
  attention_impl: str = "auto"
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    n = len(self.block_out_channels)
    for name in ("down_block_types", "up_block_types", "heads", "only_cross_attention"):
      if len(getattr(self, name)) != n:
        raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected {n}")
    for kind in self.down_block_types:
      if kind not in DOWN_BLOCKS:
        raise ValueError(f"down block {kind!r} is not supported; expected one of {DOWN_BLOCKS}")
    for kind in self.up_block_types:
      if kind not in UP_BLOCKS:
        raise ValueError(f"up block {kind!r} is not supported; expected one of {UP_BLOCKS}")
    attention_lib.check_impl(self.attention_impl)

  @property
  def time_embed_dim(self) -> int:
    """Width of the time embedding (4 × the first block's channels)."""
    return 4 * self.block_out_channels[0]


class SDUNet(nn.Module):
  """``UNet2DConditionModel`` (SD 1.x/2.x, x4 upscaler); see the module docstring."""

  config: SDUNetConfig

  def _kw(self) -> dict:
    c = self.config
    return dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))

  def _resnet(self, features: int, name: str, out_scale: float = 1.0) -> ResnetBlock:
    c = self.config
    return ResnetBlock(features, c.norm_num_groups, c.norm_eps, out_scale, name=name, **self._kw())

  def _transformer(self, heads: int, only_cross: bool, name: str) -> Transformer2D:
    c = self.config
    return Transformer2D(
      heads,
      c.norm_num_groups,
      c.transformer_layers_per_block,
      c.use_linear_projection,
      only_cross,
      c.attention_impl,
      name=name,
      **self._kw(),
    )

  def _embedding(self, t: jax.Array, noise_level: Optional[jax.Array], batch: int) -> jax.Array:
    c, kw = self.config, self._kw()
    t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    emb = layers.timestep_embedding(
      t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift
    )
    emb = layers.TimestepMLP(c.time_embed_dim, name="time_embedding", **kw)(emb)
    if c.num_class_embeds:
      if noise_level is None:
        raise ValueError("this UNet has num_class_embeds: pass noise_level (class labels)")
      table = nn.Embed(
        c.num_class_embeds,
        c.time_embed_dim,
        param_dtype=kw["param_dtype"],
        embedding_init=nn.with_logical_partitioning(
          nn.initializers.normal(1.0), (axes.VOCAB, axes.EMBED)
        ),
        name="class_embedding",
      )
      labels = jnp.broadcast_to(jnp.asarray(noise_level).astype(jnp.int32), (batch,))
      emb = emb + table(labels).astype(emb.dtype)
    return emb

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    text: jax.Array,
    lowres: Optional[jax.Array] = None,
    noise_level: Optional[jax.Array] = None,
  ) -> jax.Array:
    """x: [B, H, W, C], t: [B] or scalar, text: [B, L, D], lowres: [B, H, W, C'] or
    None, noise_level: [B] int or None → [B, H, W, out_channels] float32."""
    c, kw = self.config, self._kw()
    if lowres is not None:
      x = jnp.concatenate([x, lowres.astype(x.dtype)], axis=-1)
    if x.shape[-1] != c.in_channels:
      raise ValueError(f"the UNet takes {c.in_channels} input channels, got {x.shape[-1]}")
    emb = self._embedding(t, noise_level, x.shape[0])
    text = text.astype(kw["dtype"])
    ch = c.block_out_channels
    h = layers.conv(ch[0], (None, axes.EMBED), name="conv_in", **kw)(x)
    skips = [h]
    for i, kind in enumerate(c.down_block_types):
      for j in range(c.layers_per_block):
        h = self._resnet(ch[i], f"down_blocks.{i}.resnets.{j}")(h, emb)
        if kind.startswith("CrossAttn"):
          name = f"down_blocks.{i}.attentions.{j}"
          h = self._transformer(c.heads[i], c.only_cross_attention[i], name)(h, text)
        skips.append(h)
      if i < len(ch) - 1:
        h = layers.Downsample(ch[i], name=f"down_blocks.{i}.downsamplers.0", **kw)(h)
        skips.append(h)
    s = c.mid_block_scale_factor
    h = self._resnet(ch[-1], "mid_block.resnets.0", s)(h, emb)
    h = self._transformer(c.heads[-1], False, "mid_block.attentions.0")(h, text)
    h = self._resnet(ch[-1], "mid_block.resnets.1", s)(h, emb)
    heads, only_cross = c.heads[::-1], c.only_cross_attention[::-1]
    for i, kind in enumerate(c.up_block_types):
      for j in range(c.layers_per_block + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = self._resnet(ch[-1 - i], f"up_blocks.{i}.resnets.{j}")(h, emb)
        if kind.startswith("CrossAttn"):
          h = self._transformer(heads[i], only_cross[i], f"up_blocks.{i}.attentions.{j}")(h, text)
      if i < len(ch) - 1:
        h = layers.Upsample(ch[-1 - i], name=f"up_blocks.{i}.upsamplers.0", **kw)(h)
    h = nn.silu(
      layers.group_norm(
        c.norm_num_groups, c.norm_eps, param_dtype=kw["param_dtype"], name="conv_norm_out"
      )(h)
    )
    h = layers.conv(c.out_channels, (axes.EMBED, None), name="conv_out", **kw)(h)
    return h.astype(jnp.float32)


def dummy_inputs(config: SDUNetConfig, batch: int = 1, size: int = 8, text_len: int = 4) -> dict:
  """Zero inputs for ``init`` / ``eval_shape``: a dict of ``SDUNet.__call__`` arguments."""
  latent = config.in_channels
  inputs: dict[str, Any] = {}
  if config.num_class_embeds:
    latent = config.out_channels
    inputs["lowres"] = jnp.zeros((batch, size, size, config.in_channels - latent), jnp.float32)
    inputs["noise_level"] = jnp.zeros((batch,), jnp.int32)
  inputs["x"] = jnp.zeros((batch, size, size, latent), jnp.float32)
  inputs["t"] = jnp.zeros((batch,), jnp.float32)
  inputs["text"] = jnp.zeros((batch, text_len, config.cross_attention_dim), jnp.float32)
  return inputs
