"""Throughput of IF-shaped stage I guided sampling, ours alone (no PyTorch needed).

  python -m benchmarks.if_sampling [--width 64] [--batch 4] [--steps 25] \\
      [--dtype float32] [--repeats 2] [--json out.json]

The UNet is DeepFloyd IF-I's diffusers block structure (``benchmarks.peer_if``'s
``if_unet_config``) at ``--width``, 64×64, random weights, built through our IF
converter's config path (a diffusers folder of JSON files only, no weights and
no diffusers import). Timed: ``imagen_jax.convert.if_sampling.sample_stage``
with guidance 7 (IFPipeline's default; the conditional and unconditional halves
in one batched call, 2B rows per UNet call), dynamic thresholding, ``--steps``
leading-spaced DDPM steps; the median of ``--repeats`` runs after a compiling
one. ``benchmarks.peers --which if`` times the same loop against diffusers.
"""

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.peer_if import IF_GUIDANCE, IF_SCHEDULER, if_unet_config
from benchmarks.peers import TEXT_LEN
from imagen_jax.convert import deepfloyd_if, if_config, if_sampling
from imagen_jax.diffusion import schedules
from imagen_jax.models import UNet, UNetConfig, count_params, dummy_inputs


def _write_config_folder(path: str, width: int, res: int) -> None:
  """model_index.json, unet/config.json and scheduler/ of an IF-I folder (no weights)."""
  os.makedirs(os.path.join(path, "unet"))
  os.makedirs(os.path.join(path, "scheduler"))
  files = {
    "model_index.json": {"_class_name": "IFPipeline"},
    "unet/config.json": dict(if_unet_config(width, res), _class_name="UNet2DConditionModel"),
    "scheduler/scheduler_config.json": IF_SCHEDULER,
  }
  for name, content in files.items():
    with open(os.path.join(path, name), "w") as f:
      json.dump(content, f)


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
    _write_config_folder(os.path.join(tmp, "if"), width, res)
    stage = deepfloyd_if.build_stage_config(
      if_config.read_if_folder(os.path.join(tmp, "if")), dtype
    )
  model = UNet(UNetConfig.from_config(stage.model))
  rng = np.random.default_rng(0)
  # Random values of the right shapes (timing does not depend on them); filled on
  # the host, since compiling the init program costs more than a short run.
  abstract = nn.unbox(
    jax.eval_shape(
      model.init, jax.random.PRNGKey(0), **dummy_inputs(model.config, 1, res, TEXT_LEN)
    )["params"]
  )
  params = jax.tree.map(
    lambda a: jnp.asarray(0.02 * rng.standard_normal(a.shape, np.float32), a.dtype), abstract
  )
  text = jnp.asarray(rng.standard_normal((batch, TEXT_LEN, 4096), np.float32), dtype)
  uncond = jnp.asarray(rng.standard_normal((batch, TEXT_LEN, 4096), np.float32), dtype)
  ts = schedules.if_timesteps(steps, 1000, "leading")
  sample = lambda: jax.block_until_ready(
    if_sampling.sample_stage(
      stage, params, text, uncond, jax.random.PRNGKey(0), guidance_scale=IF_GUIDANCE, timesteps=ts
    )
  )
  t0 = time.perf_counter()
  sample()
  first = time.perf_counter() - t0
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    sample()
    runs.append(time.perf_counter() - t0)
  sec = statistics.median(runs)
  return {
    "date": datetime.date.today().isoformat(),
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "width": width,
    "resolution": res,
    "batch": batch,
    "steps": steps,
    "dtype": dtype,
    "params": count_params(params),
    "attention_impl": model.config.attention_impl,
    "first_call_s": first,
    "sample_s": sec,
    "images_per_s": batch / sec,
    "unet_calls_per_s": steps / sec,
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.if_sampling", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--width", type=int, default=64, help="IF-I's base channel width")
  parser.add_argument("--batch", type=int, default=4, help="images per sampling call")
  parser.add_argument("--steps", type=int, default=25, help="DDPM steps")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=2, help="timed runs after the first")
  parser.add_argument("--json", default=None, help="also write the result here")
  args = parser.parse_args(argv)
  out = run(args.width, args.batch, args.steps, args.dtype, args.repeats)
  print(
    f"{out['date']}, {out['device']}, jax {out['jax']}: IF-I width {out['width']} "
    f"({out['params'] / 1e6:.1f}M params, {out['dtype']}), B={out['batch']}, "
    f"{out['steps']} guided steps: {out['sample_s']:.3f} s → {out['images_per_s']:.2f} "
    f"img/s (first call {out['first_call_s']:.1f} s)"
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
