"""Builds the golden DeepFloyd IF fixtures under tests/fixtures/if_*/ (PyTorch + diffusers).

Never run by the tests or CI; rerun by hand after changing a fixture:

    pip install torch==2.13.0 diffusers   # or: pip install -r tools/requirements.txt
    python tools/make_if_fixtures.py [--out tests/fixtures]
    pip uninstall -y torch diffusers      # transformers imports torch when present

(A throwaway ``python -m venv --system-site-packages`` keeps torch out of the
main environment altogether.)

Writes two tiny random diffusers IF model folders built from the real IF block
types (ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D,
UNetMidBlock2DSimpleCrossAttn, SimpleCrossAttnUpBlock2D, ResnetUpsampleBlock2D;
text_proj encoder projection, 'text' addition embedding, group-norm on the
text, scale-shift ResBlocks with skip_time_act and output scale √2, exact GELU,
6 output channels):

- if_stage1: IF-I style (3 → 6 channels, 16×16); weights rounded to bfloat16
  and saved as ``unet/diffusion_pytorch_model.safetensors`` in BF16.
- if_stage2: IF-II style (x and the upscaled low-res image → 6 channels,
  ``class_embed_type='timestep'`` for the noise level, a cross-only attention
  level and a cross-only mid block, 2 ResBlocks per level); weights rounded to
  float16 and saved as the fp16 variant
  ``unet/diffusion_pytorch_model.fp16.safetensors``.

Each folder has a fake ``model_index.json``, ``scheduler/scheduler_config.json``
(IF's DDPMScheduler settings; stage II also ``image_noising_scheduler/``) and a
``reference.npz``. No text encoder is stored: tests copy tests/fixtures/t5_v1_1
(d_model 40 = the UNets' encoder_hid_dim) into ``text_encoder/`` and
``tokenizer/``. Reference arrays are NHWC (transposed from torch's NCHW):

  unet_x [B,H,W,3], unet_t [B] int, unet_text [B,L,40], unet_out [B,H,W,6]
  (stage II: unet_lowres [B,H,W,3], unet_noise_level [B] int), computed in
  float32 from the rounded weights;
  step_* : DDPMScheduler.step on random (eps, v) outputs with explicit noise at
  custom timesteps (step_t, step_prev_t [S]; step_model_out [S,B,H,W,6];
  step_x_t, step_noise, step_x_prev, step_x0 [S,B,H,W,3]);
  timesteps_leading_{n}: set_timesteps(n) timesteps;
  stage II also: up_lowres [B,h,w,3], up_noise [B,H,W,3], up_noise_level [],
  up_out [B,H,W,3] (bilinear align_corners upscaling then add_noise).
"""

import argparse
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from imagen_jax.convert import if_config  # noqa: E402  (imports no jax: fine in a torch venv)

TEXT_DIM = 40  # d_model of tests/fixtures/t5_v1_1
TEXT_LEN = 5
RES = 16
COMMON = dict(
  act_fn="gelu",
  addition_embed_type="text",
  addition_embed_type_num_heads=4,
  attention_head_dim=8,
  cross_attention_dim=32,
  cross_attention_norm="group_norm",
  encoder_hid_dim=TEXT_DIM,
  encoder_hid_dim_type="text_proj",
  mid_block_type="UNetMidBlock2DSimpleCrossAttn",
  norm_num_groups=4,
  norm_eps=1e-5,
  out_channels=6,
  resnet_out_scale_factor=2**0.5,
  resnet_skip_time_act=True,
  resnet_time_scale_shift="scale_shift",
  time_embedding_act_fn="gelu",
  flip_sin_to_cos=True,
  freq_shift=0,
  sample_size=RES,
  block_out_channels=(8, 16, 16),
)
STAGE1 = dict(
  COMMON,
  in_channels=3,
  layers_per_block=1,
  down_block_types=(
    "ResnetDownsampleBlock2D",
    "SimpleCrossAttnDownBlock2D",
    "SimpleCrossAttnDownBlock2D",
  ),
  up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
)
STAGE2 = dict(
  COMMON,
  in_channels=6,
  layers_per_block=(2, 1, 2),
  class_embed_type="timestep",
  down_block_types=(
    "ResnetDownsampleBlock2D",
    "SimpleCrossAttnDownBlock2D",
    "SimpleCrossAttnDownBlock2D",
  ),
  up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
  only_cross_attention=(False, False, True),
  mid_block_only_cross_attention=True,
)
SCHEDULER = if_config.IF_SCHEDULER  # IF's released DDPMScheduler settings
NOISING_SCHEDULER = dict(
  _class_name="DDPMScheduler",
  beta_end=0.02,
  beta_schedule="squaredcos_cap_v2",
  beta_start=0.0001,
  clip_sample=True,
  clip_sample_range=1.0,
  num_train_timesteps=1000,
  prediction_type="epsilon",
  variance_type="fixed_small",
  thresholding=False,
)
STEP_TIMESTEPS = [999, 800, 799, 500, 17, 1, 0]


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)


def build_unet(config: dict, dtype: torch.dtype, seed: int) -> UNet2DConditionModel:
  """A random UNet whose float32 weights are exactly representable in `dtype`."""
  torch.manual_seed(seed)
  unet = UNet2DConditionModel(**config).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in unet.named_parameters():
      if p.ndim == 1 and ("norm" in name):  # norms start at ones / zeros
        base = 1.0 if name.endswith("weight") else 0.0
        p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))
      elif p.ndim == 1:  # biases: make them visible
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      p.copy_(p.to(dtype).float())
  return unet


