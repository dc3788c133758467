"""One stage interface for every model kind.

``build_stage(config.stages.NAME)`` gives a ``ContinuousStage`` (Imagen's
continuous-time log-SNR diffusion; ``diffusion.kind`` absent or 'continuous')
or a ``DiscreteStage`` (DeepFloyd IF's discrete DDPM with learned-range
variance; 'discrete'). Both expose the same methods to the train step
(``loss``) and the cascade (``sample_settings``, ``lowres_inputs``,
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
from imagen_jax.stages import discrete as _discrete

KINDS = ("continuous",) + _discrete.KINDS


def stage_kind(stage_config: Any) -> str:
  """'continuous' or 'discrete' from ``stage_config.diffusion.kind``."""
  kind = str(stage_config.diffusion.get("kind", "continuous") or "continuous")
  if kind not in KINDS:
    raise ValueError(
      f"stage {stage_config.get('name')}: diffusion.kind={kind!r} is not one of {KINDS}"
    )
  return "continuous" if kind == "continuous" else "discrete"


def build_stage(stage_config: Any, text_dim: Optional[int] = None) -> Stage:
  """The stage object of ``config.stages.NAME``, by its ``diffusion.kind``."""
  cls = ContinuousStage if stage_kind(stage_config) == "continuous" else DiscreteStage
  return cls(stage_config, text_dim)
