"""Multi-head softmax attention behind one function, with per-platform backends.

``attention(q, k, v, mask, impl=...)`` computes softmax(q·kᵀ)·v over keys whose
``mask`` is True (q comes pre-scaled; logits and softmax in float32). Backends
(``model.attention_impl``):

* ``xla``: einsum → masked softmax → einsum; materializes the [B, N, T, S] logits.
* ``chunked``: flash-style, in plain JAX: queries in tiles (``lax.map``), keys in
  blocks with an online softmax (``lax.scan``), and a custom backward that
  recomputes each tile's probabilities from the saved log-sum-exp; no full
  logits matrix in either pass, so each tile stays in cache on a CPU.
* ``cudnn``: cuDNN's fused flash attention (``jax.nn.dot_product_attention``,
  GPU, bf16/fp16, head dim ≤ 128 and a multiple of 8).
* ``splash``: the Pallas splash-attention kernel (TPU); the mask becomes
  segment ids, queries and keys are padded to its 128 blocks. The compiler
  cannot partition a Mosaic kernel, so on a mesh (``jax.set_mesh``) the call
  runs under ``jax.shard_map``: the batch split over the mesh's batch axes
  (``parallel.batch_axes`` under the ``nn.logical_axis_rules`` in scope), the
  heads over their rule's remaining axes (``tensor`` under tp/fsdp_tp).
* ``auto``: the fused kernel of the platform when the call qualifies, else
  ``chunked`` for long sequences (on a CPU T·S ≥ ``CHUNKED_MIN_TS``; on an
  accelerator logits over ``CHUNKED_MIN_LOGIT_BYTES``), else ``xla``.

A fused backend that cannot take a call (dtype, head dim) falls back to the
``auto`` choice among ``chunked`` and ``xla`` for that call. Asking for a
backend the platform lacks is a ValueError from ``check_impl`` (called when a
``UNetConfig`` is built), not an error inside tracing.
"""

import contextlib
import threading
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from imagen_jax import axes, parallel

IMPLS = ("auto", "xla", "cudnn", "splash", "chunked")
_PLATFORM_OF = {"cudnn": "gpu", "splash": "tpu"}
# Below this many logits per (example, head) the full matrix is small enough
# that XLA's one-shot einsum–softmax–einsum wins (the 4×4 … 16×16 levels).
CHUNKED_MIN_TS = 512 * 512
# On a GPU/TPU, ``auto`` falls back to ``chunked`` only above this many bytes of
# float32 logits per call (memory, not speed: see ``_fallback``).
CHUNKED_MIN_LOGIT_BYTES = 4 << 30
_NEG = float(jnp.finfo(jnp.float32).min)
_TARGET = threading.local()


@contextlib.contextmanager
def target_platform(platform: str):
  """Traces inside pick backends for ``platform`` ('tpu'), not the default backend:
  a program compiled ahead of time for TPU devices on a CPU machine (``train.aot``)."""
  before = getattr(_TARGET, "platform", None)
  _TARGET.platform = platform
  try:
    yield
  finally:
    _TARGET.platform = before


def _platform(platform: Optional[str]) -> str:
  return platform or getattr(_TARGET, "platform", None) or jax.default_backend()


