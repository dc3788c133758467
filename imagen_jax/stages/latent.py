"""Stable Diffusion's stages: diffusion in a VAE's latent space (``diffusion.kind='latent'``).

A ``LatentStage`` is a ``Stage`` like the continuous and discrete ones, built from a
converted Stable Diffusion folder (``run.read_sd_stage``) or any stage config of the
same schema:

* the UNet is diffusers' ``UNet2DConditionModel`` (``models.sd_unet.SDUNet``, config
  ``model``), the autoencoder ``models.vae.AutoencoderKL`` (config ``vae``); the stage's
  parameters are ``{'unet': ..., 'vae': ...}`` and the VAE is frozen (no gradient);
* sampling runs the one sampler interface (``diffusion.sampling``) on latents
  [B, R/f, R/f, 4] with the converted scheduler's discrete table (``beta_schedule``,
  ``beta_start``, ``beta_end``, ``num_train_steps``), ε or v prediction, no
  thresholding, then decodes ``latents / scaling_factor``: x0 in [-1, 1] pixels;
* timesteps as diffusers' schedulers: 'ddim' and 'ddpm' on the scheduler's spacing
  and ``steps_offset`` (SD: "leading" + 1); DDIM's last step lands on
  alphas_cumprod[0] when ``set_alpha_to_one`` is false, as diffusers' DDIMScheduler;
  the solvers ('dpmpp_2m', 'euler', 'heun') on "trailing" timesteps ending at x0;
* editing: image-to-image encodes ``x_init`` (the latent mean × scaling_factor);
  inpainting encodes ``known`` and downsamples the mask to the latent size (a latent
  pixel is regenerated when any of its pixels is); ``noise`` (latents) fixes the
  starting latents, as a pipeline's ``latents=`` argument;
* the x4 upscaler (``lowres_resolution`` set, the UNet with ``num_class_embeds``):
  the low-res image [B, R/4, R/4, 3] is noised with the ``diffusion.low_res`` table at
  the integer ``noise_level`` (sample default 100, at most ``max_noise_level``),
  concatenated to the latents on channels, and the level is the class label;
* training: the loss is the ε or v MSE on VAE latents × scaling_factor; the text
  encoder is not part of the stage (``text_encoder_spec`` names it: its folder and
  whether the penultimate layer is used), the cascade runs it.
"""

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import grids, losses, sampling, schedules
from imagen_jax.models.sd_unet import SDUNet, SDUNetConfig, dummy_inputs
from imagen_jax.models.vae import AutoencoderKL, VAEConfig
from imagen_jax.stages import common
from imagen_jax.stages import discrete as discrete_lib

KINDS = ("latent",)
PREDICTIONS = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v"}
# Samplers that step on the scheduler's own timesteps (diffusers' DDIM / DDPM).
_SCHEDULER_SAMPLERS = ("ddim", "ddpm")
DEFAULT_NOISE_LEVEL = 100  # the x4 upscaler's noise level in IF's cascade


def _dataclass_from(cls, values: Any):
  """``cls(**values)`` with lists made tuples, keys the dataclass does not have dropped."""
  names = {f.name for f in dataclasses.fields(cls)}
  values = dict(values)
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})


def table(d: Any) -> np.ndarray:
  """alphas_cumprod [N] float32 of a scheduler section (beta_schedule, beta_start, ...)."""
  name = str(d.get("beta_schedule", "scaled_linear"))
  kwargs = {k: float(d[k]) for k in ("beta_start", "beta_end") if d.get(k) is not None}
  if name == "squaredcos_cap_v2":
    kwargs = {}
  return schedules.alphas_cumprod(
    schedules.get_betas(name, int(d.get("num_train_steps", 1000)), **kwargs)
  )


