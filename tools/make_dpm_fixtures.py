"""Builds tests/fixtures/dpm_solver.npz: diffusers DPM-Solver++ on IF's schedule.

Never run by the tests or CI; rerun by hand after changing the fixture, in a
separate virtual environment that has PyTorch and diffusers (the system jax
is used too, for the starting noise):

    python -m venv --system-site-packages ../venv-tools
    ../venv-tools/bin/pip install torch==2.14.1 diffusers==0.42.1
    ../venv-tools/bin/python tools/make_dpm_fixtures.py

Runs `DPMSolverMultistepScheduler` (algorithm_type='dpmsolver++',
solver_order=2, squaredcos_cap_v2 betas, epsilon prediction,
variance_type='learned_range', dynamic thresholding with ratio 0.95 and
sample_max_value 1.5, lower_order_final, final sigma 0) with a fake model
whose output is a fixed function of (x_t, t) that the test replicates in JAX:

    eps_hat = (0.8 + 0.2 cos(t / 250)) x_t + 0.1 (c + 1) sin(t / 150),
    followed by 3 "variance" channels 0.5 x_t (which the solver must drop),

where c is the channel index. The starting sample is the noise our samplers
draw for rng = jax.random.key(SEED): normal(split(rng)[0], shape) (see
imagen_jax/diffusion/loop.py). Arrays are NHWC. For each case NAME:

  NAME_timesteps [S] int, NAME_samples [S + 1, B, H, W, 3] (the start, then
  the sample after each scheduler step).

Plus x_start [B, H, W, 3] and seed [].
"""

import argparse
import os

import jax
import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler

SEED = 0
SHAPE = (2, 4, 4, 3)  # B, H, W, C.
SMART27 = (
  999,
  976,
  952,
  928,
  905,
  882,
  858,
  857,
  810,
  762,
  715,
  714,
  572,
  429,
  428,
  286,
  285,
  238,
  190,
  143,
  142,
  118,
  95,
  71,
  47,
  24,
  0,
)
# name -> (timestep_spacing, num_inference_steps or custom timesteps).
CASES = {
  "leading10": ("leading", 10),
  "trailing20": ("trailing", 20),
  "smart27": ("leading", SMART27),
}


def fake_model(x_nchw: torch.Tensor, t: int) -> torch.Tensor:
  """The deterministic 'UNet': eps channels then 3 ignored channels."""
  t = torch.tensor(float(t), dtype=torch.float32)
  c = torch.arange(x_nchw.shape[1], dtype=torch.float32).reshape(1, -1, 1, 1)
  eps = (0.8 + 0.2 * torch.cos(t / 250.0)) * x_nchw + 0.1 * (c + 1.0) * (torch.sin(t / 150.0))
  return torch.cat([eps, 0.5 * x_nchw], dim=1)


def run_case(spacing, steps, x_start):
  scheduler = DPMSolverMultistepScheduler(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    algorithm_type="dpmsolver++",
    solver_order=2,
    prediction_type="epsilon",
    variance_type="learned_range",
    thresholding=True,
    dynamic_thresholding_ratio=0.95,
    sample_max_value=1.5,
    lower_order_final=True,
    timestep_spacing=spacing,
  )
  if isinstance(steps, int):
    scheduler.set_timesteps(steps)
  else:
    scheduler.set_timesteps(timesteps=list(steps))
  x = torch.from_numpy(x_start.transpose(0, 3, 1, 2).copy())
  samples = [x_start]
  for t in scheduler.timesteps:
    x = scheduler.step(fake_model(x, int(t)), t, x).prev_sample
    samples.append(x.numpy().transpose(0, 2, 3, 1))
  return (scheduler.timesteps.numpy().astype(np.int32), np.stack(samples).astype(np.float32))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="tests/fixtures/dpm_solver.npz")
  out = parser.parse_args().out
  rng_init, _ = jax.random.split(jax.random.key(SEED))
  x_start = np.asarray(jax.random.normal(rng_init, SHAPE, np.float32))
  arrays = {"x_start": x_start, "seed": np.int32(SEED)}
  for name, (spacing, steps) in CASES.items():
    timesteps, samples = run_case(spacing, steps, x_start)
    arrays[f"{name}_timesteps"] = timesteps
    arrays[f"{name}_samples"] = samples
    print(name, "timesteps", timesteps.tolist())
  os.makedirs(os.path.dirname(out), exist_ok=True)
  np.savez_compressed(out, **arrays)
  print("wrote", out, os.path.getsize(out), "bytes")


if __name__ == "__main__":
  main()
