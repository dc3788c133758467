"""Samples images from a cascade: prompts → every stage → PNG files.

  python sample.py --workdir runs/demo --prompt "a red circle in the top left"
      [--prompt ...] [--prompts_file F] [--num_per_prompt N] [--seed S]
      [--steps 64,32] [--guidance 5,3] [--sampler ddim,ddim]
      [--negative_prompt TEXT] [--batch_size B] [--out DIR]
      [--init_image PATH [--strength S] [--mask PATH]]       # image-to-image, inpainting
      [--lowres_image PATH --start_stage sr]                 # super-resolve an image
      [--offload text|stages]              # encoders/stages in host memory between uses
  python sample.py --workdir if_I,if_II --prompt "..."   # converted DeepFloyd IF
  python sample.py --workdir if_I,if_II,x4 --prompt "..."   # IF + the x4 upscaler: 1024 px
  python sample.py --workdir sd15 --prompt "..."         # converted Stable Diffusion
  python sample.py ... --coordinator_address HOST:PORT --num_processes N --process_id I

--workdir is a training run, a converted DeepFloyd IF stage folder or
Stable Diffusion folder (``python -m imagen_jax.convert stable-diffusion``), a
comma-separated list of them in cascade order ('if_I,if_II,x4', 'sd15,x4') or a
folder holding them (``--cascade`` is a synonym). Each stage encodes the prompts
with its own text encoder: the T5 of IF stages (``--t5`` replaces it; Stable
Diffusion stages keep their CLIP tower and tokenizer). Writes ``{prompt:03d}_{sample:02d}.png`` per
final image, ``grid.png`` (captioned), ``grid_{stage}.png`` per stage and
``prompts.json`` (default directory: WORKDIR/samples_<timestamp>). --steps,
--guidance and --sampler take one value per stage, comma-separated, in cascade
order ('off' disables guidance for a stage). Bad input (no checkpoint, no
prompts, an unreadable prompts file, lists of the wrong length, an unusable
--out) exits with status 2 and a one-line reason before any model is loaded.

Several processes (one per host, flags as train.py's; or detected as JAX
does): each samples its share of the batches on its own devices, process 0
writes every image. The images are those one process makes with the same
--batch_size, a multiple of each process's device count (batch c always
samples with the same key).
"""

import argparse
import logging
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from PIL import Image

from imagen_jax import cascade as cascade_lib
from imagen_jax import run as run_lib
from imagen_jax.cascade import edits as edits_lib
from imagen_jax.cascade.text import T5 as T5_KEY
from imagen_jax.cascade.text import encoder_key
from imagen_jax.parallel import distributed
from imagen_jax.stages import build_stage, stage_text_dim


