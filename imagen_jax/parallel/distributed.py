"""Several processes, one training run: start-up, agreement, who writes.

JAX's multi-controller runtime runs one Python process per host (a TPU VM
worker, a SLURM task, or, to try it on one machine, several local processes
over localhost). Every process runs the same program on its share of the
devices; ``jax.distributed.initialize`` connects them.

``initialize`` takes the coordinator explicitly (``--coordinator_address
--num_processes --process_id``, the same flags on train.py, sample.py and
``python -m imagen_jax.eval.fid``: ``add_flags`` / ``initialize_from_args``)
or detects it as JAX does (Cloud TPU pods, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS). Bad launches
fail with one line naming the flag instead of hanging: the runtime itself
aborts the process with a C++ stack trace when its deadline passes, so a
watchdog thread reports first.

Agreement between processes (``barrier``, ``host_allgather``, ``any_process``)
goes through the coordinator's key-value store, not through device collectives:
XLA:CPU's cross-process collectives (gloo) give up after 30 s, a constant of the
runtime, and a process that reaches one while another still compiles, prepares
data or writes a grid fails the run on a busy machine. The same reason makes
``compile_together`` compile a program on every process before any of them runs
it (the train step's first call).
"""

import argparse
import glob
import importlib.metadata
import importlib.util
import io
import os
import re
import socket
import sys
import threading
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from imagen_jax.parallel import topology


class LaunchError(ValueError):
  """A multi-process launch that cannot work; the message names the flag."""


def _check_flags(
  coordinator_address: Optional[str], num_processes: Optional[int], process_id: Optional[int]
) -> None:
  given = {
    "--coordinator_address": coordinator_address,
    "--num_processes": num_processes,
    "--process_id": process_id,
  }
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise LaunchError(
      f"{', '.join(missing)} missing: give --coordinator_address, "
      "--num_processes and --process_id together (or none of them)"
    )
  if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", coordinator_address):
    raise LaunchError(f"--coordinator_address={coordinator_address!r}: expected HOST:PORT")
  if num_processes < 1:
    raise LaunchError(f"--num_processes={num_processes}: must be >= 1")
  if not 0 <= process_id < num_processes:
    raise LaunchError(f"--process_id={process_id} is not in [0, --num_processes={num_processes})")


def _reachable(address: str) -> bool:
  host, port = address.rsplit(":", 1)
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
      return True
  except OSError:
    return False


def _timeout_message(address: str, num_processes: int, process_id: int, timeout_s: float) -> str:
  if process_id != 0 and not _reachable(address):
    return (
      f"--coordinator_address={address}: no coordinator answered within "
      f"{timeout_s:g} s (is the process with --process_id=0 running there?)"
    )
  return (
    f"--num_processes={num_processes}: not every process joined the coordinator "
    f"at {address} within {timeout_s:g} s (check --num_processes and a distinct "
    f"--process_id on every process)"
  )


def _watchdog(message_fn, timeout_s: float) -> threading.Timer:
  """Prints one line and ends the process if start-up outlives ``timeout_s``."""

  def fire():
    print(f"error: {message_fn()}", file=sys.stderr, flush=True)
    os._exit(2)  # the runtime's own deadline would abort with a stack trace

  timer = threading.Timer(timeout_s, fire)
  timer.daemon = True
  timer.start()
  return timer


def _check_agreement(num_processes: int, process_id: int) -> None:
  """Every process must have been launched with the same count, ids distinct."""
  seen = host_allgather(np.asarray([num_processes, process_id]), "launch flags")
  counts, ids = seen[:, 0].tolist(), sorted(seen[:, 1].tolist())
  if set(counts) != {jax.process_count()} or ids != list(range(jax.process_count())):
    raise LaunchError(
      f"--num_processes/--process_id disagree across processes: the "
      f"coordinator runs {jax.process_count()} processes, they were "
      f"launched with --num_processes {counts} and --process_id {ids}"
    )


# Google's PCI vendor id: a TPU chip on this host's bus.
_TPU_PCI_VENDOR = "0x1ae0"


