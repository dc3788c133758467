"""diffusers' ``AutoencoderKL`` (Stable Diffusion's VAE) in Flax, NHWC.

  vae = AutoencoderKL(VAEConfig(...))
  mean = vae.apply({'params': p}, x, method='encode')   # [B, H/f, W/f, latent], unscaled
  image = vae.apply({'params': p}, z, method='decode')  # [B, H, W, out_channels]

``encode`` is ``encode(x).latent_dist.mean`` (the encoder, ``quant_conv``, the first
half of the moments), ``decode`` is ``decode(z).sample`` (``post_quant_conv``, the
decoder); both take and return unscaled latents: multiply by ``config.scaling_factor``
to get the diffusion model's latents. f = 2^(len(block_out_channels) − 1). Outputs are
float32. The mid blocks' single-head attention is ``layers.AttentionBlock``; parameter
paths joined with dots are diffusers' tensor names, except that attention's (renamed by
``imagen_jax.convert.stable_diffusion``).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax import axes
from imagen_jax.models import attention as attention_lib
from imagen_jax.models import layers
from imagen_jax.models.sd_blocks import PaddedDownsample, ResnetBlock

EPS = 1e-6  # diffusers' encoder/decoder GroupNorm epsilon


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """AutoencoderKL's architecture (diffusers' config names), plus dtypes."""

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  attention_impl: str = "auto"
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    attention_lib.check_impl(self.attention_impl)

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along a side."""
    return 2 ** (len(self.block_out_channels) - 1)


def _kw(config: VAEConfig) -> dict:
  return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


def _mid_block(config: VAEConfig, h: jax.Array) -> jax.Array:
  """UNetMidBlock2D: resnet, single-head self-attention, resnet (call in a compact
  method: the modules are named ``mid_block.*`` in the caller's scope)."""
  c, kw = config, _kw(config)
  ch = h.shape[-1]
  h = ResnetBlock(ch, c.norm_num_groups, EPS, name="mid_block.resnets.0", **kw)(h)
  if c.mid_block_add_attention:
    h = layers.AttentionBlock(
      "self",
      num_heads=1,
      groups=c.norm_num_groups,
      eps=EPS,
      attention_impl=c.attention_impl,
      name="mid_block.attentions.0",
      **kw,
    )(h)
  return ResnetBlock(ch, c.norm_num_groups, EPS, name="mid_block.resnets.1", **kw)(h)


def _out(config: VAEConfig, h: jax.Array, features: int) -> jax.Array:
  """conv_norm_out → SiLU → conv_out."""
  kw = _kw(config)
  h = layers.group_norm(
    config.norm_num_groups, EPS, param_dtype=kw["param_dtype"], name="conv_norm_out"
  )(h)
  return layers.conv(features, (axes.EMBED, None), name="conv_out", **kw)(nn.silu(h))


class Encoder(nn.Module):
  """x: [B, H, W, in_channels] → moments [B, H/f, W/f, 2·latent_channels]."""

  config: VAEConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, kw = self.config, _kw(self.config)
    ch = c.block_out_channels
    h = layers.conv(ch[0], (None, axes.EMBED), name="conv_in", **kw)(x)
    for i, features in enumerate(ch):
      for j in range(c.layers_per_block):
        h = ResnetBlock(
          features, c.norm_num_groups, EPS, name=f"down_blocks.{i}.resnets.{j}", **kw
        )(h)
      if i < len(ch) - 1:
        h = PaddedDownsample(features, name=f"down_blocks.{i}.downsamplers.0", **kw)(h)
    return _out(c, _mid_block(c, h), 2 * c.latent_channels)


class Decoder(nn.Module):
  """z: [B, h, w, latent_channels] → image [B, h·f, w·f, out_channels]."""

  config: VAEConfig

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    c, kw = self.config, _kw(self.config)
    ch = c.block_out_channels[::-1]
    h = layers.conv(ch[0], (None, axes.EMBED), name="conv_in", **kw)(z)
    h = _mid_block(c, h)
    for i, features in enumerate(ch):
      for j in range(c.layers_per_block + 1):
        h = ResnetBlock(features, c.norm_num_groups, EPS, name=f"up_blocks.{i}.resnets.{j}", **kw)(
          h
        )
      if i < len(ch) - 1:
        h = layers.Upsample(features, name=f"up_blocks.{i}.upsamplers.0", **kw)(h)
    return _out(c, h, c.out_channels)


class AutoencoderKL(nn.Module):
  """The VAE: ``encode`` (→ the latent mean) and ``decode`` (→ the image); calling it
  runs both (what ``init`` uses)."""

  config: VAEConfig

  def setup(self):
    c, kw = self.config, _kw(self.config)
    self.encoder = Encoder(c)
    self.decoder = Decoder(c)
    moments = 2 * c.latent_channels
    if c.use_quant_conv:
      self.quant_conv = layers.conv(moments, (axes.EMBED, axes.MLP), kernel=1, **kw)
    if c.use_post_quant_conv:
      self.post_quant_conv = layers.conv(c.latent_channels, (axes.EMBED, axes.MLP), kernel=1, **kw)

  def encode(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, in_channels] in [-1, 1] → latent mean [B, H/f, W/f, latent] float32."""
    moments = self.encoder(x)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    return moments[..., : self.config.latent_channels].astype(jnp.float32)

  def decode(self, z: jax.Array) -> jax.Array:
    """z: [B, h, w, latent] unscaled → image [B, h·f, w·f, out_channels] float32."""
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] → decode(encode(x)) [B, H, W, out_channels]."""
    return self.decode(self.encode(x))