class UsageError(Exception):
  """Bad command-line input: reported without a traceback, exit status 2."""


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--workdir",
    help="the run: a train.py workdir, or converted DeepFloyd IF / Stable Diffusion "
    "folders (comma-separated in cascade order, e.g. if_I,if_II,x4), or a folder holding them",
  )
  p.add_argument("--cascade", help="synonym of --workdir (converted stages)")
  p.add_argument(
    "--t5",
    help="a local T5 directory replacing the T5 stages' text encoder "
    "(for converted IF stages: default the text_encoder/ recorded at conversion; "
    "Stable Diffusion stages keep their CLIP encoder)",
  )
  p.add_argument("--t5_dtype", default=None, help="float32 or bfloat16 (default: the run's)")
  p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  p.add_argument("--prompts_file", help="a UTF-8 text file with one prompt per line")
  p.add_argument(
    "--negative_prompt",
    action="append",
    default=[],
    help="replaces the empty prompt in guidance: once for all prompts, or "
    "once per prompt (repeatable)",
  )
  p.add_argument("--num_per_prompt", type=int, default=1, help="images per prompt")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", help="steps per stage, e.g. 64,32 (default: the config's)")
  p.add_argument("--guidance", help="guidance per stage, e.g. 5,3 (default: the config's)")
  p.add_argument("--sampler", help="sampler per stage, e.g. ddim,ddpm (default: the config's)")
  p.add_argument(
    "--noise_level",
    help="the low-res input's noise level of the super-resolution stages: one value for "
    "all of them (e.g. 20) or one per stage, 'none' for the others (e.g. none,0.1); "
    "Imagen's stages take t in [0, 1], IF-II and the x4 upscaler an integer level "
    "(default: the config's)",
  )
  p.add_argument(
    "--batch_size", type=int, default=None, help="images per jitted call (default: all at once)"
  )
  p.add_argument(
    "--init_image",
    help="image-to-image: start from this image (square; resized to the start stage's resolution)",
  )
  p.add_argument(
    "--strength",
    type=float,
    default=None,
    help="with --init_image: noise level to start from, 0 (the image) .. 1 "
    "(text-to-image; default 1 with --mask, 0.6 without)",
  )
  p.add_argument(
    "--mask",
    help="with --init_image: inpainting mask, white = regenerate "
    "(square; resized to each stage's resolution, nearest neighbour)",
  )
  p.add_argument(
    "--lowres_image",
    help="the low-resolution input of a super-resolution "
    "--start_stage (super-resolve your own image)",
  )
  p.add_argument("--start_stage", help="the first stage to run (default: the cascade's first)")
  p.add_argument("--out", help="output directory (default: WORKDIR/samples_<timestamp>)")
  p.add_argument(
    "--offload",
    choices=cascade_lib.residency.MODES,
    default="none",
    help="keep params in host memory between their uses, for a cascade that does not fit "
    "the accelerator at once: 'text' (the text encoders, on the devices only while they "
    "encode), 'stages' (also each stage, on the devices only for its turn); default none",
  )
  distributed.add_flags(p)
  return p.parse_args(argv)


def read_image(path: Optional[str], what: str, mode: str = "RGB"):
  """A square image file → uint8 array ([H, W, 3] for RGB, [H, W] for L); None if no path.

  Alpha is composited on black; 16-bit images are scaled to 8 bits.
  """
  if path is None:
    return None
  if not os.path.isfile(path):
    raise UsageError(f"{what} {path!r} does not exist")
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = Image.fromarray(
          (np.asarray(im, np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
        )
      if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im.alpha_composite(rgba)
      im = im.convert(mode)
  except (OSError, ValueError) as e:
    raise UsageError(f"{what} {path!r} cannot be read as an image ({e})") from None
  if im.width != im.height:
    raise UsageError(
      f"{what} {path!r} is {im.width}x{im.height}: the stages are square, crop it to a square first"
    )
  return np.asarray(im)


def read_prompts(prompts: Sequence[str], prompts_file: Optional[str]) -> list:
  """--prompt values, then the prompts file's non-empty lines."""
  prompts = list(prompts)
  if prompts_file:
    if not os.path.isfile(prompts_file):
      raise UsageError(f"prompts file {prompts_file!r} does not exist")
    try:
      with open(prompts_file, encoding="utf-8-sig") as f:
        prompts += [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
      raise UsageError(
        f"prompts file {prompts_file!r} is not UTF-8 text ({e.reason} at byte {e.start})"
      ) from None
  if any(not p.strip() for p in prompts):
    raise UsageError("a --prompt is empty")
  if not prompts:
    raise UsageError(
      "no prompts: give --prompt TEXT (repeatable) or --prompts_file FILE"
      + (f" ({prompts_file!r} has no prompts)" if prompts_file else "")
    )
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
    example = {int: "32", float: "3", str: "ddim"}[kind]
    raise UsageError(
      f"--{name} has {len(values)} value{'s' * (len(values) != 1)} but the "
      f"cascade has {len(stage_names)} stages ({', '.join(stage_names)}): "
      f"give one per stage, e.g. --{name} " + ",".join([example] * len(stage_names))
    )
  return values


def parse_noise_level(text: Optional[str], stage_names) -> Any:
  """'20' → 20.0 (every super-resolution stage); 'none,0.1' → [None, 0.1]; None → None."""
  if text is None:
    return None
  if "," not in text:
    value = parse_per_stage(text, "noise_level", float, ["one"])[0]
    return None if isinstance(value, str) else value
  values = parse_per_stage(text, "noise_level", float, stage_names)
  return [None if isinstance(v, str) else v for v in values]


def check_out_dir(out: str) -> None:
  """Refuses an --out that is a file or cannot be created/written, before sampling."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise UsageError(f"--out {out!r} is a file, not a directory")
  parent = out
  while not os.path.exists(parent):
    parent = os.path.dirname(parent) or "."
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UsageError(f"--out {out!r}: {parent!r} is not writable")


def check_inputs(args: argparse.Namespace):
  """Validates everything cheap before loading any model.

  Returns:
    (workdir, prompts, config, the ``cascade.SampleRequest`` of the flags).
  """
  if args.workdir and args.cascade:
    raise UsageError("give --workdir or its synonym --cascade, not both")
  workdir = args.workdir or args.cascade
  if not workdir:
    raise UsageError(
      "give --workdir: a trained run or converted DeepFloyd IF / Stable Diffusion stages"
    )
  prompts = read_prompts(args.prompt, args.prompts_file)
  if args.num_per_prompt < 1:
    raise UsageError(f"--num_per_prompt must be >= 1, got {args.num_per_prompt}")
  if args.batch_size is not None and args.batch_size < 1:
    raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
  if len(args.negative_prompt) not in (0, 1, len(prompts)):
    raise UsageError(
      f"--negative_prompt given {len(args.negative_prompt)} times: give it "
      f"once (for every prompt) or once per prompt ({len(prompts)})"
    )
  if args.strength is not None:
    try:
      edits_lib.check_strength(args.strength, flag="--")
    except ValueError as e:
      raise UsageError(str(e)) from None
  if (args.strength is not None or args.mask) and not args.init_image:
    raise UsageError("--strength and --mask need --init_image")
  if args.t5_dtype not in (None, "float32", "bfloat16"):
    raise UsageError(f"--t5_dtype must be float32 or bfloat16, got {args.t5_dtype!r}")
  if args.out:
    check_out_dir(args.out)
  config = run_lib.read_config(workdir)
  if (args.t5 or args.t5_dtype) and all(
    encoder_key(config.stages[n]) != T5_KEY for n in config.stage_order
  ):
    raise UsageError(
      "--t5/--t5_dtype: no stage of this cascade takes T5 (Stable Diffusion stages use "
      "their own CLIP encoder)"
    )
  if args.t5:
    config.text.path, config.text.tokenizer = args.t5, ""
  if args.t5_dtype:
    config.text.dtype = args.t5_dtype
  names = list(config.stage_order)
  try:
    edits_lib.check_start(
      names,
      [bool(config.stages[n].get("lowres_resolution")) for n in names],
      args.start_stage,
      has_lowres=bool(args.lowres_image),
      has_init=bool(args.init_image),
      flag="--",
    )
  except ValueError as e:
    raise UsageError(str(e)) from None
  overrides = dict(
    steps=parse_per_stage(args.steps, "steps", int, names),
    guidance=parse_per_stage(args.guidance, "guidance", float, names),
    sampler=parse_per_stage(args.sampler, "sampler", str, names),
  )
  per = {k: cascade_lib.per_stage(v, names, k) for k, v in overrides.items()}
  overrides["noise_level"] = parse_noise_level(args.noise_level, names)
  stages = {n: build_stage(config.stages[n], text_dim=stage_text_dim(config, n)) for n in names}
  try:
    sample_configs = cascade_lib.noise_level_configs(
      {n: config.stages[n].sample for n in names},
      {n: stages[n].is_sr for n in names},
      overrides["noise_level"],
    )
  except ValueError as e:
    raise UsageError(f"--{e}") from None
  for i, name in enumerate(names):
    stage = stages[name]
    if stage.kind == "latent":
      run_lib.sd_tokenizer_dir(stage.text_encoder_spec["folder"])  # one line if absent
    stage.sample_settings(
      sample_configs[name], per["steps"][i], per["guidance"][i], per["sampler"][i]
    )
  edits = dict(
    init_image=read_image(args.init_image, "--init_image"),
    mask=read_image(args.mask, "--mask", mode="L"),
    lowres_image=read_image(args.lowres_image, "--lowres_image"),
    start_stage=args.start_stage,
  )
  if (
    edits["mask"] is not None
    and edits["init_image"] is not None
    and (edits["mask"].shape[0] != edits["init_image"].shape[0])
  ):
    edits["mask"] = np.asarray(
      Image.fromarray(edits["mask"]).resize(edits["init_image"].shape[:2], Image.NEAREST)
    )
  if args.init_image:
    edits["strength"] = args.strength if args.strength is not None else 1.0 if args.mask else 0.6
  request = cascade_lib.SampleRequest(
    num_per_prompt=args.num_per_prompt,
    batch_size=args.batch_size,
    negative_prompt=args.negative_prompt or None,
    **overrides,
    **edits,
  )
  return workdir, prompts, config, request


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices
  try:
    distributed.initialize_from_args(args)  # before any device work
    workdir, prompts, config, request = check_inputs(args)
    cascade = cascade_lib.Cascade.from_workdir(workdir, config=config, offload=args.offload)
  except (UsageError, FileNotFoundError, ValueError) as e:
    print(f"sample.py: error: {e}", file=sys.stderr)
    return 2
  out = cascade.sample(prompts, jax.random.key(args.seed), request)
  if not distributed.is_primary():
    return 0  # every process sampled its share; process 0 writes them all
  base_dir = (
    workdir
    if os.path.isdir(workdir) and "," not in workdir
    else os.path.dirname(os.path.abspath(workdir.split(",")[0]))
  )
  out_dir = args.out or os.path.join(base_dir, time.strftime("samples_%Y%m%d_%H%M%S"))
  files = cascade_lib.save_outputs(out, out_dir)
  print(cascade_lib.timings_table(out))
  print(
    f"wrote {len(files['images'])} images, {os.path.basename(files['grid'])} and "
    f"prompts.json to {files['dir']}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
