"""One stage interface for every model kind.

``build_stage(config.stages.NAME)`` gives a ``ContinuousStage`` (Imagen's
continuous-time log-SNR diffusion; ``diffusion.kind`` absent or 'continuous')
a ``DiscreteStage`` (DeepFloyd IF's discrete DDPM with learned-range
variance; 'discrete') or a ``LatentStage`` (Stable Diffusion and the x4
upscaler: a discrete schedule on VAE latents; 'latent'). All expose the
same methods to the train step (``loss``) and the cascade (``sample_settings``, ``lowres_inputs``,
``sample``, ``model_fn``).
"""

from typing import Any, Optional

from imagen_jax.stages.common import (  # noqa: F401
  SampleSettings,
  Stage,
  resize,
  to_float,
  to_uint8,
)
from imagen_jax.stages.continuous import TIME_SCALE, ContinuousStage  # noqa: F401
from imagen_jax.stages.discrete import (  # noqa: F401
  DiscreteStage,
  noise_lowres,
  upscale_align_corners,
)
from imagen_jax.stages.latent import LatentStage  # noqa: F401
from imagen_jax.stages import discrete as _discrete
from imagen_jax.stages import latent as _latent

KINDS = ("continuous",) + _discrete.KINDS + _latent.KINDS


def stage_kind(stage_config: Any) -> str:
  """'continuous', 'discrete' or 'latent' from ``stage_config.diffusion.kind``."""
  kind = str(stage_config.diffusion.get("kind", "continuous") or "continuous")
  if kind not in KINDS:
    raise ValueError(
      f"stage {stage_config.get('name')}: diffusion.kind={kind!r} is not one of {KINDS}"
    )
  if kind in _latent.KINDS:
    return "latent"
  return "continuous" if kind == "continuous" else "discrete"


def build_stage(stage_config: Any, text_dim: Optional[int] = None) -> Stage:
  """The stage object of ``config.stages.NAME``, by its ``diffusion.kind``."""
  classes = dict(continuous=ContinuousStage, discrete=DiscreteStage, latent=LatentStage)
  return classes[stage_kind(stage_config)](stage_config, text_dim)


def stage_text_dim(config: Any, name: str) -> Optional[int]:
  """The text width stage ``name`` of a cascade config takes: a latent stage's own CLIP
  tower's (``text_encoder.dim``), every other stage's the cascade's T5 (``text.dim``)."""
  stage_config = config.stages[name]
  if stage_kind(stage_config) == "latent":
    return (stage_config.get("text_encoder") or {}).get("dim")
  return config.text.get("dim")
