"""TPU topology compiles on a CPU machine (``imagen_jax.train.aot``, issue 22).

The compiling tests need libtpu (``jax[tpu]`` in requirements-dev.txt) and are
skipped without it; the bad-input and no-libtpu tests always run. The model is
a micro config (two 8-wide levels, a one-layer T5) so each compile takes
seconds of CPU.
"""

import os

import pytest

from imagen_jax import config as config_lib
from imagen_jax import parallel
from imagen_jax.parallel import topology as topo_lib
import tiny

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
  width = int(variant or 8)
  m = dict(channels=(width, width), num_res_blocks=1, attention=("none", "cross"),
           mid_attention="none", mid_block=False, head_dim=8, text_dim=16,
           text_pool="mean", norm_groups=4, dtype="bfloat16")
  config_lib.add_stage(c, config_lib.stage_config("base", 8, m))
  c.stages.base.sample.steps = 2
  c.train.batch_size = 8
  c.mesh.shape = {"data": -1}
  c.mesh.strategy = "dp"
  return c
"""


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("cfg") / "micro.py"
  path.write_text(_CONFIG_FILE)
  return str(path)


@pytest.fixture(scope="module")
def micro(config_path):
  return config_lib.load_config(config_path)


@pytest.mark.parametrize(
  "name, message",
  [
    ("v9:2x2", "unknown TPU generation 'v9'"),
    ("v5p-128", "is not a topology name"),
    ("v5e:0x2", "every dimension must be >= 1"),
  ],
)
def test_bad_topology_names(name, message):
  with pytest.raises(topo_lib.TopologyError, match=message) as err:
    topo_lib.parse(name)
  assert "\n" not in str(err.value) and "v5p:4x4x4" in str(err.value)


def test_topology_chips_and_checks():
  topo = topo_lib.parse("v5p:4x4x4", num_slices=2)
  assert topo.chips == 128 and topo.chip.hbm_bytes == 95 << 30
  with pytest.raises(topo_lib.TopologyError, match=r"mesh \{'fsdp': 3\} does not divide the 128"):
    topo_lib.check_mesh({"fsdp": 3}, topo)
  with pytest.raises(topo_lib.TopologyError, match="--batch=100 does not divide .* size 64 × 2"):
    topo_lib.check_batch(100, 64, 2)


def _run(main, argv, capsys):
  code = main(argv)
  out = capsys.readouterr()
  return code, out.out.strip(), out.err.strip()


def test_cli_bad_input_one_line(config_path, capsys):
  import train
  from benchmarks import sampling, sharding

  cases = [
    (sharding.main, ["--config", config_path, "--topology", "v7x:2x2"], "unknown TPU generation"),
    (
      sharding.main,
      ["--config", config_path, "--topology", "v5e:2x2", "--strategies", "dp", "--batch", "6"],
      "--batch=6 does not divide over the data-parallel size 4",
    ),
    (
      sampling.main,
      ["--config", config_path, "--topology", "v5e:2x2", "--batch", "3"],
      "--batch=3 does not divide over the data-parallel size 4",
    ),
    (
      train.main,
      [
        "--config",
        config_path,
        "--compile_only",
        "--topology",
        "v5e:2x2",
        "--config.mesh.shape={'fsdp': 3}",
      ],
      "does not divide the 4 chips of v5e:2x2",
    ),  # fmt: skip
    (
      train.main,
      [
        "--config",
        config_path,
        "--compile_only",
        "--topology",
        "v4:2x2x1",
        "--config.train.batch_size=6",
      ],
      "--batch=6 does not divide over the data-parallel size 4",
    ),  # fmt: skip
  ]
  for main, argv, message in cases:
    code, _, err = _run(main, argv, capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)


def test_compile_only_refused_without_libtpu(config_path, capsys, monkeypatch):
  import train

  monkeypatch.setattr(topo_lib, "libtpu_available", lambda: False)
  code, out, err = _run(train.main, ["--config", config_path, "--compile_only", "--topology",
                                     "v5e:2x2"], capsys)  # fmt: skip
  assert code == 2 and not out
  assert err.startswith("train.py: error: compiling for a TPU topology needs libtpu")
  assert len(err.splitlines()) == 1


@needs_libtpu
@pytest.mark.parametrize("name, strategy", [("v5e:2x2", "dp"), ("v4:2x2x1", "fsdp")])
def test_train_step_compiles(micro, name, strategy):
  from imagen_jax.train import aot

  topo = topo_lib.parse(name)
  devices = topo_lib.devices(topo)
  assert len(devices) == 4  # chips, not cores: v4 is megacore (one device per chip)
  mesh = topo_lib.strategy_mesh(strategy, 4)
  flops = aot.model_flops(micro, "base", 8)
  report, compiled = aot.compile_train(
    micro, "base", topo, devices, mesh, parallel.logical_rules(strategy),
    strategy=strategy, batch=8, flops=flops,
  )  # fmt: skip
  assert compiled is not None and report.status == "ok" and report.fits
  assert 0 < report.peak_bytes < report.hbm_bytes
  assert report.est_step_s > 0 and report.est_images_per_s_per_chip > 0
  assert 0 < report.est_mfu < 1 and report.model_flops == flops > 0
  total = report.state_bytes_total
  if strategy == "dp":
    assert report.state_bytes == total
    assert report.collective_bytes["all-reduce"] > 0  # the gradients
  else:  # a few small leaves (norm scales of width 4·k, biases) stay whole
    assert total / 4 <= report.state_bytes < 0.35 * total
    assert report.collective_bytes["all-gather"] > 0  # the params, gathered


@needs_libtpu
@pytest.mark.parametrize("name, strategy", [("v5e:2x2", "dp"), ("v4:2x2x1", "fsdp")])
def test_sampling_loop_compiles(micro, name, strategy):
  from imagen_jax.train import aot

  topo = topo_lib.parse(name)
  report, compiled = aot.compile_sample(
    micro, "base", topo, topo_lib.devices(topo), batch=4, strategy=strategy
  )
  assert compiled is not None and report.status == "ok" and report.fits
  assert report.steps == report.loop_trips == 2 and report.est_step_s > 0
  assert report.peak_bytes > 0


@needs_libtpu
def test_too_big_for_the_chip_is_reported(micro):
  from imagen_jax.train import aot

  big = micro.copy_and_resolve_references()
  big.stages.base.resolution = 512
  topo = topo_lib.parse("v5e:1x1")
  report, _ = aot.compile_sample(big, "base", topo, topo_lib.devices(topo), batch=1024)
  assert report.fits is False and report.status.startswith("does not fit")
  assert "GiB" in report.status or "TPU compiler" in report.status


@needs_libtpu
def test_compile_only_cli_saves_the_executable(config_path, tmp_path, capsys):
  import train

  path = str(tmp_path / "step.bin")
  code, out, err = _run(train.main, ["--config", config_path, "--compile_only", "--topology",
                                     "v5e:1x1", "--save_compiled", path], capsys)  # fmt: skip
  assert code == 0, err
  assert len(out.splitlines()) == 1 and "stage base: train step for v5e:1x1" in out
  assert "fits" in out and "compiler's estimate" in out
  assert os.path.getsize(path) > 1000


_JSON_KEYS = (
  "strategy topology chips status fits hbm_bytes state_bytes peak_bytes model_flops est_step_s "
  "est_images_per_s_per_chip est_mfu"
).split()


@needs_libtpu
def test_benchmark_clis_write_rows(config_path, tmp_path, capsys):
  import json

  from benchmarks import sampling, sharding

  path = str(tmp_path / "train.json")
  argv = ["--config", config_path, "--topology", "v5e:1x1", "--strategies", "dp", "--json", path]
  code, out, err = _run(sharding.main, argv, capsys)
  assert code == 0, err
  assert "est step s (compiler)" in out and "| base | dp | data 1 | 1 |" in out
  (row,) = json.load(open(path))["rows"]
  assert all(k in row for k in _JSON_KEYS) and row["status"] == "ok" and row["chips"] == 1
  path = str(tmp_path / "sample.json")
  argv = ["--config", config_path, "--topology", "v5e:1x1", "--batch", "2", "--json", path]
  code, out, err = _run(sampling.main, argv, capsys)
  assert code == 0, err
  text, row = json.load(open(path))["rows"]  # the T5 encoder's program, then the stage's
  assert row["kind"] == "sample" and row["fits"] and row["steps"] == 2 and row["est_step_s"] > 0
  assert text["kind"] == "text" and text["stage"] == "t5" and text["fits"]
  assert 0 < text["state_bytes"] < text["peak_bytes"]
  assert "one chip of 16.0 GiB: all programs resident at once" in out, out
  argv += ["--param_dtype", "bfloat16", "--no-text"]  # params stored in bf16: half the bytes
  code, out, err = _run(sampling.main, argv, capsys)
  assert code == 0, err
  (half,) = json.load(open(path))["rows"]
  assert half["kind"] == "sample" and 2 * half["state_bytes"] == row["state_bytes"]


def test_collectives_read_from_the_module_structure():
  """On the 8 fake CPU devices: a row-sharded matmul's sum all-reduces, its gather
  of the sharded weight all-gathers; byte counts from the operands' shapes."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from imagen_jax.parallel import hlo

  assert hlo.shape_bytes("bf16[8,16]{1,0:T(8,128)(2,1)}") == 256
  assert hlo.shape_bytes(hlo._shape_text("%t = (f32[4]{0}, s8[2,2]{1,0}) tuple(%a, %b)")) == 20
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("x",))
  rows = NamedSharding(mesh, P("x"))
  f = jax.jit(lambda x, w: jnp.sum(x @ w), in_shardings=(rows, rows))
  x, w = jax.ShapeDtypeStruct((64, 32), jnp.float32), jax.ShapeDtypeStruct((32, 32), jnp.float32)
  out = hlo.collective_bytes(f.lower(x, w).compile())
  assert set(out) == set(hlo.COLLECTIVES)
  assert out["all-reduce"] == 4 and out["all-gather"] == 32 * 32 * 4 // 8  # a scalar; w's shard