def check_impl(impl: str, platform: Optional[str] = None) -> None:
  """Raises a one-line ValueError if ``impl`` is unknown or absent on ``platform``.

  Args:
    impl: one of ``IMPLS``.
    platform: 'cpu', 'gpu' or 'tpu' (default: ``jax.default_backend()``).
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown attention_impl {impl!r}; expected one of {IMPLS}")
  platform = _platform(platform)
  need = _PLATFORM_OF.get(impl)
  if need and platform != need:
    raise ValueError(
      f"attention_impl {impl!r} needs a {need.upper()} but this "
      f"platform is {platform!r}; use 'auto', 'chunked' or 'xla'"
    )


def xla_attention(q, k, v, mask=None, bias=None):
  """q: [B, T, N, D] (pre-scaled), k/v: [B, S, N, D], mask: [B, S] bool or None,
  bias: [N, T, S] added to the logits or None → [B, T, N, D]. Full logits, float32
  softmax."""
  logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + jnp.asarray(bias, jnp.float32)[None]
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, _NEG)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bnts,bsnd->btnd", weights, v)


def _cudnn_ok(q, k) -> bool:
  # cuDNN's flash kernel: half precision, head dim ≤ 128 and a multiple of 8, and
  # (its training kernel, with the mask as a bias) an even query length.
  d = q.shape[-1]
  return (
    q.dtype in (jnp.bfloat16, jnp.float16)
    and d <= 128
    and d % 8 == 0
    and k.dtype == q.dtype
    and q.shape[1] % 2 == 0
  )


def _fallback(q, k, platform: str) -> str:
  # On a CPU the chunked loop wins by keeping tiles in cache. On an accelerator its
  # sequential tiles (one (example, head) at a time) lose to XLA's fused softmax,
  # so there it only stands in when the full logits would not fit comfortably.
  b, t, n, _ = q.shape
  if platform == "cpu":
    return "chunked" if t * k.shape[1] >= CHUNKED_MIN_TS else "xla"
  return "chunked" if 4 * b * n * t * k.shape[1] > CHUNKED_MIN_LOGIT_BYTES else "xla"


def resolve_impl(impl: str, q, k, platform: Optional[str] = None) -> str:
  """The backend that runs a call of these shapes and dtypes (see module docstring)."""
  platform = _platform(platform)
  if impl == "auto":
    if platform == "gpu" and _cudnn_ok(q, k):
      return "cudnn"
    if platform == "tpu" and q.shape[1] >= 128 and k.shape[1] >= 128:
      return "splash"
    return _fallback(q, k, platform)
  if impl == "cudnn" and not _cudnn_ok(q, k):
    return _fallback(q, k, platform)
  return impl


def attention(q, k, v, mask=None, *, impl: str = "auto"):
  """Softmax attention through the chosen backend.

  Args:
    q: [B, T, N, D], already multiplied by the softmax scale.
    k, v: [B, S, N, D].
    mask: [B, S] bool, True on keys to attend to; None attends to all.
    impl: one of ``IMPLS``.

  Returns:
    [B, T, N, D] in v's dtype.
  """
  which = resolve_impl(impl, q, k)
  if which == "xla":
    return xla_attention(q, k, v, mask)
  if which == "chunked":
    return chunked_attention(q, k, v, mask)
  if which == "cudnn":
    return _cudnn_attention(q, k, v, mask)
  if which == "splash":
    return _splash_on_mesh(q, k, v, mask)
  raise ValueError(f"unknown attention_impl {impl!r}; expected one of {IMPLS}")


def _cudnn_attention(q, k, v, mask):
  # The key mask goes in as a bias, which cuDNN wants as [B, 1, T, S] (full query
  # length) and, in its training kernel, with an even S: pad one masked key when
  # S is odd. (Sorting the valid keys first and passing key_value_seq_lengths
  # would use its padding mask instead of a bias: a possible speed-up, untried.)
  b, t = q.shape[:2]
  s = k.shape[1]
  if mask is not None or s % 2:
    mask = jnp.ones((b, s), bool) if mask is None else mask.astype(bool)
    if s % 2:
      pad = ((0, 0), (0, 1), (0, 0), (0, 0))
      k, v = jnp.pad(k, pad), jnp.pad(v, pad)
      mask = jnp.pad(mask, ((0, 0), (0, 1)))
    mask = jnp.broadcast_to(mask[:, None, None, :], (b, 1, t, mask.shape[1]))
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, implementation="cudnn")


def _names(entry) -> tuple:
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _shard_specs(mesh, rules, b: int, n: int) -> tuple:
  """(spec of q/k/v [B, L, N, D], spec of the mask [B, S]) on ``mesh``: the batch over
  its batch axes, the heads over their rule's other axes; an axis that does not
  divide its dimension is left out (that dimension replicates)."""
  size = lambda names: int(np.prod([mesh.shape[a] for a in names]))
  batch, _ = parallel.batch_axes(mesh, rules)
  batch = batch if b % size(batch) == 0 else ()
  heads = _names(nn.logical_to_mesh_axes((axes.HEADS,), tuple(rules))[0])
  heads = tuple(a for a in heads if a in mesh.shape and a not in batch)
  heads = heads if n % size(heads) == 0 else ()
  entry = lambda names: names or None
  return P(entry(batch), None, entry(heads), None), P(entry(batch), None)


def _splash_on_mesh(q, k, v, mask):
  """``_splash_attention``, under ``jax.shard_map`` when a mesh of several devices is
  set (``jax.set_mesh``): each device runs the kernel on its examples and heads."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _splash_attention(q, k, v, mask)
  spec, mask_spec = _shard_specs(mesh, nn.get_logical_axis_rules(), q.shape[0], q.shape[2])
  mask = jnp.ones(k.shape[:2], bool) if mask is None else mask.astype(bool)
  # check_vma off: the Pallas call has no replication rule; the outputs follow the specs.
  return jax.shard_map(
    _splash_attention,
    mesh=mesh,
    in_specs=(spec, spec, spec, mask_spec),
    out_specs=spec,
    check_vma=False,
  )(q, k, v, mask)


