"""Editing inputs of a cascade call: image-to-image, inpainting, a later start stage.

``check_start`` is the one place for the start-stage rules (which stage runs
first, and whether it needs a low-resolution image); ``Cascade.sample`` and
sample.py's early checks both call it. ``make_plan`` validates a call's editing
inputs into an ``EditPlan``, which gives each stage its sampler edit inputs.
"""

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.stages import Stage, resize


def check_start(
  names: Sequence[str],
  is_sr: Sequence[bool],
  start_stage: Optional[str],
  has_lowres: bool,
  has_init: bool,
  flag: str = "",
) -> int:
  """The index of the first stage to run, after checking the start-stage rules.

  Args:
    names: the cascade's stage names, in order.
    is_sr: per stage, whether it is a super-resolution stage.
    start_stage: the requested first stage (None: the cascade's first).
    has_lowres: a low-resolution image was given.
    has_init: an init image was given (it doubles as the low-res input).
    flag: prefix of the option names in messages ('--' for the command line).

  Raises:
    ValueError: an unknown start stage, a super-resolution start stage without
      a low-resolution image, or a low-resolution image for a text-only start.
  """
  names = list(names)
  if start_stage is not None and start_stage not in names:
    raise ValueError(
      f"{flag}start_stage {start_stage!r} is not in the cascade ({', '.join(names)})"
    )
  start = names.index(start_stage) if start_stage is not None else 0
  if is_sr[start] and not (has_lowres or has_init):
    raise ValueError(
      f"{flag}start_stage {names[start]!r} is a super-resolution stage: starting there "
      f"needs a low-resolution image ({flag}lowres_image)"
    )
  if has_lowres and not is_sr[start]:
    raise ValueError(
      f"{flag}lowres_image needs a super-resolution {flag}start_stage; "
      f"{names[start]!r} generates from text alone"
    )
  return start


def check_strength(strength: float, flag: str = "") -> float:
  """``strength`` as a float in [0, 1] (ValueError naming it otherwise)."""
  if not 0.0 <= float(strength) <= 1.0:
    raise ValueError(f"{flag}strength must be in [0, 1], got {strength}")
  return float(strength)


@dataclasses.dataclass
class EditPlan:
  """What a ``Cascade.sample`` call was asked to edit: where to start, from what."""

  start: int  # index of the first stage to run
  image: Optional[jax.Array]  # init image [H, W, 3] in [-1, 1]
  strength: float
  keep: Optional[jax.Array]  # mask [H, W, 1], 1 = regenerate (None: whole image)
  lowres: Optional[jax.Array]  # low-res input of an SR start stage [h, w, 3]

  def stage_edit(self, stage: Stage, batch: int, first: bool) -> Optional[dict]:
    """The sampler's edit inputs for one stage at batch size ``batch``.

    Inpainting acts at every stage; image-to-image (``x_init``) at the first
    stage run only: later stages refine what it made.
    """
    if self.image is None or (self.keep is None and not first):
      return None
    r = stage.resolution
    image = resize(self.image[None], r)[0] if self.image.shape[0] != r else self.image
    edit = {}
    if self.keep is not None:
      idx = jnp.arange(r) * self.keep.shape[0] // r
      mask = self.keep[idx][:, idx]
      edit.update(
        known=jnp.broadcast_to(image, (batch, r, r, 3)),
        mask=jnp.broadcast_to(mask, (batch, r, r, 1)),
      )
    if first and (self.keep is None or self.strength < 1.0):
      edit.update(x_init=jnp.broadcast_to(image, (batch, r, r, 3)), strength=self.strength)
    return edit or None


def make_plan(
  stages: Sequence[Stage],
  start_stage: Optional[str] = None,
  init_image: Any = None,
  strength: float = 1.0,
  mask: Any = None,
  lowres_image: Any = None,
) -> EditPlan:
  """Validates a call's editing inputs (ValueError naming the problem).

  Args:
    stages: the cascade's stages, in order.
    start_stage: the first stage to run (default: the first).
    init_image: uint8 [H, W, 3] (square): image-to-image from it.
    strength: in [0, 1], how much of the start stage's schedule runs.
    mask: with init_image, [H', W'] (square), 1 or > 127 = regenerate.
    lowres_image: uint8 [h, w, 3], the input of a super-resolution start stage
      (default there: the init image).
  """
  strength = check_strength(strength)
  image = None if init_image is None else _image_float(init_image, "init image")
  keep = None
  if mask is not None:
    if image is None:
      raise ValueError("a mask needs an init image (inpainting)")
    keep = _mask_keep(mask)
  lowres = None if lowres_image is None else _image_float(lowres_image, "low-res image")
  start = check_start(
    [s.name for s in stages],
    [s.is_sr for s in stages],
    start_stage,
    lowres is not None,
    image is not None,
  )
  if stages[start].is_sr and lowres is None:
    lowres = image
  return EditPlan(start=start, image=image, strength=strength, keep=keep, lowres=lowres)


def _image_float(image: Any, what: str) -> jax.Array:
  """uint8 [H, W, 3] (square) → float32 [H, W, 3] in [-1, 1]."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"the {what} must be an RGB image [H, W, 3], got shape {image.shape}")
  if image.shape[0] != image.shape[1]:
    raise ValueError(
      f"the {what} is {image.shape[1]}x{image.shape[0]}: stages are square, give a square image"
    )
  if image.dtype != np.uint8:
    raise ValueError(f"the {what} must be uint8, got {image.dtype}")
  return jnp.asarray(image, jnp.float32) / 127.5 - 1.0


def _mask_keep(mask: Any) -> Optional[jax.Array]:
  """[H, W] (or [H, W, 1]) mask, white = regenerate → float [H, W, 1] of 1 = regenerate.

  None for an all-white mask (image-to-image); an all-zero mask stays (nothing to do).
  """
  mask = np.asarray(mask)
  if mask.ndim == 3 and mask.shape[-1] in (1, 3):
    mask = mask.max(axis=-1)
  if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
    raise ValueError(f"the mask must be a square [H, W] image, got shape {mask.shape}")
  regen = (mask > 127) if mask.dtype == np.uint8 else (mask > 0.5)
  if regen.all():
    return None
  return jnp.asarray(regen, jnp.float32)[..., None]
