"""CLIP's text tower in Flax, as transformers' ``CLIPTextModel`` (the one CLIP text
implementation of the package: Stable Diffusion's text encoder and the CLIP score's
text side, ``imagen_jax.eval.clip``, both use it).

  model = CLIPTextModel(CLIPTextConfig.from_json(text_config))
  hidden = model.apply({'params': p}, ids)            # [B, L, D] last_hidden_state
  hidden = model.apply({'params': p}, ids, skip_layers=1)   # penultimate layer (clip_skip)

Pre-LayerNorm transformer layers (``quick_gelu`` for OpenAI CLIP, exact ``gelu`` for
OpenCLIP), causal self-attention (plus an optional padding mask), a final LayerNorm.
``skip_layers=k`` stops ``k`` layers before the end and applies the final LayerNorm
there, as diffusers' ``clip_skip`` does. The pooled state is the final state at the
first end-of-text token (``argmax(ids)`` for old configs whose ``eos_token_id`` is 2).

Parameters carry logical axis names (``imagen_jax.axes``); ``dtype`` is the compute
dtype, ``param_dtype`` the storage dtype; LayerNorms and softmax run in float32.
Flax parameter paths mirror transformers' tensor names (``hf_name``).
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax import axes

Dtype = Any

ACTIVATIONS = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """One transformer tower (text or vision)."""

  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  act: str = "quick_gelu"
  eps: float = 1e-5

  @classmethod
  def from_json(cls, c: dict) -> "TowerConfig":
    """From a transformers tower config dict (``text_config`` / ``vision_config``)."""
    act = c.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
      raise ValueError(f"CLIP hidden_act {act!r} is not supported; expected one of {ACTIVATIONS}")
    return cls(
      c["hidden_size"],
      c["intermediate_size"],
      c["num_hidden_layers"],
      c["num_attention_heads"],
      act,
      c.get("layer_norm_eps", 1e-5),
    )


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The text tower and its embeddings (a ``CLIPTextConfig`` dict of transformers)."""

  tower: TowerConfig
  vocab_size: int
  max_length: int  # max_position_embeddings
  eos_token_id: int = 2

  @classmethod
  def from_json(cls, c: dict) -> "CLIPTextConfig":
    """From transformers' text config dict (``CLIPTextModel``'s config.json)."""
    return cls(
      TowerConfig.from_json(c),
      c["vocab_size"],
      c.get("max_position_embeddings", 77),
      c.get("eos_token_id", 2),
    )

  @classmethod
  def from_dict(cls, d: dict) -> "CLIPTextConfig":
    """From ``dataclasses.asdict`` of one (as a converted folder's config.json stores it;
    extra keys such as ``kind`` and ``dim`` are ignored)."""
    return cls(TowerConfig(**d["tower"]), d["vocab_size"], d["max_length"], d["eos_token_id"])


def _dense(features: int, names: tuple, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=nn.with_logical_partitioning(nn.linear.default_kernel_init, names),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[-1:]),
    name=name,
  )


def _layer_norm(eps: float, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
    eps,
    dtype=jnp.float32,
    param_dtype=param_dtype,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.NORM,)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.NORM,)),
    name=name,
  )