def cpu_only_platform(env, pci_vendors, accel_devices, plugins) -> Optional[str]:
  """ "cpu" where JAX would start libtpu on a host with no TPU and run on the CPU anyway.

  With the ``libtpu`` package installed (requirements-dev.txt: TPU-topology compiles on
  any machine) and JAX_PLATFORMS unset, JAX starts its TPU backend at the first device
  query even where there is no TPU, and libtpu prints its warnings (no accelerator type,
  no worker hostnames) on the first screen of every command. Nothing changes where the
  user chose the platforms (JAX_PLATFORMS, JAX_FORCE_TPU_INIT, TPU_ACCELERATOR_TYPE), a
  TPU is attached (a PCI device of Google's vendor id, a /dev/accel* or /dev/vfio node)
  or another accelerator plugin (a GPU) is installed: there JAX chooses, as always.

  Args:
    env: the environment (os.environ).
    pci_vendors: the vendor ids of the host's PCI devices ("0x1ae0", ...).
    accel_devices: the host's /dev/accel* and /dev/vfio/<n> device nodes.
    plugins: the installed JAX PJRT plugins (entry points and jax_plugins modules).

  Returns:
    "cpu" to set as ``jax_platforms``, or None to leave JAX's choice alone.
  """
  if any(k in env for k in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT", "TPU_ACCELERATOR_TYPE")):
    return None
  if _TPU_PCI_VENDOR in pci_vendors or accel_devices or plugins:
    return None
  return "cpu"


def _installed_plugins() -> list[str]:
  names = [e.name for e in importlib.metadata.entry_points(group="jax_plugins")]
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    names += [
      os.path.basename(p)
      for loc in spec.submodule_search_locations
      for p in glob.glob(os.path.join(loc, "*"))
      if not os.path.basename(p).startswith("_")
    ]
  return names


def _host_accelerators() -> tuple[list[str], list[str]]:
  """(PCI vendor ids, /dev/accel* and /dev/vfio/<n> nodes) of this host."""
  vendors = []
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        vendors.append(f.read().strip())
    except OSError:
      continue
  accel = glob.glob("/dev/accel*") + [p for p in glob.glob("/dev/vfio/*") if p[-1].isdigit()]
  return vendors, accel


def skip_absent_tpu() -> Optional[str]:
  """Sets ``jax_platforms`` as ``cpu_only_platform`` says for this host; returns it.

  Call before the first device query; a no-op (None) where libtpu is not installed.
  """
  if not topology.libtpu_available():
    return None
  platform = cpu_only_platform(os.environ, *_host_accelerators(), _installed_plugins())
  if platform is not None:
    jax.config.update("jax_platforms", platform)
  return platform


def initialize(
  coordinator_address: Optional[str] = None,
  num_processes: Optional[int] = None,
  process_id: Optional[int] = None,
  timeout_s: float = 300.0,
) -> None:
  """Connects this process to the others (or does nothing for a lone process).

  Args:
    coordinator_address: 'HOST:PORT' of process 0; with ``num_processes`` and
      ``process_id``. All None: auto-detection (see ``maybe_auto_initialize``).
    num_processes: how many processes take part.
    process_id: this process, in [0, num_processes).
    timeout_s: how long to wait for the coordinator and every process.

  Raises:
    LaunchError: inconsistent flags, named. A coordinator that does not answer
      within ``timeout_s`` ends the process with one line on stderr (exit 2).
  """
  skip_absent_tpu()  # before the runtime's first device query
  if coordinator_address is None and num_processes is None and process_id is None:
    maybe_auto_initialize()
    return
  _check_flags(coordinator_address, num_processes, process_id)
  if num_processes == 1:
    return
  # XLA:CPU reduces across processes only through gloo; GPU and TPU ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timer = _watchdog(
    lambda: _timeout_message(coordinator_address, num_processes, process_id, timeout_s), timeout_s
  )
  try:
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=int(timeout_s) + 60,
    )
    _check_agreement(num_processes, process_id)
  finally:
    timer.cancel()


