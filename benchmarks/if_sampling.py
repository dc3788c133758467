"""Throughput of IF-shaped stage I guided sampling, ours alone (no PyTorch needed).

  python -m benchmarks.if_sampling [--width 64] [--batch 4] [--steps 25] \\
      [--dtype float32] [--repeats 2] [--resolution 64] [--json out.json]

The UNet is DeepFloyd IF-I's diffusers block structure (``if_unet_config``) at
``--width``, 64×64, random weights, built as ``sample.py`` builds a converted IF
stage: a diffusers IF folder of JSON files only (no weights, no diffusers import)
read by our IF converter into a stage config, normalized like a converted folder
(``imagen_jax.run``), then ``imagen_jax.stages.build_stage``. Timed: ``stage.sample``
(the cascade's call) with the stage's own sampling settings (``sample_settings``:
IF's DDPM with learned-range variance, dynamic thresholding, ``--steps``
leading-spaced steps) at guidance 7 (IFPipeline's default; the conditional and
unconditional halves in one batched call, 2B rows per UNet call); the median of
``--repeats`` runs after a compiling one. ``benchmarks.peers --which if`` times the
same call against diffusers (``benchmarks.peer_if`` builds on this module).
"""

import argparse
import datetime
import json
import os
import sys
import tempfile
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks.common import TEXT_LEN, time_calls, write_json
from imagen_jax import run as run_lib
from imagen_jax.convert import deepfloyd_if, if_config
from imagen_jax.diffusion import guidance as guidance_lib
from imagen_jax.models import count_params
from imagen_jax.stages import SampleSettings, Stage, build_stage

IF_GUIDANCE = 7.0  # IFPipeline's default
IF_TEXT_DIM = 4096  # T5-XXL's width, what IF's UNets read


def if_unet_config(width: int, res: int, text_dim: int = IF_TEXT_DIM) -> dict:
  """IF-I's diffusers UNet config (4 levels, ×1,2,3,4, attention at the lower 3) at ``width``."""
  ch = (width, 2 * width, 3 * width, 4 * width)
  head_dim = 64 if width % 64 == 0 else 32
  return dict(
    sample_size=res,
    in_channels=3,
    out_channels=6,
    block_out_channels=ch,
    layers_per_block=2,
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    attention_head_dim=head_dim,
    cross_attention_dim=ch[-1],
    encoder_hid_dim=text_dim,
    encoder_hid_dim_type="text_proj",
    addition_embed_type="text",
    addition_embed_type_num_heads=64,
    cross_attention_norm="group_norm",
    act_fn="gelu",
    time_embedding_act_fn="gelu",
    resnet_time_scale_shift="scale_shift",
    resnet_skip_time_act=True,
    resnet_out_scale_factor=2**0.5,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
  )


def write_if_folder(path: str, unet_config: dict, diffusers_version: str = "") -> None:
  """A diffusers IF-I pipeline folder's JSON files: model_index.json, unet/config.json
  and scheduler/ (IF's released scheduler config). Weights, if any, go into unet/."""
  index = {
    "_class_name": "IFPipeline",
    "_diffusers_version": diffusers_version,
    "scheduler": ["diffusers", "DDPMScheduler"],
    "unet": ["diffusers", "UNet2DConditionModel"],
  }
  files = {
    "model_index.json": index,
    "unet/config.json": dict(unet_config, _class_name="UNet2DConditionModel"),
    "scheduler/scheduler_config.json": if_config.IF_SCHEDULER,
  }
  for name, content in files.items():
    os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
    with open(os.path.join(path, name), "w") as f:
      json.dump(content, f, indent=2)


def if_stage(folder: str, dtype: str = "float32") -> Stage:
  """Our stage for an IF folder, configured as a converted IF stage is in a cascade."""
  config = deepfloyd_if.build_stage_config(if_config.read_if_folder(folder), dtype)
  return build_stage(ml_collections.ConfigDict(run_lib.normalize_converted_stage(config.to_dict())))