@needs_libtpu
@pytest.mark.slow
def test_compile_only_latent_stages_with_their_clip_tower(sd_converted, capsys):
  """Converted SD and x4 folders: the stage's own CLIP tower is read from the folder's
  config and tokenizer (no weights) and the step with it and the frozen VAE compiles for
  a topology."""
  import jax
  import train

  from imagen_jax.cascade import text as text_lib
  from imagen_jax.train import aot

  folders = f"{sd_converted}/sd_v1_tiny,{sd_converted}/sd_x4_tiny"
  config_arg = os.path.join(tiny.ROOT, "configs", f"stable_diffusion.py:{folders}")
  config = config_lib.load_config(config_arg)
  for name in config.stage_order:  # the abstract tower is the real one's shapes
    stage_config = config.stages[name]
    abstract = aot.abstract_clip_encoder(stage_config, None, ())
    real = text_lib.load_clip(*text_lib.encoder_key(stage_config)[1:])
    assert (abstract.max_length, abstract.embed_dim) == (real.max_length, real.embed_dim)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert shapes(abstract.params) == shapes(real.params)
  # The step of the SD stage (the x4 upscaler's compiles the same way; minutes on 2 cores).
  sd_arg = os.path.join(tiny.ROOT, "configs", f"stable_diffusion.py:{sd_converted}/sd_v1_tiny")
  argv = ["--config", sd_arg, "--compile_only", "--topology", "v5e:1x1",
          "--config.train.batch_size=8"]  # fmt: skip
  code, out, err = _run(train.main, argv, capsys)
  assert code == 0, err
  assert out.startswith("stage sd: train step for v5e:1x1") and "fits" in out, out


