"""The T5 encoder stack as Flax linen modules (v1.0, v1.1 / Flan-T5, mT5, ByT5).

One module tree covers every T5 encoder variant that Hugging Face ships; they
differ only in the feed-forward block (``feed_forward_proj``: ``relu`` for T5
v1.0, ``gated-gelu`` for v1.1, Flan-T5 and ByT5) and in sizes. T5's
conventions, all kept here:

- RMS layer norm (no mean subtraction, no bias), statistics in float32 even
  when the rest runs in bfloat16;
- no biases anywhere;
- attention logits are NOT scaled by 1/sqrt(d_kv) (the scale is folded into
  the initialization of the query projection);
- bidirectional relative-position buckets, one bias table owned by the stack
  and shared by all layers (Hugging Face stores it in layer 0).

Parameters carry logical axis names from ``imagen_jax.axes`` so that the same
code shards under any rules table.
"""

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import axes

Array = jax.Array
Dtype = Any

# Hugging Face `ACT2FN` names that T5 configs use, mapped to jax functions.
# `gelu_new` (what "gated-gelu" maps to) is the tanh approximation.
ACTIVATIONS: Mapping[str, Callable[[Array], Array]] = {
  "relu": jax.nn.relu,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Sizes and options of a T5 encoder (a subset of Hugging Face's `T5Config`).

  Attributes:
    vocab_size: rows of the token embedding.
    d_model: width of the residual stream (D).
    d_kv: width of one attention head.
    d_ff: hidden width of the feed-forward block.
    num_layers: encoder blocks.
    num_heads: attention heads (H).
    relative_attention_num_buckets: relative-position buckets.
    relative_attention_max_distance: distance beyond which buckets saturate.
    layer_norm_epsilon: epsilon of the RMS norms.
    feed_forward_proj: ``"relu"``, ``"gated-gelu"``, ``"gated-silu"``, ...
  """

  vocab_size: int = 384
  d_model: int = 128
  d_kv: int = 32
  d_ff: int = 256
  num_layers: int = 4
  num_heads: int = 4
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"

  def __post_init__(self):
    parts = self.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r} is not 'ACT' or 'gated-ACT'")
    if self.dense_act_fn not in ACTIVATIONS:
      raise ValueError(
        f"unsupported T5 activation {self.dense_act_fn!r} "
        f"(from feed_forward_proj={self.feed_forward_proj!r}); "
        f"supported: {sorted(ACTIVATIONS)}"
      )

  @property
  def is_gated_act(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def dense_act_fn(self) -> str:
    """The activation name, resolved exactly as transformers' `T5Config` does."""
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"  # Backwards compatibility in transformers: tanh GELU.
    return self.feed_forward_proj.split("-")[-1]

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], strict: bool = False) -> "T5Config":
    """Builds a config from a mapping (e.g. a parsed config.json).

    Args:
      d: field values; missing fields keep the defaults above.
      strict: raise on keys that are not fields (else they are ignored, as
        Hugging Face configs carry many decoder/training keys).

    Returns:
      The config.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if strict and unknown:
      raise ValueError(f"unknown T5Config fields {unknown}")
    return cls(**{k: v for k, v in dict(d).items() if k in names})


def relative_position_buckets(
  query_length: int, key_length: int, num_buckets: int, max_distance: int
) -> np.ndarray:
  """Bidirectional T5 relative-position buckets, computed once on the host.

  The arithmetic follows Mesh TensorFlow / transformers in float32 (including
  the float32 log), so bucket boundaries land on the same integers.

  Args:
    query_length: Lq.
    key_length: Lk.
    num_buckets: total buckets (half for each direction).
    max_distance: distances >= this share the last bucket of each direction.

  Returns:
    [Lq, Lk] int32 bucket indices in [0, num_buckets).
  """
  rel = (
    np.arange(key_length, dtype=np.int64)[None, :]
    - np.arange(query_length, dtype=np.int64)[:, None]
  )
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  rel = np.abs(rel)
  max_exact = half // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore"):
    ratio = np.log(rel.astype(np.float32) / np.float32(max_exact))
  scaled = ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
  # Small distances (including the -inf at 0) are taken from `rel` below.
  scaled = np.where(is_small, 0.0, scaled).astype(np.float32)
  large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
  buckets = buckets + np.where(is_small, rel, large)
  return buckets.astype(np.int32)


def _normal(std: float) -> Callable[..., Array]:
  return nn.initializers.normal(stddev=std)


class RMSNorm(nn.Module):
  """T5 layer norm: x / rms(x) * scale, statistics in float32.

  Attributes:
    epsilon: added to the mean square.
    dtype: output dtype.
    param_dtype: dtype of the scale.
  """

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [..., D] -> [..., D] in `dtype`."""
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
      (x.shape[-1],),
      self.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + self.epsilon)).astype(self.dtype)
    return y * scale.astype(self.dtype)


