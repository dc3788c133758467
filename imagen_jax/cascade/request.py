"""One sampling call's request: what to make, per-stage overrides, how rows are batched.

``SampleRequest`` gathers the options of ``Cascade.sample`` besides the prompts
and the key; ``per_stage`` expands a per-stage override; ``Batches`` cuts the
N rows of a call into equal jitted calls (the last one padded).
"""

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from imagen_jax import parallel
from imagen_jax.parallel import distributed
from imagen_jax.stages import to_uint8


@dataclasses.dataclass(frozen=True)
class SampleRequest:
  """What one ``Cascade.sample`` call makes, besides its prompts and key.

  Attributes:
    num_per_prompt: images per prompt.
    batch_size: images per jitted call (default: all N at once); rounded up to
      a multiple of the data-parallel size. Every call of a stage has the same
      shape, so the stage compiles once.
    steps, guidance, sampler: per-stage overrides of the config's settings:
      None, one value for every stage, one per stage, or {stage name: value}.
    noise_level: the low-resolution input's noise level of the super-resolution
      stages (Imagen's ``aug_level`` t in [0, 1]; IF-II's and the x4 upscaler's
      integer level): one value for every super-resolution stage, one per stage
      (None for the others) or {stage name: value}.
    negative_prompt: one string for every prompt, or P strings: replaces the
      empty prompt as the unconditional branch of guidance.
    init_image: uint8 [H, W, 3] (square, any size): image-to-image. The start
      stage begins from it (resized to its resolution) noised to ``strength``:
      0 returns it unchanged, 1 is text-to-image.
    strength: in [0, 1], how much of the start stage's schedule runs.
    mask: with ``init_image``, inpainting: [H', W'] (square), 1 or > 127 =
      regenerate. Every stage keeps the image outside the mask (at its
      resolution, the mask resized by nearest neighbour) and repaints inside;
      an all-zero mask returns the image, an all-one mask is image-to-image.
    lowres_image: uint8 [h, w, 3]: the low-resolution input of a
      super-resolution ``start_stage`` (super-resolve a user's image).
    start_stage: the first stage to run (default: the cascade's first); a
      super-resolution stage needs ``lowres_image`` (or ``init_image``).
  """

  num_per_prompt: int = 1
  batch_size: Optional[int] = None
  steps: Any = None
  guidance: Any = None
  sampler: Any = None
  noise_level: Any = None
  negative_prompt: Any = None
  init_image: Optional[np.ndarray] = None
  strength: float = 1.0
  mask: Optional[np.ndarray] = None
  lowres_image: Optional[np.ndarray] = None
  start_stage: Optional[str] = None

  def check(self) -> None:
    """ValueError naming a bad count or batch size."""
    if self.num_per_prompt < 1:
      raise ValueError(f"num_per_prompt must be >= 1, got {self.num_per_prompt}")
    if self.batch_size is not None and self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def per_stage(value: Any, names: Sequence[str], what: str) -> list:
  """Expands a per-stage override to one entry per stage.

  Args:
    value: None (config values everywhere), a scalar (every stage), a sequence
      of len(names) entries, or a mapping {stage name: value} (others None).
    names: the stage names, cascade order.
    what: the option's name, for error messages.

  Returns:
    A list of len(names) entries (None = keep the config's value).

  Raises:
    ValueError: a sequence of the wrong length, or an unknown stage name.
  """
  if value is None or isinstance(value, (int, float, str)):
    return [value] * len(names)
  if isinstance(value, Mapping):
    unknown = sorted(set(value) - set(names))
    if unknown:
      raise ValueError(f"{what}: unknown stages {unknown}; the cascade has {list(names)}")
    return [value.get(n) for n in names]
  value = list(value)
  if len(value) != len(names):
    raise ValueError(
      f"{what} has {len(value)} value{'s' * (len(value) != 1)} but the "
      f"cascade has {len(names)} stages ({', '.join(names)}): give one "
      "value per stage"
    )
  return value


def noise_level_configs(
  sample_configs: Mapping[str, Any], is_sr: Mapping[str, bool], noise_level: Any
) -> dict:
  """Each stage's ``sample`` config with a ``noise_level`` override (see ``SampleRequest``).

  The level is written under both names the stages read (``aug_level``: Imagen's
  continuous stages, ``noise_level``: IF-II and the latent upscaler); the stage
  checks its range. A scalar goes to every super-resolution stage.

  Raises:
    ValueError: a level for a stage that takes no low-resolution input.
  """
  names = list(sample_configs)
  if noise_level is None:
    return dict(sample_configs)
  if isinstance(noise_level, (int, float)):
    noise_level = {n: noise_level for n in names if is_sr[n]}
  levels = per_stage(noise_level, names, "noise_level")
  out = {}
  for name, level in zip(names, levels):
    out[name] = sample_configs[name]
    if level is None:
      continue
    if not is_sr[name]:
      raise ValueError(
        f"noise_level: stage {name!r} takes no low-resolution input (give None for it)"
      )
    out[name] = {**dict(sample_configs[name]), "aug_level": level, "noise_level": level}
  return out


@dataclasses.dataclass(frozen=True)
class Batches:
  """N rows cut into calls of ``size`` rows (the last one padded), maybe shared among processes.

  Shared (``processes`` > 1), process ``process`` samples every processes-th
  batch from its own index, on its own devices; ``gather`` gives every process
  all of them, in order.
  """

  n: int
  size: int
  process: int = 0
  processes: int = 1

  @classmethod
  def of(cls, n: int, batch_size: Optional[int], multiple: int, shared: bool) -> "Batches":
    """Batches of ``batch_size`` rows (default all N) rounded up to ``multiple``;
    ``shared``: among every process of the run (``jax.process_count()``)."""
    size = min(batch_size or n, n)
    size = -(-size // multiple) * multiple
    if shared:
      return cls(n, size, jax.process_index(), jax.process_count())
    return cls(n, size)

  @property
  def count(self) -> int:
    return -(-self.n // self.size)

  def mine(self) -> list[int]:
    """The indices of the batches this process samples."""
    return list(range(self.process, self.count, self.processes))

  def rows(self, x: np.ndarray, c: int) -> np.ndarray:
    """Batch c of x [N, ...], padded to [size, ...]."""
    start = c * self.size
    return parallel.pad_rows(x[start : start + self.size], self.size)

  def gather(self, outs: Mapping[int, jax.Array], image_shape: Sequence[int]) -> np.ndarray:
    """This process's batches {c: x0 [size, R, R, C]} → every batch's uint8 [N, R, R, C].

    Alone, a concatenation; with several processes a collective (every
    process calls it at the same point, even one without batches).
    """
    local = {c: np.asarray(to_uint8(x)) for c, x in outs.items()}
    num = self.processes
    if num > 1:
      stack = np.zeros((-(-self.count // num), self.size, *image_shape), np.uint8)
      for j, c in enumerate(self.mine()):
        stack[j] = local[c]
      # The processes sampled apart: they meet at the coordinator first, since the
      # gather's collective gives up after 30 s (see parallel.distributed).
      distributed.barrier("sampled")
      every = multihost_utils.process_allgather(stack)  # [processes, per process, size, ...]
      local = {c: every[c % num, c // num] for c in range(self.count)}
    return np.concatenate(
      [local[c][: min(self.size, self.n - c * self.size)] for c in range(self.count)]
    )
