"""benchmarks/sharding.py: HLO collective accounting, memory figures, the CLI."""

import json

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks import sharding as bench
from imagen_jax import config as config_lib
from imagen_jax.parallel import hlo
import tiny


def test_shape_bytes():
  """The benchmark's byte counts come from the one HLO reader (imagen_jax.parallel.hlo)."""
  assert hlo.shape_bytes("f32[8,16]{1,0}") == 8 * 16 * 4
  assert hlo.shape_bytes("(bf16[4,2]{1,0}, f32[], pred[3])") == 16 + 4 + 3
  assert hlo.shape_bytes("token[]") == 0


def test_collective_bytes_of_a_sharded_matmul():
  """An fsdp-sharded weight is all-gathered: the operand is one device's shard."""
  mesh = jax.make_mesh((8,), ("fsdp",))
  w_s, x_s = NamedSharding(mesh, P("fsdp", None)), NamedSharding(mesh, P("fsdp"))

  def f(w, x):
    return jnp.tanh(x @ w).sum()

  compiled = (
    jax.jit(f, in_shardings=(w_s, x_s))
    .lower(
      jax.ShapeDtypeStruct((512, 256), jnp.float32, sharding=w_s),
      jax.ShapeDtypeStruct((64, 512), jnp.float32, sharding=x_s),
    )
    .compile()
  )
  out = hlo.collective_bytes(compiled)
  assert out["all-gather"] == 512 // 8 * 256 * 4
  assert out["all-reduce"] > 0  # the per-device partial sums
  assert set(out) == set(hlo.COLLECTIVES)


def test_mesh_shapes_and_peaks():
  assert bench.mesh_shape("dp", 8, 2) == {"data": 8}
  assert bench.mesh_shape("fsdp", 8, 2) == {"fsdp": 8}
  assert bench.mesh_shape("tp", 8, 2) == {"data": 4, "tensor": 2}
  assert bench.mesh_shape("fsdp_tp", 8, 4) == {"fsdp": 2, "tensor": 4}
  with pytest.raises(ValueError, match="does not divide"):
    bench.mesh_shape("tp", 8, 3)
  with pytest.raises(ValueError, match="unknown strategy"):
    bench.mesh_shape("zero3", 8, 2)
  assert bench.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert bench.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
  assert bench.peak_flops("NVIDIA H200") == 989.4e12
  assert bench.peak_flops("TPU v5 lite") == 197e12
  assert bench.peak_flops("cpu") is None


@pytest.fixture(scope="module")
def tiny_config():
  return config_lib.load_config("configs/demo.py:tiny")


@pytest.mark.slow
def test_fsdp_row_splits_state_and_runs(tiny_config):
  devices = jax.devices()[:8]
  flops = bench.model_flops(tiny_config, "base", 8)
  assert flops and flops > 1e6
  row = bench.bench_strategy(
    tiny_config, "base", "fsdp", devices, batch=8, steps=1, warmup=0, flops=flops
  )
  assert row.status == "ok", row.status
  assert row.state_ratio <= 1.15  # the FSDP target
  assert row.state_bytes * 8 == pytest.approx(row.state_bytes_total, rel=0.15)
  assert row.collective_bytes["all-gather"] > 0  # params gathered for compute
  assert row.peak_bytes >= row.argument_bytes > row.state_bytes
  assert row.step_s > 0 and row.images_per_s == pytest.approx(8 / row.step_s)
  assert row.tflops_per_s == pytest.approx(flops / row.step_s / 1e12)
  assert row.mfu is None  # no known CPU peak


def test_a_strategy_that_does_not_fit_is_reported(tiny_config, monkeypatch):
  monkeypatch.setattr(bench, "_memory_limit", lambda device, n=1: 1024)
  row = bench.bench_strategy(
    tiny_config, "base", "dp", jax.devices()[:8], batch=8, steps=1, warmup=0
  )
  assert row.status.startswith("does not fit"), row.status
  assert row.step_s is None
  assert row.state_ratio == pytest.approx(8.0)  # replicated on every device
  table = bench.format_table([row])
  assert "does not fit" in table and "| dp |" in table


def test_batch_that_does_not_split_is_an_error_row(tiny_config):
  row = bench.bench_strategy(tiny_config, "base", "dp", jax.devices()[:8], batch=6)
  assert row.status.startswith("error: batch 6")


def test_cli_rejects_unknown_strategy(capsys):
  argv = ["--config", tiny.DEMO_TINY, "--devices", "2", "--strategies", "dp,zero3"]
  assert bench.main(argv) == 2
  assert "unknown strategies ['zero3']" in capsys.readouterr().err


def test_cli_runs_every_strategy_remat_and_microbatch_count(monkeypatch, tmp_path):
  """The lists of the README's commands become one row each (the rows' own compile and
  run are tested above; each README command runs one value of each list)."""
  calls = []

  def fake_row(config, stage_name, strategy, devices, **kw):
    calls.append((strategy, kw["remat"], kw["grad_accum"]))
    return bench.Row(strategy=strategy, mesh={}, remat=kw["remat"], grad_accum=kw["grad_accum"])

  monkeypatch.setattr(bench, "bench_strategy", fake_row)
  monkeypatch.setattr(bench, "model_flops", lambda *a: 1.0)
  argv = ["--config", tiny.DEMO_TINY, "--devices", "8", "--strategies", "dp,fsdp_tp"]
  argv += ["--remat", "none,full", "--grad_accum", "1,2", "--json", str(tmp_path / "r.json")]
  assert bench.main(argv) == 0
  assert calls == [(s, r, k) for r in ("none", "full") for s in ("dp", "fsdp_tp") for k in (1, 2)]
  assert len(json.load(open(tmp_path / "r.json"))["rows"]) == 8
