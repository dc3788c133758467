"""Samples images from a trained cascade: prompts → every stage → PNG files.

  python sample.py --workdir runs/demo --prompt "a red circle in the top left"
      [--prompt ...] [--prompts_file F] [--num_per_prompt N] [--seed S]
      [--steps 64,32] [--guidance 5,3] [--batch_size B] [--out DIR]
  python sample.py --cascade if_I,if_II [--t5 T5_DIR] --prompt "..."   # DeepFloyd IF

Writes ``{prompt:03d}_{sample:02d}.png`` per final image, ``grid.png``,
``grid_{stage}.png`` per stage and ``prompts.json`` (default directory:
WORKDIR/samples_<timestamp>). --steps and --guidance take one value per stage,
comma-separated, in cascade order ('off' disables guidance for a stage). Bad
input (no checkpoint, no prompts, a missing prompts file, lists of the wrong
length) exits with status 2 and a one-line reason.
"""

import argparse
import logging
import os
import sys
import time
from typing import Optional, Sequence

import jax

from imagen_jax import cascade as cascade_lib
from imagen_jax.convert import if_sampling
from imagen_jax.train import checkpoint as ckpt_lib


class UsageError(Exception):
  """Bad command-line input: reported without a traceback, exit status 2."""


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", help="the run's workdir (train.py --workdir)")
  p.add_argument("--cascade", help="instead of --workdir: converted DeepFloyd IF stage "
                 "directories, comma-separated, stage I first (python -m imagen_jax.convert)")
  p.add_argument("--t5", help="with --cascade: a local T5 directory (default: the "
                 "text_encoder/ recorded at conversion)")
  p.add_argument("--t5_dtype", default="float32", help="with --cascade: float32 or bfloat16")
  p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  p.add_argument("--prompts_file", help="a text file with one prompt per line")
  p.add_argument("--num_per_prompt", type=int, default=1, help="images per prompt")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", help="steps per stage, e.g. 64,32 (default: the config's)")
  p.add_argument("--guidance", help="guidance per stage, e.g. 5,3 (default: the config's)")
  p.add_argument("--batch_size", type=int, default=None,
                 help="images per jitted call (default: all at once)")
  p.add_argument("--out", help="output directory (default: WORKDIR/samples_<timestamp>)")
  return p.parse_args(argv)


def read_prompts(prompts: Sequence[str], prompts_file: Optional[str]) -> list:
  """--prompt values, then the prompts file's non-empty lines."""
  prompts = list(prompts)
  if prompts_file:
    if not os.path.isfile(prompts_file):
      raise UsageError(f"prompts file {prompts_file!r} does not exist")
    with open(prompts_file, encoding="utf-8") as f:
      prompts += [line.strip() for line in f if line.strip()]
  if any(not p.strip() for p in prompts):
    raise UsageError("a --prompt is empty")
  if not prompts:
    raise UsageError("no prompts: give --prompt TEXT (repeatable) or --prompts_file FILE"
                     + (f" ({prompts_file!r} has no prompts)" if prompts_file else ""))
  return prompts


def parse_per_stage(text: Optional[str], name: str, kind, stage_names) -> Optional[list]:
  """'64,32' → [64, 32], one value per stage (None when the flag is absent)."""
  if text is None:
    return None
  values = []
  for item in text.split(","):
    item = item.strip()
    try:
      values.append(item if kind is float and item.lower() in ("off", "none") else kind(item))
    except ValueError:
      what = "an integer" if kind is int else "a number or 'off'"
      raise UsageError(f"--{name}: {item!r} is not {what}") from None
  if len(values) != len(stage_names):
    raise UsageError(f"--{name} has {len(values)} value{'s' * (len(values) != 1)} but the "
                     f"cascade has {len(stage_names)} stages ({', '.join(stage_names)}): "
                     f"give one per stage, e.g. --{name} "
                     + ",".join(["32" if kind is int else "3"] * len(stage_names)))
  return values


def check_inputs(args: argparse.Namespace):
  """Validates everything cheap before loading any model.

  Returns:
    (prompts, config, steps, guidance).
  """
  if bool(args.workdir) == bool(args.cascade):
    raise UsageError("give exactly one of --workdir (a trained run) or --cascade "
                     "(converted DeepFloyd IF stages)")
  prompts = read_prompts(args.prompt, args.prompts_file)
  if args.num_per_prompt < 1:
    raise UsageError(f"--num_per_prompt must be >= 1, got {args.num_per_prompt}")
  if args.batch_size is not None and args.batch_size < 1:
    raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
  if args.cascade:
    dirs = [d for d in args.cascade.split(",") if d]
    names = [os.path.basename(os.path.normpath(d)) for d in dirs]
    return (prompts, None, parse_per_stage(args.steps, "steps", int, names),
            parse_per_stage(args.guidance, "guidance", float, names))
  config = ckpt_lib.read_config(args.workdir)
  names = list(config.stage_order)
  steps = parse_per_stage(args.steps, "steps", int, names)
  guidance = parse_per_stage(args.guidance, "guidance", float, names)
  for name, s, g in zip(names, cascade_lib.per_stage(steps, names, "steps"),
                        cascade_lib.per_stage(guidance, names, "guidance")):
    cascade_lib.stage_sampling(config.stages[name].sample, s, g)
  return prompts, config, steps, guidance


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices
  try:
    prompts, _, steps, guidance = check_inputs(args)
    if args.cascade:
      out = if_sampling.sample_converted_cascade(
          [d for d in args.cascade.split(",") if d], prompts, jax.random.key(args.seed),
          t5=args.t5, t5_dtype=args.t5_dtype, num_per_prompt=args.num_per_prompt,
          steps=steps, guidance=guidance)
    else:
      cascade = cascade_lib.Cascade.from_workdir(args.workdir)
  except (UsageError, FileNotFoundError, ValueError) as e:
    print(f"sample.py: error: {e}", file=sys.stderr)
    return 2
  if not args.cascade:
    out = cascade.sample(prompts, jax.random.key(args.seed), steps=steps,
                         guidance=guidance, num_per_prompt=args.num_per_prompt,
                         batch_size=args.batch_size)
  base_dir = args.workdir or os.path.dirname(os.path.abspath(args.cascade.split(",")[0]))
  out_dir = args.out or os.path.join(base_dir, time.strftime("samples_%Y%m%d_%H%M%S"))
  files = cascade_lib.save_outputs(out, out_dir)
  if out.timings:
    print(cascade_lib.timings_table(out))
  print(f"wrote {len(files['images'])} images, {os.path.basename(files['grid'])} and "
        f"prompts.json to {files['dir']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
