"""Trains the stages of a cascade config.

  python train.py --config configs/demo.py --workdir runs/demo [--stage NAME]
      [--config.train.num_steps=N] [--config.train.batch_size=B]
      [--config.train.checkpoint_every=K] [--config.mesh.strategy=fsdp]

Without --stage every stage trains in cascade order. Re-running the same
command resumes from the last readable checkpoints. SIGTERM saves a checkpoint
and exits 0, Ctrl-C saves and exits 130 (before training starts: exits at once,
nothing to save). Exit 2: a bad setting or a workdir trained with other
settings; exit 1: the workdir is locked by another trainer, the run diverged
(non-finite steps) or a checkpoint could not be saved. Each is one line,
``train.py: error: ...``.
"""

import os
import signal
import sys


def _exit_before_start(signum, frame):
  """SIGTERM/Ctrl-C while importing or exiting: nothing to save, no traceback."""
  del frame
  print(f"train.py: stopped by {signal.Signals(signum).name}; nothing to save",
        file=sys.stderr)
  sys.exit(130 if signum == signal.SIGINT else 0)


if __name__ == "__main__":  # before the (slow) imports; the trainer's handler
  signal.signal(signal.SIGTERM, _exit_before_start)  # replaces it while it runs
  signal.signal(signal.SIGINT, _exit_before_start)

# pylint: disable=wrong-import-position
from absl import app, flags, logging
from ml_collections import config_flags

from imagen_jax import lockfile
from imagen_jax.train import checkpoint, guard, signals, trainer, validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "cascade config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints and metrics")
_STAGE = flags.DEFINE_multi_string("stage", None, "stage(s) to train (default: all)")
flags.mark_flags_as_required(["config", "workdir"])

# Errors reported in one line, and their exit status.
_EXIT = ((validate.ConfigError, 2), (lockfile.Locked, 1), (guard.NonFiniteError, 1),
         (checkpoint.SaveError, 1))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  with signals.StopSignals() as stop:
    try:
      trainer.maybe_initialize_distributed()
      results = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _STAGE.value,
                                           stop=stop)
    except signals.Stopped as e:
      stop.phase = "done"
      print(f"train.py: {e}", file=sys.stderr)
      sys.exit(e.exit_code)
    except tuple(cls for cls, _ in _EXIT) as e:
      stop.phase = "done"
      print(f"train.py: error: {e}", file=sys.stderr, flush=True)
      code = next(code for cls, code in _EXIT if isinstance(e, cls))
      if isinstance(e, checkpoint.SaveError):
        # orbax's writer threads of the failed save keep finishing (and printing
        # tracebacks of the same failure) after this line: end here.
        sys.stdout.flush()
        os._exit(code)  # pylint: disable=protected-access
      sys.exit(code)
    stop.phase = "done"  # a late signal no longer changes the exit status
    for r in results:
      print(f"stage {r.stage}: step {r.step}" + (" (preempted, checkpoint saved)"
                                                 if r.preempted else ""))
    sys.exit(signals.exit_code(stop.signum) if stop.requested else 0)


if __name__ == "__main__":
  app.run(main)
