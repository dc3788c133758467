"""Command line: DeepFloyd IF UNets and Stable Diffusion pipelines from diffusers, and back.

  python -m imagen_jax.convert deepfloyd-if --src IF-I-XL-v1.0 --out converted/if_I \
      [--dtype bfloat16] [--variant fp16] [--lowres-resolution 64] [--scheduler DIR]
  python -m imagen_jax.convert stable-diffusion --src stable-diffusion-v1-5 \
      --out converted/sd15 [--dtype bfloat16] [--variant fp16]
  python -m imagen_jax.convert export-diffusers --src converted/if_I --out if_I_unet \
      [--stage if_I] [--dtype float16]

``deepfloyd-if`` reads a diffusers IF pipeline folder or a bare UNet folder
(config.json + safetensors; scheduler settings from ``--scheduler DIR``, else
IF's defaults for the stage) and writes ``--out/config.json`` (the stage
config) and ``--out/params/`` (an orbax checkpoint); read back with
``imagen_jax.convert.deepfloyd_if.load_converted``. ``export-diffusers`` writes
a diffusers ``UNet2DConditionModel`` folder (config.json +
diffusion_pytorch_model.safetensors) from a converted stage or from a
training run's stage (its latest EMA params) whose UNet is IF-layout.

``stable-diffusion`` reads a diffusers StableDiffusionPipeline (1.x/2.x) or
StableDiffusionUpscalePipeline folder (UNet, VAE, CLIP text encoder, schedulers) and
writes ``--out/config.json``, ``--out/params/{unet,vae,text_encoder}`` and the
pipeline's ``tokenizer/`` (sampling needs it; ``imagen_jax.convert.stable_diffusion``);
``export-diffusers`` of such a folder, or of a run fine-tuned from one
(``configs/stable_diffusion.py``, ``--stage``), writes the diffusers pipeline folder back.
Warnings (e.g. a VAE without a plausible scaling_factor) are one line each on stderr.

``--out`` appears only when the whole command succeeded. On failure: one line
naming the file or stage and the problem, exit status 2.
"""

import argparse
import sys
import time
import warnings
from typing import Optional, Sequence

from imagen_jax import run as run_lib
from imagen_jax.convert import deepfloyd_if, if_export, sd_config, sd_export, stable_diffusion

EXIT_ERROR = 2


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m imagen_jax.convert", description=__doc__.splitlines()[0]
  )
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("deepfloyd-if", help="convert a diffusers DeepFloyd IF folder")
  p.add_argument(
    "--src",
    required=True,
    help="IF pipeline folder (model_index.json, unet/, ...) or a bare UNet "
    "folder (config.json + safetensors)",
  )
  p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
  p.add_argument("--dtype", default="float32", choices=deepfloyd_if.DTYPES)
  p.add_argument(
    "--variant",
    default=None,
    help="weights variant to read, e.g. fp16 (default: full precision, falling back to fp16)",
  )
  p.add_argument(
    "--lowres-resolution",
    type=int,
    default=None,
    help="stage II input resolution (default: resolution // 4)",
  )
  p.add_argument(
    "--scheduler",
    default=None,
    help="folder with the scheduler_config.json to use (or a pipeline folder "
    "with scheduler/); default: the pipeline's, else IF's for the stage",
  )
  s = sub.add_parser(
    "stable-diffusion", help="convert a diffusers Stable Diffusion pipeline folder"
  )
  s.add_argument(
    "--src",
    required=True,
    help="StableDiffusionPipeline or StableDiffusionUpscalePipeline folder (model_index.json, "
    "unet/, vae/, text_encoder/, scheduler/)",
  )
  s.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
  s.add_argument("--dtype", default="float32", choices=stable_diffusion.DTYPES)
  s.add_argument(
    "--variant",
    default=None,
    help="weights variant to read, e.g. fp16 (default: full precision, falling back to fp16)",
  )
  e = sub.add_parser(
    "export-diffusers", help="write a diffusers UNet2DConditionModel folder from our params"
  )
  e.add_argument(
    "--src",
    required=True,
    help="a converted IF or Stable Diffusion folder, or a training run's workdir",
  )
  e.add_argument("--stage", default=None, help="stage name (needed when --src holds several)")
  e.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
  e.add_argument(
    "--dtype",
    default="float32",
    choices=sorted(if_export.OUT_DTYPES),
    help="dtype of the written tensors",
  )
  return parser.parse_args(argv)


def _run(args: argparse.Namespace) -> str:
  if args.command == "stable-diffusion":
    out = stable_diffusion.convert(args.src, args.out, dtype=args.dtype, variant=args.variant)
    return f"converted {args.src} -> {out} ({args.dtype})"
  if run_lib.is_converted_sd(args.src):  # a converted SD folder: export it
    out = stable_diffusion.export(args.src, args.out, dtype=args.dtype)
    return f"exported {args.src} -> {out} (diffusers pipeline, {args.dtype})"
  if args.command == "export-diffusers" and sd_export.is_latent_run(args.src, args.stage):
    out = sd_export.export_run(args.src, args.out, stage_name=args.stage, dtype=args.dtype)
    stage = f" stage {args.stage}" if args.stage else ""
    return f"exported {args.src}{stage} -> {out} (diffusers pipeline, {args.dtype})"
  if args.command == "deepfloyd-if":
    out = deepfloyd_if.convert(
      args.src,
      args.out,
      dtype=args.dtype,
      variant=args.variant,
      lowres_resolution=args.lowres_resolution,
      scheduler=args.scheduler,
    )
    return f"converted {args.src} -> {out} ({args.dtype})"
  out = if_export.export(args.src, args.out, stage_name=args.stage, dtype=args.dtype)
  return (
    f"exported {args.src}{f' stage {args.stage}' if args.stage else ''} -> {out} "
    f"(diffusers UNet2DConditionModel, {args.dtype})"
  )


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  start = time.time()
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", sd_config.ConversionWarning)
      done = _run(args)
    for w in caught:
      if not issubclass(w.category, sd_config.ConversionWarning):
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        continue
      print("warning: " + " ".join(str(w.message).split()), file=sys.stderr)
  except (OSError, KeyError, ValueError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print("error: " + " ".join(str(msg).split()), file=sys.stderr)
    return EXIT_ERROR
  print(f"{done} in {time.time() - start:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
