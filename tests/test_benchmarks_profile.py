"""benchmarks/op_profile.py and benchmarks/kernels.py on tiny inputs (no PyTorch)."""

import jax
import jax.numpy as jnp

from benchmarks import kernels, op_profile


def _conv_then_dense(x, w, m):
  y = jax.lax.conv_general_dilated(
    x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return jnp.tanh(y.reshape(y.shape[0], -1) @ m).sum()


def _args():
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  return (
    jax.random.normal(k[0], (2, 8, 8, 4)),
    jax.random.normal(k[1], (3, 3, 4, 4)),
    jax.random.normal(k[2], (256, 16)),
  )


def test_op_kinds_names_convolutions_and_dots():
  hlo = jax.jit(_conv_then_dense).lower(*_args()).compile().as_text()
  kinds = op_profile.op_kinds(hlo)
  assert "convolution" in kinds.values()
  assert "dot" in kinds.values()
  assert set(kinds.values()) <= set(op_profile._KINDS)


def test_profile_attributes_time_to_the_ops():
  totals, wall = op_profile.profile(jax.jit(_conv_then_dense), _args(), calls=2)
  assert wall > 0
  assert totals.get("convolution", 0) > 0 and totals.get("dot", 0) > 0
  assert sum(totals.values()) < 10 * wall  # per call, not summed over calls


def test_kernel_table_without_torch(monkeypatch):
  monkeypatch.setattr(kernels, "CONVS", ((1, 8, 8, 8),))
  monkeypatch.setattr(kernels, "ATTENTION", (1, 16, 4, 2, 8))
  monkeypatch.setattr(kernels, "GROUP_NORM", (1, 8, 8, 4))
  rows = kernels.run(repeats=1, with_torch=False)
  assert [r["kernel"].split()[0] for r in rows] == [
    "conv3x3",
    "conv3x3",
    "group",
    "group",
    "attention",
    "attention",
    "attention",
  ]
  # one attention row per backend a CPU runs; auto's pick is marked (xla at this size)
  assert [r["kernel"].split("(")[1].split(",")[0] for r in rows[4:]] == [
    "xla = auto",
    "jax.nn.dot_product_attention xla",
    "chunked",
  ]
  assert rows[1]["kernel"].endswith("weight gradient only")
  assert all(r["jax_fwd_ms"] > 0 and r["jax_fwd_bwd_ms"] > 0 for r in rows)
  assert "torch" not in kernels.format_table(rows)