class Attention(nn.Module):
  """Multi-head attention with q/k/v/out projections (biases), as CLIPAttention."""

  config: TowerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    """x: [B, L, D], bias: [B, 1, L, L] added to the logits or None → [B, L, D]."""
    b, l, d = x.shape
    h = self.config.num_heads
    proj = lambda n, names: _dense(d, names, self.dtype, self.param_dtype, n)  # noqa: E731
    split = lambda t: t.reshape(b, l, h, d // h)  # noqa: E731
    q = split(proj("q_proj", (axes.EMBED, axes.HEADS))(x)) * (d // h) ** -0.5
    k = split(proj("k_proj", (axes.EMBED, axes.HEADS))(x))
    v = split(proj("v_proj", (axes.EMBED, axes.HEADS))(x))
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
      logits = logits + bias
    weights = jax.nn.softmax(logits, -1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, l, d)
    return proj("out_proj", (axes.HEADS, axes.EMBED))(out)


class MLP(nn.Module):
  """fc1 → activation → fc2 (CLIPMLP)."""

  config: TowerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, L, D] → [B, L, D]."""
    c = self.config
    x = _dense(c.intermediate_size, (axes.EMBED, axes.MLP), self.dtype, self.param_dtype, "fc1")(x)
    x = ACTIVATIONS[c.act](x)
    return _dense(c.hidden_size, (axes.MLP, axes.EMBED), self.dtype, self.param_dtype, "fc2")(x)


class EncoderLayer(nn.Module):
  """x + attn(LN(x)), then + MLP(LN(·)) (CLIPEncoderLayer)."""

  config: TowerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    """x: [B, L, D] → [B, L, D]."""
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _layer_norm(c.eps, self.param_dtype, "layer_norm1")(x).astype(self.dtype)
    x = x + Attention(c, name="self_attn", **kw)(h, bias)
    h = _layer_norm(c.eps, self.param_dtype, "layer_norm2")(x).astype(self.dtype)
    return x + MLP(c, name="mlp", **kw)(h)


class Encoder(nn.Module):
  """The stack of layers; ``skip_layers`` of them at the end are not run."""

  config: TowerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: Optional[jax.Array] = None, skip_layers: int = 0):
    """x: [B, L, D], bias: [B, 1, L, L] or None → [B, L, D]."""
    n = self.config.num_layers
    if not 0 <= skip_layers < n:
      raise ValueError(f"skip_layers={skip_layers} must lie in [0, {n}) for a {n}-layer tower")
    for i in range(n):
      layer = EncoderLayer(self.config, self.dtype, self.param_dtype, name=f"layers_{i}")
      if i < n - skip_layers:
        x = layer(x, bias)
      elif self.is_initializing():
        layer(x, bias)  # the skipped layers' parameters still exist (and load)
    return x


class TextTransformer(nn.Module):
  """Embeddings, causal encoder, final LayerNorm (transformers' CLIPTextTransformer)."""

  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, ids: jax.Array, mask: Optional[jax.Array] = None, skip_layers: int = 0
  ) -> tuple[jax.Array, jax.Array]:
    """ids: [B, L] int, mask: [B, L] (1 = token) or None →
    (hidden states [B, L, D] float32 after the final LayerNorm, pooled [B, D])."""
    c, t = self.config, self.config.tower
    l = ids.shape[1]
    embed = lambda n, rows: nn.Embed(  # noqa: E731
      rows,
      t.hidden_size,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (axes.VOCAB, axes.EMBED)
      ),
      name=n,
    )
    x = embed("token_embedding", c.vocab_size)(ids)
    x = x + embed("position_embedding", c.max_length)(jnp.arange(l))[None]
    allowed = jnp.tril(jnp.ones((1, l, l), bool))
    if mask is not None:
      allowed = allowed & (mask[:, None, :] > 0)  # [B, q, k]
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None]  # [B|1, 1, q, k]
    x = Encoder(t, self.dtype, self.param_dtype, name="encoder")(x, bias, skip_layers)
    x = _layer_norm(t.eps, self.param_dtype, "final_layer_norm")(x)
    if c.eos_token_id == 2:  # configs from before the eos fix: the highest id is the eos
      pos_eos = jnp.argmax(ids, -1)
    else:
      pos_eos = jnp.argmax((ids == c.eos_token_id).astype(jnp.int32), -1)
    return x, x[jnp.arange(x.shape[0]), pos_eos]


class CLIPTextModel(nn.Module):
  """transformers' ``CLIPTextModel``: ``apply({'params': p}, ids)`` → last hidden
  states [B, L, D] float32 (``last_hidden_state``; with ``skip_layers=k``, the
  final-LayerNormed output of layer ``num_layers - k``, diffusers' ``clip_skip``).

  Attributes:
    config: the ``CLIPTextConfig``.
    skip_layers: default number of final layers not run (0 = the last layer;
      overridden by the call's ``skip_layers``).
  """

  config: CLIPTextConfig
  skip_layers: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, ids: jax.Array, mask: Optional[jax.Array] = None, skip_layers: Optional[int] = None
  ) -> jax.Array:
    """ids: [B, L] int, mask: [B, L] or None (diffusers' SD passes none) → [B, L, D]."""
    skip = self.skip_layers if skip_layers is None else skip_layers
    tower = TextTransformer(self.config, self.dtype, self.param_dtype, name="text_model")
    return tower(ids, mask, skip)[0]


def hf_name(path: tuple[str, ...]) -> tuple[str, str]:
  """Flax param path of a CLIP tower → (transformers tensor name, layout), the
  layout being 'dense' (transpose), 'conv' (OIHW ↔ HWIO) or 'none'."""
  *mods, leaf = path
  mods = [m.replace("layers_", "layers.") for m in mods]
  if leaf == "class_embedding":
    return ".".join(mods + ["embeddings", leaf]), "none"
  if mods[-1] in ("token_embedding", "position_embedding", "patch_embedding"):
    mods = mods[:-1] + ["embeddings", mods[-1]]
  torch_leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
  kind = "none"
  if leaf == "kernel":
    kind = "conv" if "patch_embedding" in path else "dense"
  return ".".join(mods + [torch_leaf]), kind
