"""Two real processes (JAX multi-process runtime over localhost) train from streamed
webdataset shards: each saves its own stream position in the shared checkpoint and
the skip counts in metrics.jsonl are summed over both. (The exact resume of each
process's stream is tested with simulated processes in test_corpus_streaming.)"""

import json
import os
import subprocess
import sys

import orbax.checkpoint as ocp

import corpus_testdata as td
from test_corpus_train import SMALL
from test_multiprocess import _env, _free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(src, workdir, steps):
  port = _free_port()
  procs = []
  for i in range(2):
    cmd = [
      sys.executable,
      os.path.join(ROOT, "train.py"),
      "--config",
      "configs/own_data.py:webdataset,tiny",
      f"--workdir={workdir}",
      "--stage=base",
      f"--config.data.src={src}",
      "--config.data.shuffle_buffer=4",
      "--config.data.interleave=2",
      f"--config.train.num_steps={steps}",
      "--config.train.checkpoint_every=2",
      "--config.train.async_checkpoint=False",
      *SMALL,
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
      "--distributed_timeout=300",
    ]
    procs.append(
      # One CPU device each: the streams are the point, not the mesh (fewer collectives).
      subprocess.Popen(cmd, cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    )
  outs = [p.communicate(timeout=1800)[0].decode() for p in procs]
  for p in procs:  # on a failure, every process's last lines
    assert p.returncode == 0, "\n".join(
      f"--- process {j}:\n{o[-2500:]}" for j, o in enumerate(outs)
    )


def _data_item(workdir, step):
  mgr = ocp.CheckpointManager(os.path.join(workdir, "base", "checkpoints"), item_names=("data",))
  return mgr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data


def test_two_processes_stream_and_save_both_positions(tmp_path):
  td.make_webdataset(str(tmp_path / "w"))
  src, workdir = str(tmp_path / "w/*.tar"), str(tmp_path / "run")
  _run(src, workdir, 4)
  data = _data_item(workdir, 4)
  assert data["examples"] == 32 and len(data["stream"]) == 2
  assert data["stream"] != [[0, 0], [0, 0]]
  metrics = [json.loads(x) for x in open(os.path.join(workdir, "base", "metrics.jsonl"))]
  # Shard 0 (process 0) holds three bad records, shard 1 (process 1) a truncated end:
  # both processes' counts are in the sum.
  assert metrics[-1]["skipped_no_caption"] >= 1 and metrics[-1]["skipped_truncated_shard"] >= 1
