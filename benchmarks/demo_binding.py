"""Attribute binding on the shapes demo: train stages of a config variant, score them.

Each row of the demo-binding table in ``benchmarks/RESULTS.md`` is one run of
this script: it trains the named stages (default: the base stage alone, the
one that decides which object goes where) and scores the cascade up to the
last of them with the pixel checker (``imagen_jax.eval.shapes``) on single- and
two-object test prompts and on held-out compositions, separately:

  python -m benchmarks.demo_binding --config configs/demo.py --workdir runs/bind/base \\
      [--config.text.fit_tokenizer=words] [--stage base] [--num 80] [--holdout 40]

The workdir keeps the run: re-running the command re-scores it (the trainer
resumes and finds nothing left to train), e.g. with other sampling flags.
Writes ``WORKDIR/binding.json`` and prints one table row.
"""

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from imagen_jax import cli


def parse_args(argv: Optional[Sequence[str]]):
  p = argparse.ArgumentParser(prog="python -m benchmarks.demo_binding", description=__doc__)
  cli.add_config_arg(p)
  p.add_argument("--workdir", required=True)
  p.add_argument("--stage", action="append", default=None, help="default: the first stage")
  p.add_argument("--num", type=int, default=80, help="test prompts per object count")
  p.add_argument("--holdout", type=int, default=40, help="held-out prompts per object count")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--guidance", help="guidance per stage, e.g. 3 or 3,1")
  p.add_argument("--steps", help="sampling steps per stage")
  p.add_argument("--sampler", help="sampler per stage")
  p.add_argument("--eta", type=float, help="DDIM eta of every stage (1 = ancestral)")
  p.add_argument(
    "--train_prompts",
    type=int,
    default=0,
    help="also score this many captions per object count of the train split "
    "(captions the model trained on: fitting, not generalization)",
  )
  p.add_argument("--skip_train", action="store_true", help="score the workdir as it is")
  args, rest = p.parse_known_args(argv)
  return args, cli.config_from_args(args, rest)


def train_captions(config, num: int, objects: int) -> list:
  """The first `num` captions with `objects` objects of the run's prepared train split."""
  from imagen_jax.data import shapes, shapes_builder  # pylint: disable=g-import-not-at-top

  kwargs = dict(config.data.get("builder_kwargs") or {})
  share = float(kwargs.get("two_object_share", 0.5))
  holdout = shapes.parse_compositions(kwargs.get("holdout", shapes_builder.DEFAULT_HOLDOUT))
  seed = int(kwargs.get("seed", 0))
  out, i = [], 0
  while len(out) < num:
    if shapes_builder.num_objects("train", i, share) == objects:
      out.append(shapes.sample_scene((seed, 0, i), 8, holdout=holdout, num_objects=objects)[1])
    i += 1
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  args, config = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top

  from imagen_jax import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.eval import shapes as shapes_eval  # pylint: disable=g-import-not-at-top
  from imagen_jax.train import trainer  # pylint: disable=g-import-not-at-top

  stages = list(args.stage or config.stage_order[:1])
  start = time.perf_counter()
  if not args.skip_train:
    trainer.train_and_evaluate(config, args.workdir, stages)
  train_s = time.perf_counter() - start
  run_config = run_lib.read_config(args.workdir)
  order = list(run_config.stage_order)
  run_config.stage_order = tuple(order[: max(order.index(s) for s in stages) + 1])
  if args.eta is not None:
    for name in run_config.stage_order:
      run_config.stages[name].sample.eta = args.eta
  cascade = cascade_lib.Cascade.from_workdir(args.workdir, config=run_config)
  per_stage = shapes_eval._per_stage_arg  # pylint: disable=protected-access
  kw = dict(
    steps=per_stage(args.steps, int),
    guidance=per_stage(args.guidance, float),
    sampler=per_stage(args.sampler, str),
  )
  holdout, data_seed = shapes_eval.data_settings(run_config)
  rows = {}
  for split, num in (("test", args.num), ("holdout", args.holdout), ("train", args.train_prompts)):
    if not num or (split == "holdout" and not holdout):
      continue
    for objects in (1, 2):
      if split == "train":
        captions = train_captions(run_config, num, objects)
      else:
        captions = shapes_eval.split_captions(split, num, holdout, data_seed, objects)
      summary, _, _ = shapes_eval.evaluate(
        cascade, captions, jax.random.key(args.seed), holdout=holdout, progress=False, **kw
      )
      rows[f"{split}_{objects}"] = summary["accuracy"]
  result = dict(
    workdir=args.workdir,
    stages=stages,
    train_s=round(train_s, 1),
    accuracy=rows,
    num=args.num,
    holdout=args.holdout,
    sampling={
      k: v for k, v in vars(args).items() if k in ("guidance", "steps", "sampler", "seed", "eta")
    },
  )
  with open(os.path.join(args.workdir, "binding.json"), "w") as f:
    json.dump(result, f, indent=1)
  cells = " | ".join(f"{k} {v:.0%}" for k, v in rows.items())
  print(f"| {args.workdir} | {cells} | train {train_s / 60:.1f} min |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
