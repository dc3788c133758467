"""Trains the stages of a cascade config.

  python train.py --config configs/demo.py --workdir runs/demo [--stage NAME]
      [--config.train.num_steps=N] [--config.train.batch_size=B]
      [--config.train.checkpoint_every=K] [--config.mesh.strategy=fsdp]
      [--coordinator_address HOST:PORT --num_processes N --process_id I]

Without --stage every stage trains in cascade order. Re-running the same
command resumes from the last checkpoints. SIGTERM saves a checkpoint and
exits 0 (in a multi-process run, every process saves the same step).

One process per host: --coordinator_address/--num_processes/--process_id
start JAX's multi-process runtime explicitly; without them it is detected
(Cloud TPU pods, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from imagen_jax.train import distributed, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "cascade config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints and metrics")
_STAGE = flags.DEFINE_multi_string("stage", None, "stage(s) to train (default: all)")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 (multi-process runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "number of processes (multi-process runs)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "this process, in [0, num_processes)")
_TIMEOUT = flags.DEFINE_float("distributed_timeout", 300.0,
                              "seconds to wait for the coordinator and every process")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           timeout_s=_TIMEOUT.value)
  except distributed.LaunchError as e:
    sys.exit(f"error: {e}")
  results = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _STAGE.value)
  for r in results:
    print(f"stage {r.stage}: step {r.step}" + (" (preempted, checkpoint saved)"
                                               if r.preempted else ""))
  sys.exit(0)


if __name__ == "__main__":
  app.run(main)
