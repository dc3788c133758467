"""Sampling converted DeepFloyd IF stages with our IF DDPM sampler.

IF's semantics (diffusers ``IFPipeline`` / ``IFSuperResolutionPipeline``):

* discrete ``squaredcos_cap_v2`` DDPM, ε prediction, learned-range variance,
  dynamic thresholding (ratio 0.95, ``sample_max_value`` 1.5 for stage I and
  1.0 for stage II), "leading" timestep spacing or a named schedule
  ('smart50', 'fast27', ...);
* classifier-free guidance from one batched call on [uncond; cond], the
  variance channels taken from the conditional half; defaults 7.0 (I), 4.0 (II);
* T5 embeddings of prompts padded to 77 tokens, no text mask in the UNet;
* stage II: the 64px image is upscaled bilinearly with align_corners=True,
  noised to ``noise_level`` (default 250) with the same squared-cosine schedule
  (``image_noising_scheduler.add_noise``), concatenated after x on channels,
  and the level is passed to the UNet's timestep-style class embedding.

``model_fn_for`` gives the sampler-facing ``model_fn(x_t, t, args)``;
``sample_stage`` runs one stage end to end inside one jitted loop.
"""

import functools
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import samplers, schedules
from imagen_jax.models import UNet, UNetConfig


def _interp_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of 1-D linear interpolation, align_corners=True."""
  if size_out == 1:
    pos = np.zeros(1)
  else:
    pos = np.arange(size_out) * (size_in - 1) / (size_out - 1)
  lo = np.clip(np.floor(pos).astype(int), 0, size_in - 1)
  hi = np.minimum(lo + 1, size_in - 1)
  frac = pos - lo
  m = np.zeros((size_out, size_in), np.float32)
  m[np.arange(size_out), lo] += 1 - frac
  m[np.arange(size_out), hi] += frac
  return m


def upscale_align_corners(images: jax.Array, size: int) -> jax.Array:
  """Bilinear resize with align_corners=True (torch ``F.interpolate``), IF-II's upscaling.

  Args:
    images: [B, h, w, C] float.
    size: output height and width.

  Returns:
    [B, size, size, C] float32.
  """
  _, h, w, _ = images.shape
  mh = jnp.asarray(_interp_matrix(h, size))
  mw = jnp.asarray(_interp_matrix(w, size))
  return jnp.einsum("oh,bhwc,pw->bopc", mh, jnp.asarray(images, jnp.float32), mw,
                    precision=jax.lax.Precision.HIGHEST)


def noise_lowres(upscaled: jax.Array, noise_level: Union[int, jax.Array], noise: jax.Array,
                 num_train_steps: int = 1000) -> jax.Array:
  """IF-II's noise augmentation: sqrt(abar) x + sqrt(1 - abar) noise at ``noise_level``.

  Args:
    upscaled: [B, H, W, C] float, the upscaled low-resolution image.
    noise_level: int or [B] ints in [0, num_train_steps).
    noise: [B, H, W, C] standard normal.
    num_train_steps: steps of the image-noising squared-cosine schedule.

  Returns:
    [B, H, W, C] float32.
  """
  ac = jnp.asarray(schedules.alphas_cumprod(schedules.betas_squaredcos_cap_v2(num_train_steps)))
  level = jnp.broadcast_to(jnp.asarray(noise_level, jnp.int32), (upscaled.shape[0],))
  abar = ac[level][:, None, None, None]
  return jnp.sqrt(abar) * upscaled + jnp.sqrt(1.0 - abar) * noise


@functools.lru_cache(maxsize=None)
def model_fn_for(unet_config: UNetConfig):
  """The sampler-facing model function of an IF UNet (one object per config).

  ``model_fn(x_t [N,H,W,3], t [N] int, args) -> [N,H,W,6] float32`` with
  ``args = {'params', 'text_emb' [N,L,D], and for stage II 'lowres' [N,H,W,3]
  (upscaled, noised) and 'noise_level' [N] int}``. Cached so that jitted
  sampler loops, which take it as a static argument, compile once per config.
  """
  model = UNet(unet_config)

  def model_fn(x_t, t, args):
    out = model.apply({"params": args["params"]}, x_t, t,
                      args["text_emb"], None, lowres=args.get("lowres"),
                      noise_level=args.get("noise_level"))
    return out.astype(jnp.float32)

  return model_fn


def stage_timesteps(sample_config: Any, timesteps: Union[None, str, Sequence[int]] = None,
                    num_train_steps: int = 1000) -> tuple[int, ...]:
  """The inference timesteps: an explicit name / list, the config's name, or spaced steps."""
  timesteps = timesteps or sample_config.get("timesteps") or None
  if isinstance(timesteps, str):
    return schedules.named_if_timesteps(timesteps)
  if timesteps is not None:
    return tuple(int(s) for s in timesteps)
  return schedules.if_timesteps(int(sample_config.steps), num_train_steps,
                                sample_config.get("spacing", "leading"),
                                int(sample_config.get("steps_offset", 0)))


