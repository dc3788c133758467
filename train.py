"""Trains the stages of a cascade config.

  python train.py --config configs/demo.py --workdir runs/demo [--stage NAME]
      [--config.train.num_steps=N] [--config.train.batch_size=B]
      [--config.train.checkpoint_every=K] [--config.mesh.strategy=fsdp]

Without --stage every stage trains in cascade order. Re-running the same
command resumes from the last checkpoints. SIGTERM saves a checkpoint and
exits 0.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from imagen_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "cascade config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints and metrics")
_STAGE = flags.DEFINE_multi_string("stage", None, "stage(s) to train (default: all)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  trainer.maybe_initialize_distributed()
  results = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _STAGE.value)
  for r in results:
    print(f"stage {r.stage}: step {r.step}" + (" (preempted, checkpoint saved)"
                                               if r.preempted else ""))
  sys.exit(0)


if __name__ == "__main__":
  app.run(main)
