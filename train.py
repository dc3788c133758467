"""Trains the stages of a cascade config.

  python train.py --config configs/demo.py --workdir runs/demo [--stage NAME]
      [--config.train.num_steps=N] [--config.train.batch_size=B]
      [--config.train.checkpoint_every=K] [--config.mesh.strategy=fsdp]
      [--coordinator_address HOST:PORT --num_processes N --process_id I]
  python train.py --config configs/base64.py --compile_only --topology v5p:4x4x4
      [--num_slices N] [--save_compiled PATH] [--stage NAME]

Without --stage every stage trains in cascade order. Re-running the same
command resumes from the last readable checkpoints. SIGTERM saves a checkpoint
and exits 0 (in a multi-process run, every process saves the same step),
Ctrl-C saves and exits 130 (before training starts: exits at once, nothing to
save). Exit 2: a bad flag or setting, or a workdir trained with other settings;
exit 1: the workdir is locked by another trainer, the run diverged (non-finite
steps), a checkpoint could not be saved or a streamed shard could not be read.
Each is one line, ``train.py: error: ...``.

One process per host: --coordinator_address/--num_processes/--process_id
start JAX's multi-process runtime explicitly; without them it is detected
(Cloud TPU pods, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS).

--compile_only --topology T compiles each stage's train step for the TPU
topology T with the TPU compiler (needs libtpu; no TPU, no data, no workdir)
and prints one line per stage: peak bytes per chip, whether it fits the chip's
HBM, the compiler's estimated step time; --save_compiled PATH also writes the
serialized executable (one stage). Exit 1 when a stage does not fit or does not
compile; refused in one line (exit 2) without libtpu.
"""

import os
import signal
import sys


def _exit_before_start(signum, frame):
  """SIGTERM/Ctrl-C while importing or exiting: nothing to save, no traceback."""
  del frame
  print(f"train.py: stopped by {signal.Signals(signum).name}; nothing to save", file=sys.stderr)
  sys.exit(130 if signum == signal.SIGINT else 0)


if __name__ == "__main__":  # before the (slow) imports; the trainer's handler
  signal.signal(signal.SIGTERM, _exit_before_start)  # replaces it while it runs
  signal.signal(signal.SIGINT, _exit_before_start)

# pylint: disable=wrong-import-position
import argparse  # noqa: E402
import logging  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from imagen_jax import cli, lockfile  # noqa: E402
from imagen_jax.data import corpus  # noqa: E402
from imagen_jax.parallel import distributed, topology  # noqa: E402
from imagen_jax.train import checkpoint, guard, signals, trainer  # noqa: E402
from imagen_jax.train import validate  # noqa: E402

# Errors reported in one line, and their exit status.
_EXIT = (
  (cli.UsageError, 2),
  (validate.ConfigError, 2),
  (lockfile.Locked, 1),
  (guard.NonFiniteError, 1),
  (checkpoint.SaveError, 1),
  (corpus.ShardError, 1),  # a streamed shard missing or unreadable mid-run
)


def parse_args(argv: Optional[Sequence[str]]):
  """(flags, config) from the command line; config overrides applied."""
  p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
  cli.add_config_arg(p)
  p.add_argument("--workdir", help="directory for checkpoints and metrics (required to train)")
  p.add_argument(
    "--stage",
    action="append",
    default=None,
    help="stage to train (repeatable; default: all, cascade order)",
  )
  distributed.add_flags(p)
  p.add_argument("--compile_only", action="store_true", help="compile for --topology, run nothing")
  p.add_argument("--topology", help="--compile_only: a TPU topology, e.g. v5p:4x4x4")
  p.add_argument("--num_slices", type=int, default=1, help="--compile_only: slices of --topology")
  p.add_argument("--save_compiled", help="--compile_only: write the serialized executable here")
  args, rest = p.parse_known_args(argv)
  if args.compile_only and not args.topology:
    raise cli.UsageError("--compile_only needs --topology (e.g. v5p:4x4x4)")
  if not args.compile_only and (args.topology or args.save_compiled):
    raise cli.UsageError("--topology and --save_compiled go with --compile_only")
  if not args.compile_only and not args.workdir:
    raise cli.UsageError("--workdir is required (except with --compile_only)")
  return args, cli.config_from_args(args, rest)


def compile_only(args, config) -> int:
  """--compile_only: one line per stage (imagen_jax.train.aot); bad input raises."""
  from imagen_jax.train import aot  # pylint: disable=import-outside-toplevel

  topo = topology.parse(args.topology, args.num_slices)
  names = args.stage or list(config.stage_order)
  unknown = [n for n in names if n not in config.stages]
  if unknown:
    raise cli.UsageError(f"--stage {unknown}: not in the config; it has {list(config.stages)}")
  if args.save_compiled and len(names) != 1:
    raise cli.UsageError(f"--save_compiled writes one stage's executable; pick one of {names}")
  for name in names:  # bad mesh or batch: one line before anything compiles
    aot.check_config(config, name, topo)
  topology.require_libtpu()
  devices = topology.devices(topo)
  ok = True
  for name in names:
    report, compiled = aot.compile_config(config, name, topo, devices)
    saved = compiled is not None and bool(args.save_compiled)
    if saved:
      aot.save_compiled(compiled, args.save_compiled)
    print(aot.one_line(report) + (f"; saved {args.save_compiled}" if saved else ""))
    ok = ok and report.status == "ok"
  return 0 if ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    args, config = parse_args(argv)
    if args.compile_only:
      return compile_only(args, config)
    # Before our signal handler: the runtime may install its own, which ours replaces.
    distributed.initialize_from_args(args)
  except (cli.UsageError, distributed.LaunchError, topology.TopologyError) as e:
    print(f"train.py: error: {e}", file=sys.stderr, flush=True)
    return 2
  with signals.StopSignals() as stop:
    try:
      results = trainer.train_and_evaluate(config, args.workdir, args.stage, stop=stop)
    except signals.Stopped as e:
      stop.phase = "done"
      print(f"train.py: {e}", file=sys.stderr)
      return e.exit_code
    except tuple(cls for cls, _ in _EXIT) as e:
      stop.phase = "done"
      print(f"train.py: error: {e}", file=sys.stderr, flush=True)
      code = next(code for cls, code in _EXIT if isinstance(e, cls))
      if isinstance(e, checkpoint.SaveError):
        # orbax's writer threads of the failed save keep finishing (and printing
        # tracebacks of the same failure) after this line: end here.
        sys.stdout.flush()
        os._exit(code)  # pylint: disable=protected-access
      return code
    stop.phase = "done"  # a late signal no longer changes the exit status
    for r in results:
      print(
        f"stage {r.stage}: step {r.step}"
        + (" (preempted, checkpoint saved)" if r.preempted else "")
      )
    return signals.exit_code(stop.signum) if stop.requested else 0


if __name__ == "__main__":
  sys.exit(main())
