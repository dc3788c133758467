"""Builds the golden Stable Diffusion fixtures under tests/fixtures/sd_*/ (PyTorch +
diffusers + transformers, never needed by the package or the tests).

Rerun by hand after changing a fixture, from the repository root, in a tools venv
(tools/requirements.txt):

    python tools/make_sd_fixtures.py [--out tests/fixtures]

Writes three tiny random diffusers pipeline folders (no tokenizer: the references
take token ids; no safety checker), each with a ``reference.npz``:

- sd_v1_tiny (StableDiffusionPipeline, SD 1.x style): UNet with 1×1-conv projections
  (float32, one file), quick-GELU CLIP text encoder saved as the fp16 variant only, a
  2-level VAE (factor 2), DDIM with scaled_linear betas and ε prediction.
- sd_v2_tiny (StableDiffusionPipeline, SD 2.x style): UNet with linear projections,
  upcast_attention and per-block head counts, float16 in shards with an index; a
  3-layer GELU CLIP text encoder; v prediction.
- sd_x4_tiny (StableDiffusionUpscalePipeline): UNet with 7 input channels (latents and
  the noised low-res image), ``num_class_embeds`` for the noise level and
  per-block ``only_cross_attention``; a 3-level VAE (factor 4, scaling factor
  0.08333); the DDPM ``low_res_scheduler``; ``max_noise_level`` 350.

Everything but the sd_v1 UNet is stored in float16. Weights are random (norm scales
and biases perturbed so that every tensor matters) and rounded to their stored dtype;
references are computed in float32 from the rounded weights. Arrays are NHWC
(transposed from torch's NCHW):

  unet_x [B,h,w,4], unet_t [B], unet_text [B,L,D], unet_out [B,h,w,4]
    (x4: unet_lowres [B,h,w,3], unet_noise_level [B] int);
  vae_x [B,H,W,3], vae_mean [B,h,w,4] (encode().latent_dist.mean), vae_z [B,h,w,4],
    vae_decoded [B,H,W,3] (decode(z).sample);
  text_ids [B,L] int, text_hidden [B,L,D] (last_hidden_state),
    text_hidden_skip1 [B,L,D] (final_layer_norm(hidden_states[-2]), clip_skip=1);
  pipe_*: the pipeline run for 2 DDIM steps with classifier-free guidance 7.5 on
    prompt/negative embeddings of text_ids rows 0/1 (pipe_prompt_embeds,
    pipe_negative_embeds), fixed latents (pipe_latents), giving pipe_out_latents
    (output_type='latent') and pipe_image [B,H,W,3] in [0,1] (output_type='np'); x4
    also pipe_lowres [B,h,w,3] in [-1,1], pipe_noise (the low-res noise the pipeline
    draws first from torch.Generator seed pipe_seed), pipe_noise_level.
"""

import argparse
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
  AutoencoderKL,
  DDIMScheduler,
  DDPMScheduler,
  StableDiffusionPipeline,
  StableDiffusionUpscalePipeline,
  UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

TEXT_LEN = 7
VOCAB = 64
SD_SCHEDULER = dict(
  beta_start=0.00085,
  beta_end=0.012,
  beta_schedule="scaled_linear",
  clip_sample=False,
  set_alpha_to_one=False,
  steps_offset=1,
)


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().float().permute(0, 2, 3, 1).numpy()


