"""SIGTERM and Ctrl-C (SIGINT): stop cleanly at any moment, saving when there is work.

``StopSignals`` installs one handler for both signals; what a signal does
depends on the phase the trainer is in:

* ``setup`` (checks, data preparation, T5, restoring): nothing new to save, so
  the handler raises ``Stopped`` and the caller exits without a traceback;
* ``loop`` (training, compiling the step, sampling grids, saving): the first
  signal sets ``requested``; the loop saves a checkpoint after the current step
  and stops. Later signals only print that the stop is under way, so a save is
  never interrupted;
* ``done``: ignored (the process is about to exit).

Exit codes (``exit_code``): 0 after SIGTERM (preemption is not a failure),
130 after Ctrl-C (the shell convention, 128 + 2).
"""

import contextlib
import logging
import signal
import threading
from typing import Optional

_log = logging.getLogger(__name__)
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: Optional[int]) -> int:
  """0 for SIGTERM (and no signal), 130 for SIGINT."""
  return 130 if signum == signal.SIGINT else 0


class Stopped(BaseException):
  """A signal arrived before training started; nothing needed saving.

  A BaseException (like KeyboardInterrupt) so that no ``except Exception``
  on the way (a checkpoint fallback, a retry) swallows it.
  """

  def __init__(self, signum: int):
    super().__init__(
      f"stopped by {signal.Signals(signum).name} before training started; nothing to save"
    )
    self.signum = signum
    self.exit_code = exit_code(signum)


class StopSignals:
  """The SIGTERM/SIGINT handler of a training run (a context manager)."""

  def __init__(self):
    self.phase = "setup"  # 'setup' | 'loop' | 'done'
    self.requested = False  # a stop was asked during the loop
    self.signum = None  # the first signal received
    self._previous = {}

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else ""

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.phase == "done":
      return
    if self.signum is None:
      self.signum = signum
    if self.phase == "setup":
      raise Stopped(signum)
    if self.requested:
      print(f"{name}: already stopping; the checkpoint is being saved, please wait", flush=True)
      return
    self.requested = True
    _log.warning("%s: saving a checkpoint after this step and stopping", name)

  @contextlib.contextmanager
  def loop(self):
    """The training loop's phase; it lasts until the final save has finished."""
    self.phase = "loop"
    yield self

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for s in _SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}