@needs_libtpu
@pytest.mark.slow
def test_sampling_loop_of_latent_stages_compiles(sd_converted):
  """SD → x4 from converted folders: each latent stage's loop (its own CLIP width and
  length, the VAE decode inside) compiles for a topology, not at T5's width."""
  from imagen_jax import run as run_lib
  from imagen_jax.train import aot

  config = run_lib.read_config(f"{sd_converted}/sd_v1_tiny,{sd_converted}/sd_x4_tiny")
  topo = topo_lib.parse("v5e:1x1")
  encoders = aot.text_encoders(config)
  assert encoders == {f"{n}/clip": [n] for n in config.stage_order}, encoders
  for name in encoders:  # each stage's own tower, at its width
    report, _ = aot.compile_text(config, name, topo, topo_lib.devices(topo), batch=2)
    assert report.kind == "text" and report.status == "ok" and report.fits, report.status
    assert report.peak_bytes > report.state_bytes > 0
  for name in config.stage_order:
    report, compiled = aot.compile_sample(
      config, name, topo, topo_lib.devices(topo), batch=1, steps=2
    )
    assert compiled is not None and report.status == "ok", (name, report.status)
    assert report.fits and report.peak_bytes > report.state_bytes > 0


def test_estimate_falls_back_to_the_roofline_of_the_compiler_counts():
  """The cost model's time when it gives one; its negative 'unknown' (as for T5-XXL)
  becomes max(flops / peak, bytes / bandwidth) on the chip, labelled so."""
  from imagen_jax.train import aot

  chip = topo_lib.CHIPS["v5e"]
  assert aot.estimated_seconds({"optimal_seconds": 0.5, "flops": 1e15}, chip) == (
    0.5,
    "cost model",
  )
  memory_bound = {"optimal_seconds": -48.0, "flops": 1.97e12, "bytes accessed": 8.19e11 * 3}
  assert aot.estimated_seconds(memory_bound, chip) == pytest.approx((3.0, "roofline"))
  compute_bound = {"optimal_seconds": -1.0, "flops": 1.97e14 * 2, "bytes accessed": 8.19e9}
  assert aot.estimated_seconds(compute_bound, chip) == pytest.approx((2.0, "roofline"))
  assert aot.estimated_seconds({}, chip) == (0.0, None)
  assert aot.estimated_seconds({"optimal_seconds": -1.0}, chip) == (0.0, None)