class LatentStage(common.Stage):
  """A Stable Diffusion or x4-upscaler stage (``diffusion.kind = 'latent'``).

  Attributes (beyond ``Stage``'s): vae_config, vae; factor (pixels per latent pixel);
  latent_shape; scaling_factor; alphas_cumprod and, for the upscaler,
  lowres_alphas_cumprod and max_noise_level; text_encoder_spec.
  """

  kind = "latent"
  samplers = sampling.SAMPLERS
  frozen = ("vae",)  # the trainer updates the UNet only

  def __init__(self, stage_config: Any, text_dim: Optional[int] = None):  # pylint: disable=super-init-not-called
    # Stage.__init__ builds Imagen's UNet; a latent stage has its own modules.
    self.config = stage_config
    self.name = stage_config.name
    self.resolution = int(stage_config.resolution)
    self.lowres_resolution = stage_config.get("lowres_resolution")
    self.unet_config = _dataclass_from(SDUNetConfig, stage_config.model)
    self.model = SDUNet(self.unet_config)
    self.vae_config = _dataclass_from(VAEConfig, stage_config.vae)
    self.vae = AutoencoderKL(self.vae_config)
    self.use_text_mask = False  # the SD UNet attends to every token
    if text_dim is not None and text_dim != self.unet_config.cross_attention_dim:
      raise ValueError(
        f"stage {self.name}: model.cross_attention_dim={self.unet_config.cross_attention_dim} "
        f"but the text encoder gives {text_dim}-wide embeddings"
      )
    self.factor = self.vae_config.downsample_factor
    if self.resolution % (self.factor * 2 ** (len(self.unet_config.block_out_channels) - 1)):
      raise ValueError(
        f"stage {self.name}: resolution {self.resolution} is not a multiple of the VAE "
        f"factor {self.factor} times the UNet's downsampling"
      )
    size = self.resolution // self.factor
    self.latent_shape = (size, size, self.vae_config.latent_channels)
    self.scaling_factor = float(self.vae_config.scaling_factor)
    self._init_diffusion(stage_config.diffusion)
    text = stage_config.get("text_encoder") or {}
    self.text_encoder_spec = dict(
      folder=str(text.get("folder", "")), penultimate=bool(text.get("penultimate", False))
    )

  def _init_diffusion(self, d: Any) -> None:
    prediction = str(d.get("prediction", "eps"))
    if prediction not in PREDICTIONS:
      raise ValueError(
        f"stage {self.name}: prediction {prediction!r} is not one of {tuple(PREDICTIONS)}"
      )
    self.prediction = PREDICTIONS[prediction]
    self.num_train_steps = int(d.get("num_train_steps", 1000))
    self.alphas_cumprod = table(d)
    self.set_alpha_to_one = bool(d.get("set_alpha_to_one", False))
    sr = bool(self.unet_config.num_class_embeds)
    if sr != bool(self.lowres_resolution):
      raise ValueError(
        f"stage {self.name}: lowres_resolution={self.lowres_resolution} but the UNet "
        f"{'has' if sr else 'has no'} noise-level class labels (num_class_embeds)"
      )
    if sr:
      self.lowres_alphas_cumprod = table(d.get("low_res") or {})
      self.max_noise_level = int(d.get("max_noise_level", 350))

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.resolution, self.resolution, self.vae_config.out_channels)

  def init(self, rng: jax.Array, text_len: int = 8) -> Any:
    """Boxed parameters {'unet', 'vae'} for one example shape."""
    r_unet, r_vae = jax.random.split(rng)
    inputs = dummy_inputs(self.unet_config, 1, self.latent_shape[0], text_len)
    image = jnp.zeros((1, self.factor, self.factor, self.vae_config.in_channels))
    return dict(
      unet=self.model.init(r_unet, **inputs)["params"],
      vae=self.vae.init(r_vae, image)["params"],
    )

  def unet(self, params, x_t, t_model, text_emb, text_mask, lowres, noise_level):
    """The SD UNet on latents x_t [B, h, w, 4]; float32 ε or v [B, h, w, 4]."""
    del text_mask  # not an input of diffusers' UNet
    return self.model.apply(
      {"params": nn.unbox(params["unet"])},
      x_t,
      t_model,
      text_emb,
      lowres=lowres,
      noise_level=noise_level,
    )

  @functools.partial(jax.jit, static_argnums=0)
  def encode(self, params, images: jax.Array) -> jax.Array:
    """images [B, R, R, 3] in [-1, 1] → latents [B, R/f, R/f, 4] × scaling_factor (the mean)."""
    mean = self.vae.apply({"params": nn.unbox(params["vae"])}, images, method="encode")
    return mean * self.scaling_factor

  @functools.partial(jax.jit, static_argnums=0)
  def decode(self, params, latents: jax.Array) -> jax.Array:
    """latents [B, h, w, 4] (scaled) → images [B, h f, w f, 3] clipped to [-1, 1]."""
    z = latents / self.scaling_factor
    image = self.vae.apply({"params": nn.unbox(params["vae"])}, z, method="decode")
    return jnp.clip(image, -1.0, 1.0)

  def model_fn(self, x_t, t, args):
    """``args`` = {params, text_emb[, lowres, noise_level]}; t: [N] int timesteps."""
    return self.unet(
      args["params"],
      x_t,
      t,
      args["text_emb"],
      None,
      args.get("lowres"),
      args.get("noise_level"),
    )

  # The x4 upscaler's low-res input.

  def lowres_from(self, images: jax.Array, noise_level: jax.Array, noise: jax.Array) -> jax.Array:
    """The upscaler's noised low-res input: sqrt(abar) x + sqrt(1 - abar) noise.

    Args:
      images: [B, r, r, 3] in [-1, 1] (resized to lowres_resolution if r differs).
      noise_level: [B] ints in [0, max_noise_level].
      noise: [B, R/4, R/4, 3] standard normal (the pipeline's first draw).

    Returns:
      [B, R/4, R/4, 3] float32, concatenated to the latents by the UNet.
    """
    if images.shape[1] != self.lowres_resolution:
      images = common.resize(images, self.lowres_resolution)
    abar = jnp.asarray(self.lowres_alphas_cumprod)[noise_level][:, None, None, None]
    return jnp.sqrt(abar) * images + jnp.sqrt(1.0 - abar) * noise

  def lowres_inputs(self, prev, settings, rng) -> dict:
    level = jnp.full((prev.shape[0],), settings.aug_level, jnp.int32)
    shape = (prev.shape[0], self.lowres_resolution, self.lowres_resolution, prev.shape[-1])
    noise = jax.random.normal(rng, shape, jnp.float32)
    return {"lowres": self.lowres_from(prev, level, noise), "noise_level": level}

  # Training (the UNet; VAE frozen, text embeddings given).

  def loss_noise(self, rng, x0) -> dict:
    """{t [B], eps [B, h, w, 4]; x4: level [B], aug_eps [B, R/4, R/4, 3]}."""
    r_t, r_eps, r_lvl, r_aug = jax.random.split(rng, 4)
    b = x0.shape[0]
    noise = {}
    if self.is_sr:
      noise["level"] = jax.random.randint(r_lvl, (b,), 0, self.max_noise_level + 1)
      lr = self.lowres_resolution
      noise["aug_eps"] = jax.random.normal(r_aug, (b, lr, lr, x0.shape[-1]))
    noise["t"] = jax.random.randint(r_t, (b,), 0, self.num_train_steps)
    noise["eps"] = jax.random.normal(r_eps, (b,) + self.latent_shape, jnp.float32)
    return noise

  def loss(self, params, x0, text_emb, text_mask, rng=None, noise=None) -> jax.Array:
    """Per-example ε / v MSE [B] on the latents of x0 [B, R, R, 3]; the VAE gets no gradient."""
    noise = self.loss_noise(rng, x0) if noise is None else noise
    params = dict(params, vae=jax.lax.stop_gradient(params["vae"]))
    z0 = jax.lax.stop_gradient(self.encode(params, x0))
    lowres = level = None
    if self.is_sr:
      level = noise["level"]
      lowres = self.lowres_from(common.resize(x0, self.lowres_resolution), level, noise["aug_eps"])
    t, eps = noise["t"], noise["eps"]
    logsnr = jnp.asarray(grids.discrete_logsnr_table(self.alphas_cumprod))[t]
    x_t = losses.q_sample(z0, eps, logsnr)
    out = self.unet(params, x_t, t, text_emb, text_mask, lowres, level)
    return losses.diffusion_loss(out, losses.get_target(self.prediction, z0, eps, logsnr))

  # Sampling.

  def sample_settings(
    self,
    sample_config: Any,
    steps: Optional[int] = None,
    guidance: Any = None,
    sampler: Optional[str] = None,
  ) -> common.SampleSettings:
    """``sample`` config (sampler, steps, spacing, steps_offset, guidance, eta,
    noise_level) with overrides; spacing as diffusers' schedulers (module docstring)."""
    s = dict(sample_config)
    name = str(sampler or s.get("sampler", "ddim"))
    if steps is not None:
      s["steps"], s["timesteps"] = int(steps), ""
    if name not in _SCHEDULER_SAMPLERS:
      s["spacing"], s["steps_offset"] = "trailing", 0
    settings = discrete_lib.table_settings(
      self,
      s,
      name,
      guidance,
      threshold="none",
      quantile=0.995,
      aug_level=(
        discrete_lib.integer_level(self.name, s.get("noise_level", DEFAULT_NOISE_LEVEL))
        if self.is_sr
        else 0
      ),
    )
    if self.is_sr and not 0 <= settings.aug_level <= self.max_noise_level:
      raise ValueError(
        f"stage {self.name}: noise_level must be in [0, {self.max_noise_level}], "
        f"got {settings.aug_level}"
      )
    return settings

  def sampler_schedule(self) -> tuple[dict, dict]:
    return dict(schedule="discrete"), dict(alphas_cumprod=self.alphas_cumprod)

  def latent_edit(self, params, edit: Optional[dict], batch: int) -> dict:
    """Pixel-space edit inputs → the sampler's latent-space ones (see the module docstring).

    ``edit``: {x_init [B, R, R, 3], strength} / {known [B, R, R, 3], mask [B, R, R, 1]
    (1 = regenerate)[, x_init, strength]}, optionally noise [B, h, w, 4] (latents).
    """
    out = dict(edit or {})
    for key in ("x_init", "known"):
      if out.get(key) is not None:
        out[key] = self.encode(params, jnp.asarray(out[key], jnp.float32))
    if out.get("mask") is not None:
      mask = jnp.asarray(out["mask"], jnp.float32)
      h, f = self.latent_shape[0], self.factor
      out["mask"] = mask.reshape(batch, h, f, h, f, mask.shape[-1]).max(axis=(2, 4))
    return out

  def sample_latents(self, args, settings, batch, rng, edit=None) -> jax.Array:
    """``sample`` before decoding: latents [batch, R/f, R/f, 4] (× scaling_factor)."""
    images = self.latent_edit(args["params"], edit, batch)
    final = {}
    if settings.sampler == "ddim" and not self.set_alpha_to_one:
      final["final_alpha_cumprod"] = float(self.alphas_cumprod[0])
    shape = (batch,) + self.latent_shape
    return self.run_sampler(args, settings, shape, rng, images, **final)

  def sample(self, args, settings, batch, rng, edit=None) -> jax.Array:
    """Samples latents with the sampler and decodes them: x0 [batch, R, R, 3] in [-1, 1].

    ``args``: {params {'unet', 'vae'}, text_emb [B or 2B, L, D][, lowres, noise_level]}
    (doubled as [uncond; cond] when guided); ``edit``: pixel-space edit inputs
    (``latent_edit``).
    """
    return self.decode(args["params"], self.sample_latents(args, settings, batch, rng, edit))
