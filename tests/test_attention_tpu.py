"""The splash attention kernel on a sharded TPU mesh (issue 22 follow-up).

A Mosaic (Pallas) kernel cannot be partitioned by the compiler, so on a mesh the
splash call runs under ``jax.shard_map`` (``models.attention``). These tests
compile a micro model's train step for a 4-chip TPU topology on this CPU machine
(``train.aot``) with ``attention_impl='auto'``, which picks splash on a TPU for
the 16×16 level's self_cross attention (256 queries, 8 + 256 keys, two heads). They need
libtpu and are skipped without it.

tests/conftest.py sets jax_default_matmul_precision='highest' (CPU numerics); Mosaic
refuses a float32-precision matmul of bfloat16 operands ("Bad lhs type"), so the
compiles here run under the default precision, as training does.
"""

import pytest

from imagen_jax import config as config_lib
from imagen_jax import parallel
from imagen_jax.parallel import topology as topo_lib

needs_libtpu = pytest.mark.skipif(
  not topo_lib.libtpu_available(),
  reason="libtpu is not installed (pip install -r requirements-dev.txt brings it)",
)

_CONFIG_FILE = """
from imagen_jax import config as config_lib


def get_config(variant=""):
  c = config_lib.base_config()
  c.text.update(dict(dim=16, max_length=8, dtype="float32", random=dict(
    vocab_size=384, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)))
  m = dict(channels=(16, 16), num_res_blocks=1, attention=("self_cross", "none"),
           mid_attention="none", mid_block=False, head_dim=8, text_dim=16,
           text_pool="mean", norm_groups=4, dtype="bfloat16", attention_impl="auto")
  config_lib.add_stage(c, config_lib.stage_config("base", 16, m))
  c.train.batch_size = 8
  return c
"""


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
  path = tmp_path_factory.mktemp("cfg") / "splash_micro.py"
  path.write_text(_CONFIG_FILE)
  return config_lib.load_config(str(path))


@needs_libtpu
@pytest.mark.parametrize("strategy", ["fsdp", "dp", "fsdp_tp"])
def test_splash_forward_and_grad_compile_on_a_sharded_mesh(strategy):
  """attention(impl='auto') on the v5e:2x2 mesh of a strategy: the splash kernel
  (a Mosaic custom call) compiles, forward and gradient, batch split 4 ways."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from imagen_jax.models import attention

  topo = topo_lib.parse("v5e:2x2")
  mesh = topo_lib.make_mesh(topo_lib.strategy_mesh(strategy, 4), topo_lib.devices(topo))
  rules = parallel.logical_rules(strategy)
  split = NamedSharding(mesh, P(parallel.batch_axes(mesh, rules)[0]))
  q = jax.ShapeDtypeStruct((8, 256, 2, 8), jnp.bfloat16, sharding=split)
  k = jax.ShapeDtypeStruct((8, 264, 2, 8), jnp.bfloat16, sharding=split)
  mask = jax.ShapeDtypeStruct((8, 264), bool, sharding=split)
  loss = lambda q, k, v, m: attention.attention(q, k, v, m).astype(jnp.float32).sum()
  for fn in (loss, jax.grad(loss, argnums=(0, 1, 2))):
    with attention.target_platform("tpu"), jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      with jax.default_matmul_precision("default"):
        compiled = jax.jit(fn).lower(q, k, k, mask).compile()
    assert "tpu_custom_call" in compiled.as_text()


@needs_libtpu
@pytest.mark.parametrize("strategy", ["fsdp", "dp", "fsdp_tp"])
def test_train_step_with_splash_compiles_on_a_sharded_mesh(micro, strategy):
  import jax

  from imagen_jax.train import aot

  topo = topo_lib.parse("v5e:2x2")
  devices = topo_lib.devices(topo)
  mesh = topo_lib.strategy_mesh(strategy, 4)
  with jax.default_matmul_precision("default"):
    report, compiled = aot.compile_train(
      micro, "base", topo, devices, mesh, parallel.logical_rules(strategy),
      strategy=strategy, batch=8,
    )  # fmt: skip
  assert compiled is not None and report.status == "ok", report.status
  # The splash kernel is in the program (a Mosaic custom call), not a fallback.
  assert "tpu_custom_call" in compiled.as_text()