def add_flags(parser: argparse.ArgumentParser) -> None:
  """The multi-process flags of every entry point (train.py, sample.py, eval.fid)."""
  parser.add_argument("--coordinator_address", help="HOST:PORT of process 0 (multi-process runs)")
  parser.add_argument("--num_processes", type=int, help="number of processes (multi-process runs)")
  parser.add_argument("--process_id", type=int, help="this process, in [0, num_processes)")
  parser.add_argument(
    "--distributed_timeout",
    type=float,
    default=300.0,
    help="seconds to wait for the coordinator and every process",
  )


def initialize_from_args(args: argparse.Namespace) -> None:
  """``initialize`` with the flags of ``add_flags`` (LaunchError naming a bad one)."""
  initialize(
    args.coordinator_address,
    args.num_processes,
    args.process_id,
    timeout_s=args.distributed_timeout,
  )


def maybe_auto_initialize() -> None:
  """``jax.distributed.initialize()`` when launched as one of several processes.

  Cloud TPU pods and SLURM/Open MPI launches are detected by JAX itself; an
  explicit coordinator is given with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
  and JAX_PROCESS_ID.
  """
  env = os.environ
  if any(
    k in env
    for k in (
      "JAX_COORDINATOR_ADDRESS",
      "SLURM_NTASKS",
      "OMPI_COMM_WORLD_SIZE",
      "TPU_WORKER_HOSTNAMES",
    )
  ):
    if env.get("SLURM_NTASKS", "2") == "1" and "JAX_COORDINATOR_ADDRESS" not in env:
      return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize()


def is_primary() -> bool:
  """Whether this process writes the run's shared files (metrics, grids, config)."""
  return jax.process_index() == 0


# How long a process waits for the others at an agreement: long, since one of
# them may be preparing a dataset; a process that dies fails the wait sooner
# (the coordinator's heartbeat).
WAIT_S = 4 * 3600.0

_rounds: dict[str, int] = {}


def _client():
  """The runtime's coordination client (None: not started through jax.distributed)."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top

  return jax_distributed.global_state.client


def _next_round(tag: str) -> int:
  """Every process counts its agreements of each tag: the same count names the same one."""
  _rounds[tag] = _rounds.get(tag, -1) + 1
  return _rounds[tag]


def host_allgather(values, tag: str, timeout_s: float = WAIT_S) -> np.ndarray:
  """Every process's small host array, stacked: [process_count, *values.shape].

  Each process calls it at the same point with arrays of one shape and dtype;
  ``tag`` names the agreement (any string, the same on every process).
  """
  local = np.asarray(values)
  if jax.process_count() == 1:
    return local[None]
  client = _client()
  if client is None:  # started by another runtime: device collectives it is
    return np.asarray(multihost_utils.process_allgather(local))
  n = _next_round(tag)

  def key(process: int, round_: int) -> str:
    return f"imagen_jax/gather/{tag}/{round_}/{process}"

  buf = io.BytesIO()
  np.save(buf, local, allow_pickle=False)
  client.key_value_set_bytes(key(jax.process_index(), n), buf.getvalue())
  ms = int(timeout_s * 1000)
  rows = [
    np.load(io.BytesIO(client.blocking_key_value_get_bytes(key(p, n), ms)), allow_pickle=False)
    for p in range(jax.process_count())
  ]
  if n:  # every process has posted round n, so all of them have read round n - 1
    client.key_value_delete(key(jax.process_index(), n - 1))
  return np.stack(rows)


def any_process(flag: bool) -> bool:
  """True on every process when ``flag`` is True on at least one (a collective).

  Every process must call it at the same point of the program: a SIGTERM that
  reached one process becomes a stop that all of them agree on.
  """
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(host_allgather(np.asarray(flag, np.bool_), "any process")))


def barrier(name: str, timeout_s: float = WAIT_S) -> None:
  """Waits until every process reaches the barrier of this name (no-op alone)."""
  if jax.process_count() == 1:
    return
  client = _client()
  if client is None:
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(f"imagen_jax/barrier/{name}/{_next_round(name)}", int(timeout_s * 1000))


def compile_together(lower, *args, name: str) -> None:
  """Compiles ``lower(*args)`` here, then waits until every process has.

  Call it before a multi-process program's first run: the jitted function's
  next call with the same arguments reuses the executable. Alone it does nothing.
  """
  if jax.process_count() > 1:
    lower(*args).compile()
    barrier(f"compiled {name}")
