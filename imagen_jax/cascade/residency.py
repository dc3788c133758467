"""Which of a cascade's params sit in accelerator memory, and when.

Three modes, the answers of ``benchmarks.sampling``'s one-chip line:

- ``none``: every text encoder and every stage resident, always (the default: no
  transfers).
- ``text``: the text encoders live in host memory and come onto the devices only to
  encode a call's prompts (the stages wait in host memory meanwhile); the stages are
  then resident for the call. Peak: the larger of the encoders alone and the stages
  together.
- ``stages``: as ``text``, and each stage's params come onto the devices only for its
  own turn. Peak: the largest single encoder or stage.

Moves keep every array's sharding (``parallel.offload``); each costs one host↔device
copy of the params moved, paid per ``Cascade.sample`` call.
"""

import contextlib
from typing import Any, Iterator, Mapping, MutableMapping

from imagen_jax.parallel import offload

MODES = ("none", "text", "stages")


def check_mode(mode: str) -> str:
  """The mode, or ValueError naming the choices."""
  if mode not in MODES:
    raise ValueError(f"offload must be one of {', '.join(MODES)}, got {mode!r}")
  return mode


class Residency:
  """Moves a cascade's stage params and text-encoder params between host and devices.

  Attributes:
    mode: one of ``MODES``.
  """

  def __init__(
    self, mode: str, params: MutableMapping[str, Any], encoders: Mapping[str, Any]
  ) -> None:
    """Puts the offloaded params in host memory now.

    Args:
      mode: one of ``MODES``.
      params: stage name → params; the cascade's own dict, updated in place.
      encoders: stage name → text encoder (objects with a ``params`` attribute; one
        move per distinct object).
    """
    self.mode = check_mode(mode)
    self._params = params
    self._encoders = list({id(e): e for e in encoders.values()}.values())
    if self.offloads:
      self._move_encoders(offload.to_host)
      self._move_stages(offload.to_host)

  @property
  def offloads(self) -> bool:
    """Whether anything lives in host memory between uses."""
    return self.mode != "none"

  def place(self, params: Any) -> Any:
    """A stage's new params where the mode keeps them between uses."""
    return offload.to_host(params) if self.offloads else params

  def _move_encoders(self, move) -> None:
    for encoder in self._encoders:
      encoder.params = move(encoder.params)

  def _move_stages(self, move) -> None:
    for name in list(self._params):
      self._params[name] = move(self._params[name])

  @contextlib.contextmanager
  def encoding(self) -> Iterator[None]:
    """While the text encoders run: they are on the devices, the stages in host memory;
    after it, the encoders back in host memory (and, mode ``text``, the stages on the
    devices)."""
    if not self.offloads:
      yield
      return
    self._move_stages(offload.to_host)
    self._move_encoders(offload.to_device)
    try:
      yield
    finally:
      self._move_encoders(offload.to_host)
      if self.mode == "text":
        self._move_stages(offload.to_device)

  @contextlib.contextmanager
  def running(self, name: str) -> Iterator[None]:
    """While stage ``name`` samples: its params on the devices (mode ``stages``: only for
    this turn)."""
    if self.mode != "stages":
      yield
      return
    self._params[name] = offload.to_device(self._params[name])
    try:
      yield
    finally:
      self._params[name] = offload.to_host(self._params[name])
