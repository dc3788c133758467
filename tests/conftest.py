"""Test setup: eight fake CPU devices, float32 matmuls, a persistent compile cache, and
the session's shared data: one prepared shapes dataset and one trained tiny run.

The compile cache lives outside the repository and survives test runs, so a second
run compiles almost nothing: `$IMAGEN_JAX_TEST_CACHE`, else
`$XDG_CACHE_HOME/imagen_jax/jax_tests`, else `~/.cache/imagen_jax/jax_tests` (an explicit
`JAX_COMPILATION_CACHE_DIR` wins). The environment variables set here are inherited by
the train.py / sample.py subprocesses the tests start, so they share the cache.

Fixtures that tests may not change in place (copy them first: `copy_run`,
`copy_shapes`): `shapes_data_dir` (the tiny demo's shapes, prepared once) and
`tiny_run` (train.py on the tiny demo config, both stages, a few steps), `if_pipelines`
and `if_converted` (the tiny IF fixtures as pipelines, converted as the README does),
`sd_converted` (the tiny Stable Diffusion fixtures with a tiny CLIP tokenizer, converted).
"""

import gc
import os
import resource
import shutil

# Must be set before jax is imported anywhere.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def compile_cache_dir() -> str:
  """The persistent compile cache directory of the tests (see the module docstring)."""
  if os.environ.get("IMAGEN_JAX_TEST_CACHE"):
    return os.environ["IMAGEN_JAX_TEST_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "imagen_jax", "jax_tests")


os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", compile_cache_dir())
os.makedirs(os.environ["JAX_COMPILATION_CACHE_DIR"], exist_ok=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

import tiny  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The session's tiny run: train.py's flags beyond --config/--workdir/--data_dir: the
# shared base model, 2 steps (the SR stage 1: its steps_scale is 0.5).
TINY_RUN_FLAGS = (
  *tiny.MODEL_FLAGS,
  "--config.train.num_steps=2",
  "--config.train.checkpoint_every=2",
)


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
  """Drops the module's compiled programs when it ends (they stay in the disk cache).

  One pytest process runs every module; without this its memory only grows (each
  module's jitted functions keep their executables and the stages they close over)
  until a late module cannot allocate on a 2-core, 24 GiB CI machine.
  """
  yield
  jax.clear_caches()
  gc.collect()


_WORKER_PEAKS = []  # GiB, one per pytest-xdist worker that finished


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def pytest_sessionfinish(session):
  worker_output = getattr(session.config, "workeroutput", None)  # set in an xdist worker
  if worker_output is not None:
    worker_output["peak_rss_gib"] = _peak_rss_gib()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  """pytest-xdist: a worker ended; keep its peak memory for the summary."""
  del error
  _WORKER_PEAKS.append(getattr(node, "workeroutput", {}).get("peak_rss_gib", 0.0))


def pytest_terminal_summary(terminalreporter):
  """One line: the peak memory of the process(es) running the tests (what the memory
  guard above bounds), per worker when pytest-xdist ran them."""
  if _WORKER_PEAKS:
    each = ", ".join(f"{p:.1f}" for p in sorted(_WORKER_PEAKS, reverse=True))
    terminalreporter.write_line(f"peak RSS of the test workers: {each} GiB")
  else:
    terminalreporter.write_line(f"peak RSS of the test process: {_peak_rss_gib():.1f} GiB")


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
  """A TFDS data dir holding the tiny demo's shapes (`tiny.SHAPES_KWARGS`); read only."""
  from imagen_jax.data import datasets  # pylint: disable=import-outside-toplevel

  data_dir = tmp_path_factory.mktemp("shapes_data")
  datasets.prepare("shapes", data_dir, **tiny.SHAPES_KWARGS)
  return data_dir


@pytest.fixture
def copy_shapes(shapes_data_dir, tmp_path):
  """A writable copy of `shapes_data_dir` (for tests that add to the data dir)."""
  return shutil.copytree(shapes_data_dir, tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_run(shapes_data_dir, tmp_path_factory):
  """A workdir: train.py on configs/demo.py:tiny (two-level base), both stages (2 and 1 steps).

  Trained in process through train.py's main, exactly as the command line does. Read
  only: tests that train it further or damage it take `copy_run`.
  """
  import train  # pylint: disable=import-outside-toplevel

  workdir = tmp_path_factory.mktemp("tiny_run") / "run"
  argv = ["--config", tiny.DEMO_TINY, "--workdir", str(workdir)]
  argv += [f"--config.data.data_dir={shapes_data_dir}", *TINY_RUN_FLAGS]
  assert train.main(argv) == 0
  return workdir


@pytest.fixture
def copy_run(tiny_run, tmp_path):
  """A writable copy of `tiny_run`."""
  return shutil.copytree(tiny_run, tmp_path / "run")


@pytest.fixture(scope="session")
def if_pipelines(tmp_path_factory):
  """IF-I and IF-II: the parity fixtures as diffusers pipeline folders with the tiny T5."""
  root = tmp_path_factory.mktemp("if_src")
  tiny.if_pipeline("if_stage1", root / "IF-I")
  tiny.if_pipeline("if_stage2", root / "IF-II")
  return root


@pytest.fixture(scope="session")
def if_converted(if_pipelines, tmp_path_factory):
  """A folder `if` holding the converted if_I (16px) and if_II (8 → 16px), as the README
  converts them; read only."""
  from imagen_jax.convert import __main__ as convert  # pylint: disable=import-outside-toplevel

  root = tmp_path_factory.mktemp("if")
  assert (
    convert.main(["deepfloyd-if", "--src", str(if_pipelines / "IF-I"), "--out", str(root / "if_I")])
    == 0
  )
  argv = ["deepfloyd-if", "--src", str(if_pipelines / "IF-II"), "--out", str(root / "if_II")]
  assert convert.main(argv + ["--lowres-resolution", "8"]) == 0
  return root


@pytest.fixture(scope="session")
def sd_converted(tmp_path_factory):
  """A folder holding sd_v1_tiny, sd_v2_tiny and sd_x4_tiny, each converted once (float32)
  from its fixture plus the tiny CLIP tokenizer (`tiny.sd_pipeline`); read only."""
  from imagen_jax.convert import stable_diffusion  # pylint: disable=import-outside-toplevel

  src, root = tmp_path_factory.mktemp("sd_src"), tmp_path_factory.mktemp("sd")
  for name in ("sd_v1_tiny", "sd_v2_tiny", "sd_x4_tiny"):
    stable_diffusion.convert(tiny.sd_pipeline(name, src / name), str(root / name))
  return root