def _splash_attention(q, k, v, mask, block: int = 128, interpret: bool = False):
  """Splash attention per example (``interpret``: Pallas' interpreter, for CPU tests)."""
  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash,
    splash_attention_mask as splash_mask,
  )

  b, t, n, _ = q.shape
  s = k.shape[1]
  tp, sp = -(-t // block) * block, -(-s // block) * block
  mask = jnp.ones((b, s), bool) if mask is None else mask.astype(bool)
  # Masked and padded keys get segment 1, every query segment 0.
  kv_ids = jnp.pad(jnp.where(mask, 0, 1), ((0, 0), (0, sp - s)), constant_values=1)
  q_ids = jnp.zeros((b, tp), jnp.int32)
  heads_first = lambda x, L: jnp.pad(x, ((0, 0), (0, L - x.shape[1]), (0, 0), (0, 0))).transpose(
    0, 2, 1, 3
  )
  kernel = splash.make_splash_mha_single_device(
    splash_mask.MultiHeadMask([splash_mask.FullMask((tp, sp))] * n),
    block_sizes=splash.BlockSizes(
      block_q=block,
      block_kv=block,
      block_kv_compute=block,
      block_q_dkv=block,
      block_kv_dkv=block,
      block_kv_dkv_compute=block,
      block_q_dq=block,
      block_kv_dq=block,
    ),
    interpret=interpret,
  )
  out = jax.vmap(
    lambda q1, k1, v1, qi, ki: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(qi, ki))
  )(heads_first(q, tp), heads_first(k, sp), heads_first(v, sp), q_ids, kv_ids.astype(jnp.int32))
  return out.transpose(0, 2, 1, 3)[:, :t].astype(v.dtype)


