"""What every cascade stage shares: image conventions, resizing, sampling settings.

Conventions (one place, used by ``train/``, ``cascade/`` and ``convert/``):

* images are float in [-1, 1] (``to_float`` / ``to_uint8``);
* a stage's model function has the sampler-facing signature
  ``model_fn(x_t, t, args)`` where ``args`` = {params, text_emb, text_mask[,
  lowres and the stage's noise-level input]} and ``t`` is the stage's own time
  (continuous t ∈ [0, 1], or integer DDPM timesteps);
* with classifier-free guidance every per-example input is doubled as
  ``[uncond; cond]`` (``guidance.cfg_batch``).
"""

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.diffusion import guidance as guidance_lib
from imagen_jax.diffusion import sampling
from imagen_jax.models import UNet, UNetConfig, dummy_inputs


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [..., 3] in [0, 255] → float32 in [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: jax.Array) -> jax.Array:
  """float in [-1, 1] → uint8 in [0, 255] (rounded, clipped)."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def resize(x: jax.Array, size: int) -> jax.Array:
  """x: [B, H, W, C] → [B, size, size, C]; antialiased bilinear."""
  b, _, _, c = x.shape
  return jax.image.resize(x, (b, size, size, c), method="linear", antialias=True)


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """The resolved sampling settings of one stage (``config.stages.NAME.sample``).

  Fields that a stage kind does not use keep their defaults. Every field but
  ``sampler``, ``threshold`` and whether ``guidance`` is None is traced by the
  sampler: changing ``steps``, ``timesteps``, ``guidance``, ``quantile``,
  ``max_value`` or ``eta`` does not recompile (``diffusion.sampling``).
  """

  sampler: str  # a name from the stage's ``samplers``
  steps: int  # denoising steps (discrete: spaced timesteps)
  guidance: Optional[float]  # None: no classifier-free guidance
  threshold: str  # 'none' | 'static' | 'dynamic'
  quantile: float  # dynamic thresholding quantile
  max_value: Optional[float]  # cap of the dynamic threshold (None: no cap)
  eta: float = 0.0  # DDIM stochasticity
  aug_level: float = 0.0  # low-res noise level: t_aug ∈ [0, 1] or an int level
  timesteps: tuple = ()  # discrete stages: explicit timesteps, highest first

  @property
  def guided(self) -> bool:
    return self.guidance is not None


def check_settings(s: SampleSettings, samplers: Sequence[str], stage: str) -> None:
  """Raises ValueError naming the stage for settings no sampler can run."""
  if s.sampler not in samplers:
    raise ValueError(f"stage {stage}: sampler {s.sampler!r} is not one of {tuple(samplers)}")
  if s.steps < 1:
    raise ValueError(f"stage {stage}: steps must be >= 1, got {s.steps}")
  if s.guidance is not None and not math.isfinite(s.guidance):
    raise ValueError(f"stage {stage}: guidance must be a finite number, got {s.guidance}")
  guidance_lib.check_threshold_mode(s.threshold)


class Stage:
  """A cascade stage built from ``config.stages.NAME`` (see ``build_stage``).

  Hashable by identity, so ``stage.model_fn`` can be a static argument of the
  jitted samplers: keep one ``Stage`` per stage and the compiled loops are reused.

  Attributes:
    config: the stage config.
    name, resolution, lowres_resolution: from the config.
    unet_config, model: the UNet.
    use_text_mask: whether the UNet sees the text mask (IF's UNets do not).
    samplers: the sampler names this stage runs.
    frozen: top-level groups of the stage's params that training never updates (no
      gradient, no optimizer state: ``train.state.trainable``), e.g. a latent stage's VAE.
  """

  kind = ""
  samplers: tuple = ()
  frozen: tuple = ()

  def __init__(self, stage_config: Any, text_dim: Optional[int] = None):
    self.config = stage_config
    self.name = stage_config.name
    self.resolution = int(stage_config.resolution)
    self.lowres_resolution = stage_config.get("lowres_resolution")
    model_config = dict(stage_config.model)
    if text_dim is not None and model_config.get("text_dim", 4096) != text_dim:
      raise ValueError(
        f"stage {self.name}: model.text_dim={model_config.get('text_dim')} "
        f"but the text encoder gives {text_dim}-wide embeddings"
      )
    self.unet_config = UNetConfig.from_config(model_config)
    self.model = UNet(self.unet_config)
    if bool(self.lowres_resolution) != self.unet_config.lowres_cond:
      raise ValueError(
        f"stage {self.name}: lowres_resolution={self.lowres_resolution} "
        f"but model.lowres_cond={self.unet_config.lowres_cond}"
      )
    self.use_text_mask = bool(stage_config.get("use_text_mask", True))

  @property
  def is_sr(self) -> bool:
    return bool(self.lowres_resolution)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.resolution, self.resolution, self.unet_config.in_channels)

  def init(self, rng: jax.Array, text_len: int = 8) -> Any:
    """Boxed (logically partitioned) parameters for one example shape."""
    inputs = dummy_inputs(self.unet_config, 1, self.resolution, text_len)
    return self.model.init(rng, **inputs)["params"]

  def abstract_params(self, text_len: int = 8) -> Any:
    """Boxed ShapeDtypeStructs of the parameters (nothing allocated)."""
    return jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0), text_len))

  def unet(self, params, x_t, t_model, text_emb, text_mask, lowres, noise_level):
    """The UNet on model-scale inputs; float32 output [B, H, W, C']."""
    out = self.model.apply(
      {"params": nn.unbox(params)},
      x_t,
      t_model,
      text_emb,
      text_mask if self.use_text_mask else None,
      lowres=lowres,
      noise_level=noise_level,
    )
    return out.astype(jnp.float32)

  # The kind-specific half (``ContinuousStage``, ``DiscreteStage``).

  def model_fn(self, x_t, t, args):
    """Sampler-facing model function; ``t`` in the stage's own time."""
    raise NotImplementedError

  def loss_noise(self, rng, x0) -> dict:
    """The loss's random draws for x0 [B, R, R, C]: a dict of [B, ...] arrays.

    Drawn for a whole batch, then split row-wise (gradient accumulation), the
    microbatches see exactly the randomness of the whole batch.
    """
    raise NotImplementedError

  def loss(self, params, x0, text_emb, text_mask, rng=None, noise=None) -> jax.Array:
    """Per-example training loss [B] for clean images x0 [B, R, R, C] in [-1, 1].

    ``noise``: ``loss_noise(rng, x0)`` of these rows (default: drawn from ``rng``).
    """
    raise NotImplementedError

  def sample_settings(
    self,
    sample_config: Any,
    steps: Optional[int] = None,
    guidance: Any = None,
    sampler: Optional[str] = None,
  ) -> SampleSettings:
    """``config.stages.NAME.sample`` with optional overrides, validated."""
    raise NotImplementedError

  def lowres_inputs(self, prev: jax.Array, settings: SampleSettings, rng: jax.Array) -> dict:
    """Model inputs conditioning on the previous stage's x0 [B, r, r, C] at sampling."""
    raise NotImplementedError

  def sampler_schedule(self) -> tuple[dict, dict]:
    """The stage's schedule for the sampler: (SamplerSpec fields, make_options fields).

    Continuous: ({logsnr_fn}, {}); discrete: ({schedule, variance},
    {alphas_cumprod}). A latent stage gives its own table the same way.
    """
    raise NotImplementedError

  def sample(
    self,
    args: dict,
    settings: SampleSettings,
    batch: int,
    rng: jax.Array,
    edit: Optional[dict] = None,
  ) -> jax.Array:
    """Runs the stage's sampler (one jitted loop): x0 [batch, R, R, C] float32.

    Builds the static ``SamplerSpec`` and the traced ``SamplerOptions`` from
    ``settings`` and the stage's schedule and calls ``sampling.sample``; no
    sampler name is special here.

    ``args`` holds params, text and low-res inputs, already doubled as
    [uncond; cond] when ``settings.guided``. ``edit``: the editing inputs
    (``x_init`` + ``strength`` for image-to-image, ``known`` + ``mask`` for
    inpainting; see ``imagen_jax.diffusion.loop``).
    """
    return self.run_sampler(args, settings, (batch,) + self.image_shape, rng, edit)

  def run_sampler(
    self,
    args: dict,
    settings: SampleSettings,
    shape: tuple,
    rng: jax.Array,
    edit: Optional[dict] = None,
    **option_fields: Any,
  ) -> jax.Array:
    """``sample``'s loop on samples of ``shape`` [B, H, W, C] (a latent stage's
    latents); ``option_fields``: extra ``make_options`` fields of the stage."""
    images = dict(edit or {})
    strength = images.pop("strength", 1.0)
    spec_fields, schedule_options = self.sampler_schedule()
    spec = sampling.SamplerSpec(
      settings.sampler,
      prediction=self.prediction,
      threshold=settings.threshold,
      edit=sampling.edit_kind(images),
      guided=settings.guided,
      **spec_fields,
    )
    options = sampling.make_options(
      spec,
      steps=settings.steps,
      timesteps=settings.timesteps or None,
      guidance_scale=settings.guidance,
      quantile=settings.quantile,
      max_value=settings.max_value,
      eta=settings.eta,
      strength=strength,
      **schedule_options,
      **option_fields,
    )
    return sampling.sample(spec, self.model_fn, tuple(shape), rng, args, options, images)