def perturb(model: torch.nn.Module, gen: torch.Generator, dtype: torch.dtype) -> None:
  """Random norm scales/biases (1 ± 0.3, ± 0.1), then every tensor rounded to dtype."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        base = 1.0 if name.endswith("weight") and "norm" in name else 0.0
        p.copy_(base + (0.3 if base else 0.1) * torch.randn(p.shape, generator=gen))
      p.copy_(p.to(dtype).float())


def text_encoder(act: str, layers: int, seed: int, dtype) -> CLIPTextModel:
  torch.manual_seed(seed)
  config = CLIPTextConfig(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=layers,
    num_attention_heads=2,
    max_position_embeddings=TEXT_LEN,
    hidden_act=act,
    bos_token_id=VOCAB - 2,
    eos_token_id=VOCAB - 1,
    pad_token_id=VOCAB - 1,
  )
  model = CLIPTextModel(config).eval()
  perturb(model, torch.Generator().manual_seed(seed), dtype)
  return model


def vae(levels: int, scaling: float, seed: int) -> AutoencoderKL:
  torch.manual_seed(seed)
  model = AutoencoderKL(
    block_out_channels=(4, 8, 8)[:levels],
    down_block_types=("DownEncoderBlock2D",) * levels,
    up_block_types=("UpDecoderBlock2D",) * levels,
    layers_per_block=1,
    norm_num_groups=2,
    latent_channels=4,
    scaling_factor=scaling,
  ).eval()
  perturb(model, torch.Generator().manual_seed(seed), torch.float16)
  return model


UNETS = {
  "sd_v1_tiny": dict(
    block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
    cross_attention_dim=16,
  ),
  "sd_v2_tiny": dict(
    block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(1, 2),
    cross_attention_dim=16,
    use_linear_projection=True,
    upcast_attention=True,
  ),
  "sd_x4_tiny": dict(
    in_channels=7,
    block_out_channels=(8, 16, 16),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=(True, True, False),
    attention_head_dim=2,
    cross_attention_dim=16,
    use_linear_projection=True,
    num_class_embeds=360,
  ),
}


def unet(name: str, seed: int, dtype) -> UNet2DConditionModel:
  torch.manual_seed(seed)
  model = UNet2DConditionModel(
    sample_size=8, out_channels=4, layers_per_block=1, norm_num_groups=4, **UNETS[name]
  ).eval()
  perturb(model, torch.Generator().manual_seed(seed), dtype)
  return model


@torch.no_grad()
def component_refs(pipe, gen: torch.Generator, size: int, x4: bool) -> dict:
  """UNet, VAE and text encoder outputs on fixed random inputs (float32)."""
  f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
  ref = {}
  ids = torch.randint(0, VOCAB - 2, (2, TEXT_LEN), generator=gen)
  ids[:, 0], ids[0, 5], ids[1, 3] = VOCAB - 2, VOCAB - 1, VOCAB - 1  # bos ... eos
  out = pipe.text_encoder(ids, output_hidden_states=True)
  ref["text_ids"] = ids.numpy()
  ref["text_hidden"] = out.last_hidden_state.numpy()
  tower = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)  # transformers 4 / 5
  ref["text_hidden_skip1"] = tower.final_layer_norm(out.hidden_states[-2]).numpy()
  x = torch.randn(2, 4, size, size, generator=gen)
  t = torch.tensor([999, 17])
  text = torch.randn(2, TEXT_LEN, 16, generator=gen)
  kwargs = {}
  if x4:
    lowres = torch.randn(2, 3, size, size, generator=gen)
    ref["unet_lowres"], ref["unet_noise_level"] = nhwc(lowres), np.array([350, 20])
    kwargs["class_labels"] = torch.tensor([350, 20])
    x_in = torch.cat([x, lowres], 1)
  else:
    x_in = x
  ref.update(unet_x=nhwc(x), unet_t=t.numpy(), unet_text=text.numpy())
  ref["unet_out"] = nhwc(pipe.unet(x_in, t, text, **kwargs).sample)
  image = torch.rand(2, 3, size * f, size * f, generator=gen) * 2 - 1
  z = torch.randn(2, 4, size, size, generator=gen)
  ref.update(vae_x=nhwc(image), vae_z=nhwc(z))
  ref["vae_mean"] = nhwc(pipe.vae.encode(image).latent_dist.mean)
  ref["vae_decoded"] = nhwc(pipe.vae.decode(z).sample)
  return ref


@torch.no_grad()
def pipeline_refs(pipe, ref: dict, gen: torch.Generator, size: int, x4: bool) -> dict:
  """Two DDIM steps of the pipeline with guidance on fixed latents (and noise)."""
  ids = torch.from_numpy(ref["text_ids"])
  embeds = pipe.text_encoder(ids).last_hidden_state
  latents = torch.randn(1, 4, size, size, generator=gen)
  out = dict(pipe_prompt_embeds=embeds[:1].numpy(), pipe_negative_embeds=embeds[1:].numpy())
  out["pipe_latents"] = nhwc(latents)
  kwargs = dict(
    prompt_embeds=embeds[:1],
    negative_prompt_embeds=embeds[1:],
    latents=latents,
    num_inference_steps=2,
    guidance_scale=7.5,
  )
  if x4:
    seed, level = 3, 20
    lowres = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    kwargs.update(image=lowres, noise_level=level)
    out.update(pipe_lowres=nhwc(lowres), pipe_noise_level=np.array(level))
    out["pipe_seed"] = np.array(seed)
    out["pipe_noise"] = nhwc(
      torch.randn(lowres.shape, generator=torch.Generator().manual_seed(seed))
    )
    run = lambda kind: pipe(  # noqa: E731
      **kwargs, output_type=kind, generator=torch.Generator().manual_seed(seed)
    )
  else:
    h = size * pipe.vae_scale_factor
    run = lambda kind: pipe(**kwargs, height=h, width=h, output_type=kind)  # noqa: E731
  out["pipe_out_latents"] = nhwc(run("latent").images)
  out["pipe_image"] = run("np").images
  out["pipe_guidance_scale"], out["pipe_steps"] = np.array(7.5), np.array(2)
  return out


def build(name: str, seed: int):
  if name == "sd_x4_tiny":
    low_res = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)
    scheduler = DDIMScheduler(
      beta_schedule="scaled_linear",
      beta_start=0.0001,
      beta_end=0.02,
      prediction_type="v_prediction",
      clip_sample=False,
      set_alpha_to_one=False,
      steps_offset=1,
    )
    return StableDiffusionUpscalePipeline(
      vae=vae(3, 0.08333, seed),
      text_encoder=text_encoder("gelu", 2, seed + 1, torch.float16),
      tokenizer=None,
      unet=unet(name, seed + 2, torch.float16),
      low_res_scheduler=low_res,
      scheduler=scheduler,
      max_noise_level=350,
    )
  sd2 = name == "sd_v2_tiny"
  return StableDiffusionPipeline(
    vae=vae(2, 0.18215, seed),
    text_encoder=text_encoder(
      "gelu" if sd2 else "quick_gelu", 3 if sd2 else 2, seed + 1, torch.float16
    ),
    tokenizer=None,
    unet=unet(name, seed + 2, torch.float16 if sd2 else torch.float32),
    scheduler=DDIMScheduler(prediction_type="v_prediction" if sd2 else "epsilon", **SD_SCHEDULER),
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )


def _resave(pipe, path: str, part: str, **kwargs) -> None:
  """Rewrites component ``part`` of the saved pipeline in float16 (weights already
  rounded to it), with save_pretrained's ``kwargs`` (variant, max_shard_size)."""
  shutil.rmtree(os.path.join(path, part))
  module = getattr(pipe, part)
  module.to(torch.float16).save_pretrained(
    os.path.join(path, part), safe_serialization=True, **kwargs
  )
  module.float()


