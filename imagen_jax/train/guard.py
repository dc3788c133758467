"""The non-finite guard: count skipped steps, stop a diverged run, never save NaNs.

The train step itself skips a non-finite update on the device (``step.py``:
the old params, optimizer state and EMA are kept, its ``finite`` metric is 0).
The host reads those flags only where it syncs anyway, at log steps and before
each checkpoint: a skipped step changes no weights, so learning about it a few
steps late loses nothing, and the step pipeline never waits for the host.

``train.max_nonfinite_steps`` (N) consecutive skipped steps are tolerated
(a rare overflow); the next one stops the stage with ``NonFiniteError``, one
line naming the steps and the last good checkpoint, and nothing is saved.
Before every save ``all_finite`` checks the params and EMA once more.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite steps; the message names them."""


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def all_finite(tree: Any) -> bool:
  """Whether every floating-point leaf of ``tree`` is finite (one device reduction)."""
  return bool(_all_finite(tree))


class NonFiniteGuard:
  """Collects the steps' ``finite`` flags and stops after too many in a row."""

  def __init__(self, stage_name: str, limit: int):
    """
    Args:
      stage_name: for messages.
      limit: consecutive non-finite steps tolerated (0: stop at the first).
    """
    self.stage_name = stage_name
    self.limit = int(limit)
    self._pending = []  # (step, finite flag on the device), not read yet
    self.streak = 0  # consecutive non-finite steps up to the last read
    self._streak_start = None
    self.total = 0

  def record(self, step: int, finite: jax.Array) -> None:
    """Keeps the device flag of ``step`` (1-based count after the update); no sync."""
    self._pending.append((step, finite))

  def check(self, last_good: Optional[str]) -> int:
    """Reads the pending flags; returns how many of them were skipped steps.

    Args:
      last_good: the last good checkpoint's path, for the error message.

    Raises:
      NonFiniteError: more than ``limit`` consecutive non-finite steps.
    """
    if not self._pending:
      return 0
    flags = jax.device_get([f for _, f in self._pending])
    steps = [s for s, _ in self._pending]
    self._pending = []
    skipped = 0
    for step, ok in zip(steps, flags):
      if bool(np.asarray(ok) > 0):
        self.streak, self._streak_start = 0, None
        continue
      skipped += 1
      self.total += 1
      self.streak += 1
      self._streak_start = self._streak_start or step
      if self.streak > self.limit:
        raise NonFiniteError(
          f"stage {self.stage_name}: {self.streak} consecutive non-finite steps "
          f"({self._streak_start}-{step}: loss, gradient norm or update norm is NaN "
          f"or Inf; updates skipped, train.max_nonfinite_steps={self.limit}); stopped "
          f"at step {step} without saving; last good checkpoint: {last_good or 'none'}"
        )
    return skipped
