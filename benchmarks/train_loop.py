"""Images/s of the bare jitted train step against the whole training loop.

  python -m benchmarks.train_loop --config configs/demo.py --stage base \\
      [--steps 25] [--json out.json] [--config.train.batch_size=32]

* bare step: the stage's jitted train step (T5 on the caption tokens inside it)
  called ``--steps`` times on ONE device-resident batch, after two untimed
  calls; images/s = steps × batch / wall time, waited for at the end.
* whole loop: ``trainer.train_stage`` for 2 × ``--steps`` steps with
  ``log_every = --steps``: the second logging window's images/s, i.e. the real
  pipeline (grain read, decode, crop), tokenizer, prefetch to device, the step,
  the stop flag and the metrics write at the end of the window. Compilation
  (first window), checkpointing (at the last step, after the window) and
  sample grids (off) are excluded.

The ratio loop / bare is what the host costs the devices; 1.0 means the device
never waits for the host.

Last, a prediction of the config's whole training on this machine: every stage's
images (``train.num_steps`` × the stage's ``steps_scale`` × batch; the demo: base
51,200 + SR 25,600) at the measured stage's whole-loop images/s. Measured on the base
stage it errs long for the demo, whose SR stage trains faster per image (147 against
108 images/s on the machine of benchmarks/RESULTS.md); the README's first command
also prepares the data, compiles and samples a grid (about 1½ min there).
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

import jax

from benchmarks.common import cpu_model, write_json
from imagen_jax import cli
from imagen_jax import config as config_lib
from imagen_jax import parallel
from imagen_jax.stages import build_stage
from imagen_jax.text import TextEncoder
from imagen_jax.train import optim, state as state_lib, step as step_lib, trainer


def _setup(config: Any, stage_name: str):
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.config_rules(config.mesh)
  encoder = TextEncoder.from_config(config.text, mesh, rules)
  return mesh, rules, encoder


def bare_step(config: Any, stage_name: str, steps: int, warmup: int = 2) -> float:
  """Images/s of the jitted step alone on one device-resident batch."""
  mesh, rules, encoder = _setup(config, stage_name)
  stage = build_stage(config.stages[stage_name], text_dim=encoder.embed_dim)
  tc = config_lib.stage_train_config(config, stage_name)
  tx = optim.make_optimizer(tc)
  text_len = int(config.text.max_length)
  state, shardings = state_lib.create_train_state(
    jax.random.PRNGKey(0), stage, tx, mesh, rules, text_len
  )
  fn = step_lib.jit_train_step(
    stage, tx, tc, shardings, mesh, rules, optim.lr_schedule(tc), text_encoder=encoder
  )
  per_process = tc.batch_size // jax.process_count()
  it = trainer._data_iterator(config, stage, per_process, 0)  # pylint: disable=protected-access
  batch = trainer._global_batch(next(it), encoder, text_len, mesh)  # pylint: disable=protected-access
  u_ids, u_mask = encoder.tokenize([""], text_len)
  uncond = {"text_ids": u_ids[0], "text_mask": u_mask[0]}
  rng = jax.random.PRNGKey(1)
  for _ in range(warmup):
    state, metrics = fn(state, batch, rng, uncond, encoder.params)
  jax.block_until_ready((state, metrics))
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = fn(state, batch, rng, uncond, encoder.params)
  jax.block_until_ready((state, metrics))
  return steps * tc.batch_size / (time.perf_counter() - t0)


def whole_loop(config: Any, stage_name: str, steps: int, workdir: str) -> float:
  """Images/s of ``trainer.train_stage`` (into ``workdir``) over its second logging window."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.stages[stage_name].steps_scale = 1.0
    config.train.update(
      dict(
        num_steps=2 * steps,
        log_every=steps,
        sample_every=0,
        checkpoint_every=10**9,
        async_checkpoint=False,
      )
    )
  mesh, rules, encoder = _setup(config, stage_name)
  trainer.train_stage(config, workdir, stage_name, encoder, mesh, rules)
  with open(os.path.join(workdir, stage_name, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return float(lines[-1]["images_per_sec"])


def training_images(config: Any) -> dict:
  """{stage: images its training sees}: num_steps × steps_scale × batch per stage."""
  return {
    name: config_lib.stage_train_config(config, name).num_steps * int(config.train.batch_size)
    for name in config.stage_order
  }


def run(config: Any, stage_name: Optional[str], steps: int) -> dict:
  """Measures both; returns the result with its settings and machine."""
  stage_name = stage_name or config.stage_order[0]
  if stage_name not in config.stages:
    raise ValueError(f"no stage {stage_name!r} in the config; it has {list(config.stages)}")
  with tempfile.TemporaryDirectory() as workdir:
    # A config that fits its word tokenizer (the demo's) gets it as train.py does.
    config = trainer._fit_tokenizer(config, workdir)  # pylint: disable=protected-access
    bare = bare_step(config, stage_name, steps)
    loop = whole_loop(config, stage_name, steps, os.path.join(workdir, "run"))
  images = training_images(config)
  devices = jax.devices()
  machine = (
    f"{cpu_model()}, {os.cpu_count()} cores"
    if devices[0].platform == "cpu"
    else f"{len(devices)} × {devices[0].device_kind}"
  )
  return {
    "stage": stage_name,
    "batch": int(config.train.batch_size),
    "steps": steps,
    "bare_images_per_s": bare,
    "loop_images_per_s": loop,
    "loop_over_bare": loop / bare,
    "training_images": images,
    "predicted_training_s": sum(images.values()) / loop,
    "machine": machine,
    "devices": len(devices),
    "date": datetime.date.today().isoformat(),
    "versions": {"python": platform.python_version(), "jax": jax.__version__},
    "command": " ".join(["python", "-m", "benchmarks.train_loop"] + sys.argv[1:]),
  }


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.train_loop", description=__doc__.split("\n")[0]
  )
  cli.add_config_arg(p)
  p.add_argument("--stage", help="stage to measure (default: the first)")
  p.add_argument(
    "--steps", type=int, default=25, help="timed steps (and the loop's logging window)"
  )
  p.add_argument("--json", help="also write the result to this JSON file")
  try:
    args, rest = p.parse_known_args(argv)
    result = run(cli.config_from_args(args, rest), args.stage, args.steps)
  except (cli.UsageError, ValueError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  print(
    f"{result['command']}\n{result['date']}, {result['machine']}, stage "
    f"{result['stage']}, batch {result['batch']}, {args.steps} steps\n"
  )
  print(
    f"bare jitted step : {result['bare_images_per_s']:.1f} images/s\n"
    f"whole train loop : {result['loop_images_per_s']:.1f} images/s "
    f"({100 * result['loop_over_bare']:.1f}% of the bare step)"
  )
  images = result["training_images"]
  print(
    f"predicted training time on this machine: {result['predicted_training_s'] / 60:.1f} min "
    f"({' + '.join(f'{k} {v:,}' for k, v in images.items())} images at "
    f"{result['loop_images_per_s']:.1f} images/s; data preparation, compiles and sampling "
    "come on top)"
  )
  write_json(args.json, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