def save(pipe, path: str, name: str) -> None:
  """The pipeline folder: the sd1 UNet in float32 (one file), everything else in
  float16; the sd1 text encoder as the fp16 variant only, the sd2 UNet in shards."""
  if os.path.isdir(path):
    shutil.rmtree(path)
  pipe.save_pretrained(path, safe_serialization=True)
  _resave(pipe, path, "vae")
  _resave(pipe, path, "text_encoder", **({"variant": "fp16"} if name == "sd_v1_tiny" else {}))
  if name != "sd_v1_tiny":
    _resave(pipe, path, "unet", **({"max_shard_size": "40KB"} if name == "sd_v2_tiny" else {}))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join("tests", "fixtures"))
  args = parser.parse_args()
  for i, name in enumerate(UNETS):
    pipe = build(name, 10 * i)
    x4 = name == "sd_x4_tiny"
    gen = torch.Generator().manual_seed(100 + i)
    ref = component_refs(pipe, gen, 4, x4)
    ref.update(pipeline_refs(pipe, ref, gen, 4, x4))
    path = os.path.join(args.out, name)
    save(pipe, path, name)
    np.savez_compressed(os.path.join(path, "reference.npz"), **ref)
    with open(os.path.join(path, "model_index.json")) as f:
      print(name, json.load(f)["_class_name"], "->", path)


if __name__ == "__main__":
  main()
