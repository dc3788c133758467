"""Trains the stages of a cascade config.

  python train.py --config configs/demo.py --workdir runs/demo [--stage NAME]
      [--config.train.num_steps=N] [--config.train.batch_size=B]
      [--config.train.checkpoint_every=K] [--config.mesh.strategy=fsdp]
      [--coordinator_address HOST:PORT --num_processes N --process_id I]

Without --stage every stage trains in cascade order. Re-running the same
command resumes from the last readable checkpoints. SIGTERM saves a checkpoint
and exits 0 (in a multi-process run, every process saves the same step),
Ctrl-C saves and exits 130 (before training starts: exits at once, nothing to
save). Exit 2: a bad flag or setting, or a workdir trained with other settings;
exit 1: the workdir is locked by another trainer, the run diverged (non-finite
steps) or a checkpoint could not be saved. Each is one line, ``train.py: error: ...``.

One process per host: --coordinator_address/--num_processes/--process_id
start JAX's multi-process runtime explicitly; without them it is detected
(Cloud TPU pods, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS).
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
from imagen_jax.parallel import distributed  # noqa: E402
from imagen_jax.train import checkpoint, guard, signals, trainer  # noqa: E402
from imagen_jax.train import validate  # noqa: E402

# Errors reported in one line, and their exit status.
_EXIT = (
  (cli.UsageError, 2),
  (validate.ConfigError, 2),
  (lockfile.Locked, 1),
  (guard.NonFiniteError, 1),
  (checkpoint.SaveError, 1),
)


def parse_args(argv: Optional[Sequence[str]]):
  """(flags, config) from the command line; config overrides applied."""
  p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
  cli.add_config_arg(p)
  p.add_argument("--workdir", required=True, help="directory for checkpoints and metrics")
  p.add_argument(
    "--stage",
    action="append",
    default=None,
    help="stage to train (repeatable; default: all, cascade order)",
  )
  distributed.add_flags(p)
  args, rest = p.parse_known_args(argv)
  return args, cli.config_from_args(args, rest)


def main(argv: Optional[Sequence[str]] = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    args, config = parse_args(argv)
    # Before our signal handler: the runtime may install its own, which ours replaces.
    distributed.initialize_from_args(args)
  except (cli.UsageError, distributed.LaunchError) as e:
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