def sample_stage(stage_config: Any, params: Any, text_emb: jax.Array,
                 uncond_emb: Optional[jax.Array], rng: jax.Array, *,
                 lowres: Optional[jax.Array] = None, guidance_scale: Optional[float] = None,
                 timesteps: Union[None, str, Sequence[int]] = None,
                 noise_level: Optional[int] = None,
                 max_value: Optional[float] = None) -> jax.Array:
  """Samples one converted IF stage.

  Args:
    stage_config: from ``deepfloyd_if.load_converted`` (or ``build_stage_config``).
    params: the UNet parameters.
    text_emb: [B, L, D] T5 embeddings of the prompts (IF: L = 77, no mask).
    uncond_emb: [B, L, D] embeddings of the negative / empty prompt, or None
      to sample without guidance.
    rng: PRNG key (split for the stage II noise augmentation and the sampler).
    lowres: stage II only: [B, h, w, 3] float in [-1, 1], the stage I output.
    guidance_scale: default ``stage_config.sample.guidance`` (7.0 I, 4.0 II).
    timesteps: a named IF schedule, explicit ints, or None (config / spaced).
    noise_level: stage II augmentation level (default 250).
    max_value: dynamic-thresholding cap (default 1.5 I, 1.0 II, from the scheduler).

  Returns:
    x0: [B, R, R, 3] float32 in [-1, 1], R = stage_config.resolution.
  """
  s = stage_config.sample
  unet_config = UNetConfig.from_config(stage_config.model)
  num_train = int(stage_config.diffusion.num_train_steps)
  b, res = text_emb.shape[0], int(stage_config.resolution)
  rng_aug, rng_sample = jax.random.split(rng)
  args = {"params": params, "text_emb": text_emb}
  if unet_config.lowres_cond:
    if lowres is None:
      raise ValueError(f"stage {stage_config.name} is a super-resolution stage: pass lowres")
    level = int(s.noise_level if noise_level is None else noise_level)
    up = upscale_align_corners(lowres, res)
    args["lowres"] = noise_lowres(up, level, jax.random.normal(rng_aug, up.shape),
                                  int(stage_config.diffusion.get("aug_num_train_steps", 1000)))
    args["noise_level"] = jnp.full((b,), level, jnp.int32)
  elif lowres is not None:
    raise ValueError(f"stage {stage_config.name} takes no lowres image")
  scale = None
  if uncond_emb is not None:
    scale = float(s.guidance if guidance_scale is None else guidance_scale)
    args = {k: (v if k == "params" else jnp.concatenate([v, v]))
            for k, v in args.items()}
    args["text_emb"] = jnp.concatenate([uncond_emb, text_emb])
  return samplers.if_ddpm_sample(
      model_fn_for(unet_config), (b, res, res, 3), rng_sample, args,
      timesteps=stage_timesteps(s, timesteps, num_train), num_train_steps=num_train,
      guidance_scale=scale, threshold=s.threshold, quantile=s.quantile,
      max_value=s.max_value if max_value is None else max_value, variance=s.variance)


def sample_converted_cascade(stage_dirs: Sequence[str], prompts: Sequence[str],
                             rng: jax.Array, *, t5: Optional[str] = None,
                             t5_dtype: str = "float32", num_per_prompt: int = 1,
                             steps: Optional[Sequence[Any]] = None,
                             guidance: Optional[Sequence[Any]] = None):
  """Prompts → converted IF stage I (64px) → stage II (256px), like sample.py.

  Args:
    stage_dirs: ``convert`` outputs in cascade order (stage I first).
    prompts: P prompts.
    rng: PRNG key.
    t5: a local T5 directory (default: the ``text_encoder/`` recorded at
      conversion, with its ``tokenizer/``).
    t5_dtype: compute dtype of the text encoder ('float32' or 'bfloat16').
    num_per_prompt: images per prompt.
    steps, guidance: per-stage overrides (None entries keep the stage's default;
      a step count gives "leading"-spaced timesteps).

  Returns:
    An ``imagen_jax.cascade.CascadeOutput`` (uint8 images of every stage).
  """
  # Wiring-level imports: convert/ may use the cascade's output type and T5.
  from imagen_jax import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.convert import deepfloyd_if  # pylint: disable=g-import-not-at-top
  from imagen_jax.stages import to_uint8  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import TextEncoder  # pylint: disable=g-import-not-at-top

  loaded = [deepfloyd_if.load_converted(d) for d in stage_dirs]
  if loaded[0][0].model.get("lowres_cond"):
    raise ValueError(f"{stage_dirs[0]} is a super-resolution stage; stage I comes first")
  names = [sc.name for sc, _ in loaded]
  steps = cascade_lib.per_stage(steps, names, "steps")
  guidance = cascade_lib.per_stage(guidance, names, "guidance")
  text = loaded[0][0].text
  encoder = TextEncoder.from_pretrained(t5 or text.encoder, dtype=t5_dtype,
                                        tokenizer=None if t5 else text.tokenizer)
  rows = [p for p in prompts for _ in range(num_per_prompt)]
  emb, _ = encoder.encode(rows, int(text.max_length))
  uncond, _ = encoder.encode([""] * len(rows), int(text.max_length))
  images, prev = {}, None
  for k, ((sc, params), n, g) in enumerate(zip(loaded, steps, guidance)):
    if n is not None:
      sc = sc.copy_and_resolve_references()
      sc.sample.steps, sc.sample.timesteps = int(n), ""
    off = isinstance(g, str) and g.lower() in ("off", "none")
    x0 = sample_stage(sc, params, emb.astype(jnp.float32),
                      None if off else uncond.astype(jnp.float32),
                      jax.random.fold_in(rng, k), lowres=prev,
                      guidance_scale=None if (g is None or off) else float(g))
    images[sc.name], prev = np.asarray(to_uint8(x0)), x0
  return cascade_lib.CascadeOutput(prompts=list(prompts), num_per_prompt=num_per_prompt,
                                   images=images, timings={}, settings={})