def chunked_attention(q, k, v, mask=None, *, q_chunk: int = 256, k_chunk: int = 2048):
  """Flash-style attention in plain JAX; same contract as ``xla_attention``.

  Queries run in tiles of ``q_chunk`` (``lax.map``), keys in blocks of
  ``k_chunk`` with an online softmax (``lax.scan``; one block when S ≤
  ``k_chunk``). The backward recomputes each tile's probabilities from the
  saved row max and sum. Ragged T and S are padded (padded keys masked).
  On the 2-core CPU a 256×1101 float32 tile (1.1 MB) stays in L2, where the
  full logits (72 MB at the IF 32×32 shape) do not.
  """
  b, t, n, d = q.shape
  s = k.shape[1]
  mask = jnp.ones((b, s), bool) if mask is None else mask.astype(bool)
  qc, kc = min(q_chunk, t), min(k_chunk, s)
  nq, nk = -(-t // qc), -(-s // kc)
  heads_first = lambda x, L: jnp.pad(
    x.transpose(0, 2, 1, 3).reshape(b * n, x.shape[1], d), ((0, 0), (0, L - x.shape[1]), (0, 0))
  )
  qh = heads_first(q, nq * qc).reshape(b * n, nq, qc, d)
  kh = heads_first(k, nk * kc).reshape(b * n, nk, kc, d)
  vh = heads_first(v, nk * kc).reshape(b * n, nk, kc, d)
  mh = jnp.pad(jnp.repeat(mask, n, axis=0), ((0, 0), (0, nk * kc - s))).reshape(b * n, nk, kc)
  out = _flash(qh, kh, vh, mh)  # [BN, nq, qc, D]
  out = out.reshape(b, n, nq * qc, d)[:, :, :t]
  return out.transpose(0, 2, 1, 3)


def _logits(qt, kb, mb):
  """qt: [qc, D], kb: [kc, D], mb: [kc] → masked float32 logits [qc, kc]."""
  s = jnp.einsum("qd,kd->qk", qt, kb, preferred_element_type=jnp.float32)
  return jnp.where(mb[None, :], s, _NEG)


def _fwd_tile(qt, kh, vh, mh):
  """One query tile against all key blocks → (out [qc, D], row max [qc], row sum [qc])."""

  def block(carry, xs):
    mx, l, acc = carry
    kb, vb, mb = xs
    s = _logits(qt, kb, mb)
    mx_new = jnp.maximum(mx, s.max(-1))
    p = jnp.exp(s - mx_new[:, None])
    c = jnp.exp(mx - mx_new)
    acc = acc * c[:, None] + jnp.einsum(
      "qk,kd->qd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32
    )
    return (mx_new, l * c + p.sum(-1), acc), None

  qc, d = qt.shape
  init = (jnp.full((qc,), -jnp.inf), jnp.zeros((qc,)), jnp.zeros((qc, d)))
  if kh.shape[0] == 1:  # no loop when every key fits one block (the common case)
    (mx, l, acc), _ = block(init, (kh[0], vh[0], mh[0]))
  else:
    (mx, l, acc), _ = lax.scan(block, init, (kh, vh, mh))
  return (acc / l[:, None]).astype(vh.dtype), mx, l


@jax.custom_vjp
def _flash(qh, kh, vh, mh):
  """qh: [BN, nq, qc, D], kh/vh: [BN, nk, kc, D], mh: [BN, nk, kc] → [BN, nq, qc, D]."""
  return _flash_fwd(qh, kh, vh, mh)[0]


def _flash_fwd(qh, kh, vh, mh):
  per_head = lambda a: lax.map(lambda qt: _fwd_tile(qt, *a[1:]), a[0])
  out, mx, l = lax.map(per_head, (qh, kh, vh, mh))
  return out, (qh, kh, vh, mh, out, mx, l)


def _bwd_head(qh, kh, vh, mh, out, mx, l, dout):
  """One (example, head): gradients for its query tiles and key blocks."""
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [nq, qc]

  def q_tile(carry, xs):
    qt, dt, mxt, lt, deltat = xs

    def k_block(dq, blk):
      kb, vb, mb = blk
      p = jnp.exp(_logits(qt, kb, mb) - mxt[:, None]) / lt[:, None]  # [qc, kc]
      dv = jnp.einsum("qk,qd->kd", p.astype(dt.dtype), dt, preferred_element_type=jnp.float32)
      dp = jnp.einsum("qd,kd->qk", dt, vb, preferred_element_type=jnp.float32)
      ds = jnp.where(mb[None, :], p * (dp - deltat[:, None]), 0.0).astype(qt.dtype)
      dq = dq + jnp.einsum("qk,kd->qd", ds, kb, preferred_element_type=jnp.float32)
      return dq, (jnp.einsum("qk,qd->kd", ds, qt, preferred_element_type=jnp.float32), dv)

    dq0 = jnp.zeros(qt.shape, jnp.float32)
    if kh.shape[0] == 1:
      dq, (dk, dv) = k_block(dq0, (kh[0], vh[0], mh[0]))
      dk, dv = dk[None], dv[None]
    else:
      dq, (dk, dv) = lax.scan(k_block, dq0, (kh, vh, mh))
    return (carry[0] + dk, carry[1] + dv), dq

  zeros = jnp.zeros(kh.shape, jnp.float32)
  (dk, dv), dq = lax.scan(q_tile, (zeros, zeros), (qh, dout, mx, l, delta))
  return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype)


def _flash_bwd(res, dout):
  dq, dk, dv = lax.map(lambda a: _bwd_head(*a), res + (dout,))
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