def guided_sampler(
  stage: Stage, params: Any, text: jax.Array, uncond: jax.Array, steps: int, rng: jax.Array
) -> tuple[SampleSettings, Callable[[], jax.Array]]:
  """(settings, a call of ``stage.sample``): IF-I's guided sampling as the cascade runs it.

  Args:
    stage, params: the stage (``if_stage``) and its unboxed parameters.
    text, uncond: the prompts' and the empty prompts' T5 embeddings [B, L, D].
    steps: sampling steps (the stage's spacing: IF's leading timesteps).

  The call returns x0 [B, R, R, 3] float32; the conditional and unconditional rows
  go through one UNet call of 2B rows per step (``guidance.cfg_batch``).
  """
  settings = stage.sample_settings(stage.config.sample, steps=steps, guidance=IF_GUIDANCE)
  args = guidance_lib.cfg_batch({"text_emb": text}, {"text_emb": uncond})
  args["params"] = params
  batch = text.shape[0]
  return settings, lambda: stage.sample(args, settings, batch, rng)


def random_params(stage: Stage, seed: int = 0) -> Any:
  """Random parameters of the stage's shapes, filled on the host (compiling the init
  program costs more than a short run; timing does not depend on the values)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda a: jnp.asarray(0.02 * rng.standard_normal(a.shape, np.float32), a.dtype),
    nn.unbox(stage.abstract_params(TEXT_LEN)),
  )


def run(
  width: int = 64,
  batch: int = 4,
  steps: int = 25,
  dtype: str = "float32",
  repeats: int = 2,
  res: int = 64,
) -> dict:
  """Times guided stage I sampling; returns one result dict."""
  with tempfile.TemporaryDirectory() as tmp:
    write_if_folder(tmp, if_unet_config(width, res))
    stage = if_stage(tmp, dtype)
  params = random_params(stage)
  rng = np.random.default_rng(1)
  text, uncond = (
    jnp.asarray(rng.standard_normal((batch, TEXT_LEN, IF_TEXT_DIM), np.float32), dtype)
    for _ in range(2)
  )
  settings, sample = guided_sampler(stage, params, text, uncond, steps, jax.random.PRNGKey(0))
  timed = time_calls(sample, repeats, jax.block_until_ready)
  return {
    "date": datetime.date.today().isoformat(),
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "width": width,
    "resolution": res,
    "batch": batch,
    "steps": settings.steps,
    "timesteps": list(settings.timesteps),
    "sampler": settings.sampler,
    "dtype": dtype,
    "params": count_params(params),
    "attention_impl": stage.unet_config.attention_impl,
    "first_call_s": timed["first"],
    "sample_s": timed["median"],
    "images_per_s": batch / timed["median"],
    "unet_calls_per_s": settings.steps / timed["median"],
  }


def _positive(value: str) -> int:
  n = int(value)
  if n < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
  return n


def main(argv: Optional[list] = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.if_sampling", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--width", type=_positive, default=64, help="IF-I's base channel width")
  parser.add_argument("--batch", type=_positive, default=4, help="images per sampling call")
  parser.add_argument("--steps", type=_positive, default=25, help="DDPM steps")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=_positive, default=2, help="timed runs after the first")
  parser.add_argument("--resolution", type=_positive, default=64, help="image side (IF-I: 64)")
  parser.add_argument("--json", default=None, help="also write the result here")
  args = parser.parse_args(argv)
  if args.width % 32:
    parser.error(f"--width must be a multiple of 32 (IF's 32 norm groups), got {args.width}")
  if args.resolution % 8:
    parser.error(f"--resolution must be a multiple of 8 (4 levels), got {args.resolution}")
  out = run(args.width, args.batch, args.steps, args.dtype, args.repeats, args.resolution)
  print(
    f"{out['date']}, {out['device']}, jax {out['jax']}: IF-I width {out['width']} at "
    f"{out['resolution']}×{out['resolution']} "
    f"({out['params'] / 1e6:.1f}M params, {out['dtype']}), B={out['batch']}, "
    f"{out['steps']} guided {out['sampler']} steps: {out['sample_s']:.3f} s → "
    f"{out['images_per_s']:.2f} img/s (first call {out['first_call_s']:.1f} s)"
  )
  write_json(args.json, out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