class SelfAttention(nn.Module):
  """Unscaled multi-head self-attention with an additive position bias.

  Attributes:
    num_heads: H.
    d_kv: width of one head.
    dtype: compute dtype (logits and softmax run in float32).
    param_dtype: storage dtype of the projections.
    mesh: optional mesh for activation sharding constraints.
  """

  num_heads: int
  d_kv: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  mesh: Any = None

  def _proj(self, name: str, shape, names, std: float) -> Array:
    init = nn.with_logical_partitioning(_normal(std), names)
    return self.param(name, init, shape, self.param_dtype).astype(self.dtype)

  @nn.compact
  def __call__(self, x: Array, bias: Array, mask: Array) -> Array:
    """Attends every token to the unmasked tokens.

    Args:
      x: [B, L, D] normed hidden states.
      bias: [H, L, L] float32 relative-position bias.
      mask: [B, L] bool, True for real tokens.

    Returns:
      [B, L, D] in `dtype`.
    """
    d, h, k = x.shape[-1], self.num_heads, self.d_kv
    in_names = (axes.EMBED, axes.HEADS, axes.KV)
    q = self._proj("q", (d, h, k), in_names, (d * k) ** -0.5)
    kk = self._proj("k", (d, h, k), in_names, d**-0.5)
    v = self._proj("v", (d, h, k), in_names, d**-0.5)
    o = self._proj("o", (h, k, d), (axes.HEADS, axes.KV, axes.EMBED), (h * k) ** -0.5)
    x = x.astype(self.dtype)
    qh = jnp.einsum("bld,dhk->bhlk", x, q)
    kh = jnp.einsum("bld,dhk->bhlk", x, kk)
    vh = jnp.einsum("bld,dhk->bhlk", x, v)
    heads = (axes.BATCH, axes.HEADS, axes.LENGTH, axes.KV)
    qh = nn.with_logical_constraint(qh, heads, mesh=self.mesh)
    logits = jnp.einsum("bhqk,bhmk->bhqm", qh, kh, preferred_element_type=jnp.float32)
    logits = logits + bias[None].astype(jnp.float32)
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqm,bhmk->bhqk", weights, vh)
    return jnp.einsum("bhlk,hkd->bld", out, o)


class FeedForward(nn.Module):
  """T5 FFN: wo(act(wi x)) or, gated, wo(act(wi_0 x) * wi_1 x).

  Attributes:
    d_ff: hidden width.
    activation: a key of `ACTIVATIONS`.
    gated: whether the block is gated (v1.1).
    dtype: compute dtype.
    param_dtype: storage dtype.
    mesh: optional mesh for activation sharding constraints.
  """

  d_ff: int
  activation: str
  gated: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  mesh: Any = None

  def _kernel(self, name: str, shape, names) -> Array:
    init = nn.with_logical_partitioning(_normal(shape[0] ** -0.5), names)
    return self.param(name, init, shape, self.param_dtype).astype(self.dtype)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, L, D] -> [B, L, D] in `dtype`."""
    d = x.shape[-1]
    act = ACTIVATIONS[self.activation]
    x = x.astype(self.dtype)
    in_names = (axes.EMBED, axes.MLP)
    if self.gated:
      h = act(x @ self._kernel("wi_0", (d, self.d_ff), in_names))
      h = h * (x @ self._kernel("wi_1", (d, self.d_ff), in_names))
    else:
      h = act(x @ self._kernel("wi", (d, self.d_ff), in_names))
    h = nn.with_logical_constraint(h, (axes.BATCH, axes.LENGTH, axes.MLP), mesh=self.mesh)
    return h @ self._kernel("wo", (self.d_ff, d), (axes.MLP, axes.EMBED))


class EncoderBlock(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)).

  Attributes:
    config: the model sizes.
    dtype: compute dtype.
    param_dtype: storage dtype.
    mesh: optional mesh for activation sharding constraints.
  """

  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  mesh: Any = None

  @nn.compact
  def __call__(self, x: Array, bias: Array, mask: Array) -> Array:
    """x: [B, L, D], bias: [H, L, L], mask: [B, L] bool -> [B, L, D]."""
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(c.layer_norm_epsilon, name="attn_norm", **kw)(x)
    x = x + SelfAttention(c.num_heads, c.d_kv, mesh=self.mesh, name="attn", **kw)(h, bias, mask)
    h = RMSNorm(c.layer_norm_epsilon, name="mlp_norm", **kw)(x)
    x = x + FeedForward(c.d_ff, c.dense_act_fn, c.is_gated_act, mesh=self.mesh, name="mlp", **kw)(h)
    return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED), mesh=self.mesh)


class T5Encoder(nn.Module):
  """The T5 encoder stack: token embedding -> blocks -> final RMS norm.

  Attributes:
    config: the model sizes.
    dtype: compute dtype (float32 or bfloat16); norms keep float32 statistics.
    param_dtype: storage dtype of the parameters.
    mesh: optional mesh; activation constraints apply only under
      `nn.logical_axis_rules`.
  """

  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  mesh: Any = None

  @nn.compact
  def __call__(self, input_ids: Array, mask: Array) -> Array:
    """Encodes token ids.

    Args:
      input_ids: [B, L] int token ids.
      mask: [B, L] bool (or 0/1), True for real tokens.

    Returns:
      [B, L, D] hidden states in `dtype` (padded positions are computed too,
      as in transformers; use `mask` downstream).
    """
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mask = mask.astype(bool)
    embedding = self.param(
      "token_embed",
      nn.with_logical_partitioning(_normal(1.0), (axes.VOCAB, axes.EMBED)),
      (c.vocab_size, c.d_model),
      self.param_dtype,
    )
    rel_table = self.param(
      "relpos_bias",
      nn.with_logical_partitioning(_normal(c.d_model**-0.5), (axes.RELPOS, axes.HEADS)),
      (c.relative_attention_num_buckets, c.num_heads),
      self.param_dtype,
    )
    length = input_ids.shape[1]
    buckets = relative_position_buckets(
      length, length, c.relative_attention_num_buckets, c.relative_attention_max_distance
    )
    # [L, L, H] -> [H, L, L], shared by every block.
    bias = jnp.transpose(jnp.take(rel_table, buckets, axis=0), (2, 0, 1))
    x = jnp.take(embedding, input_ids, axis=0).astype(self.dtype)
    x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED), mesh=self.mesh)
    for i in range(c.num_layers):
      x = EncoderBlock(c, mesh=self.mesh, name=f"block_{i}", **kw)(x, bias, mask)
    return RMSNorm(c.layer_norm_epsilon, name="final_norm", **kw)(x)