def write_folder(
  path: str, unet, dtype, variant, pipeline: str, noising: bool, max_value: float
) -> None:
  """A diffusers pipeline folder holding the UNet and scheduler configs."""
  if os.path.isdir(path):
    shutil.rmtree(path)
  os.makedirs(path)
  index = {
    "_class_name": pipeline,
    "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDPMScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "watermarker": [None, None],
  }
  if noising:
    index["image_noising_scheduler"] = ["diffusers", "DDPMScheduler"]
  with open(os.path.join(path, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)
  unet.to(dtype).save_pretrained(
    os.path.join(path, "unet"), safe_serialization=True, variant=variant
  )
  unet.float()
  schedulers = {"scheduler": dict(SCHEDULER, sample_max_value=max_value)}
  if noising:
    schedulers["image_noising_scheduler"] = NOISING_SCHEDULER
  for name, cfg in schedulers.items():
    os.makedirs(os.path.join(path, name))
    with open(os.path.join(path, name, "scheduler_config.json"), "w") as f:
      json.dump(cfg, f, indent=2)


def unet_reference(unet, gen, stage2: bool) -> dict:
  """Fixed inputs and the UNet's float32 outputs (NHWC)."""
  x = torch.randn(2, 3, RES, RES, generator=gen)
  t = torch.tensor([999, 17])
  text = torch.randn(2, TEXT_LEN, TEXT_DIM, generator=gen)
  ref = {"unet_x": nhwc(x), "unet_t": t.numpy(), "unet_text": text.numpy()}
  kwargs = {}
  if stage2:
    lowres = torch.randn(2, 3, RES, RES, generator=gen)
    level = torch.tensor([250, 0])
    x_in = torch.cat([x, lowres], dim=1)
    kwargs["class_labels"] = level
    ref.update(unet_lowres=nhwc(lowres), unet_noise_level=level.numpy())
  else:
    x_in = x
  with torch.no_grad():
    out = unet(x_in, t, encoder_hidden_states=text, **kwargs).sample
  ref["unet_out"] = nhwc(out)
  return ref


def step_reference(max_value: float, gen) -> dict:
  """DDPMScheduler steps (learned range, dynamic thresholding) with explicit noise."""
  sched = DDPMScheduler.from_config(dict(SCHEDULER, sample_max_value=max_value))
  sched.set_timesteps(timesteps=STEP_TIMESTEPS)
  out = {k: [] for k in ("t", "prev_t", "model_out", "x_t", "noise", "x_prev", "x0")}
  for i, t in enumerate(STEP_TIMESTEPS):
    eps = torch.randn(2, 3, 4, 4, generator=gen)
    v = 2 * torch.rand(2, 3, 4, 4, generator=gen) - 1
    x_t = 1.5 * torch.randn(2, 3, 4, 4, generator=gen)
    model_out = torch.cat([eps, v], dim=1)
    seed = 1000 + i
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    x_prev, x0 = sched.step(
      model_out, t, x_t, generator=torch.Generator().manual_seed(seed), return_dict=False
    )
    prev_t = STEP_TIMESTEPS[i + 1] if i + 1 < len(STEP_TIMESTEPS) else -1
    assert int(sched.previous_timestep(t)) == prev_t
    for k, val in (
      ("model_out", model_out),
      ("x_t", x_t),
      ("noise", noise),
      ("x_prev", x_prev),
      ("x0", x0),
    ):
      out[k].append(nhwc(val))
    out["t"].append(t)
    out["prev_t"].append(prev_t)
  ref = {f"step_{k}": np.stack(v) for k, v in out.items()}
  for n in (27, 50, 100):
    s = DDPMScheduler.from_config(SCHEDULER)
    s.set_timesteps(n)
    ref[f"timesteps_leading_{n}"] = s.timesteps.numpy()
  return ref


def upscale_reference(gen) -> dict:
  """IF-II's conditioning image: bilinear align-corners upscaling, then add_noise."""
  lowres = torch.rand(2, 3, RES // 2, RES // 2, generator=gen) * 2 - 1
  up = F.interpolate(lowres, (RES, RES), mode="bilinear", align_corners=True)
  noise = torch.randn(up.shape, generator=gen)
  level = 250
  sched = DDPMScheduler.from_config(NOISING_SCHEDULER)
  noised = sched.add_noise(up, noise, torch.tensor([level] * 2))
  return {
    "up_lowres": nhwc(lowres),
    "up_noise": nhwc(noise),
    "up_noise_level": np.array(level),
    "up_out": nhwc(noised),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join("tests", "fixtures"))
  args = parser.parse_args()
  torch.set_grad_enabled(False)
  stages = [
    ("if_stage1", STAGE1, torch.bfloat16, None, "IFPipeline", 1.5, 0),
    ("if_stage2", STAGE2, torch.float16, "fp16", "IFSuperResolutionPipeline", 1.0, 10),
  ]
  for name, config, dtype, variant, pipeline, max_value, seed in stages:
    stage2 = "class_embed_type" in config
    unet = build_unet(config, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    ref = unet_reference(unet, gen, stage2)
    ref.update(step_reference(max_value, gen))
    if stage2:
      ref.update(upscale_reference(gen))
    path = os.path.join(args.out, name)
    write_folder(path, unet, dtype, variant, pipeline, stage2, max_value)
    np.savez_compressed(os.path.join(path, "reference.npz"), **ref)
    n = sum(p.numel() for p in unet.parameters())
    print(f"{path}: {n} parameters, |out| max {np.abs(ref['unet_out']).max():.3f}")


if __name__ == "__main__":
  main()
