"""Prefetch to device: the next batches are read, tokenized and placed on the
devices by a background thread while the current train step runs.

    with DevicePrefetcher(iter(dataset), make_batch, size=2) as batches:
      for batch in batches:      # already device-resident global arrays
        state, metrics = step_fn(state, batch, ...)

``make_batch`` turns one host batch (numpy) into device arrays (tokenize,
``jax.make_array_from_process_local_data``); it involves no collective, so it
may run on its own thread in every process. An exception in the thread is
raised by the ``next()`` that would have returned that batch.
"""

import queue
import threading
from typing import Any, Callable, Iterator

_DONE = object()


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


class DevicePrefetcher:
  """An iterator of ``make_batch(next(iterator))`` computed ``size`` batches ahead.

  Attributes:
    consumed: batches handed out so far (the data position is counted by the
      consumer, never from how far the thread has read ahead).
  """

  def __init__(self, iterator: Iterator[Any], make_batch: Callable[[Any], Any], size: int = 2):
    if size < 1:
      raise ValueError(f"prefetch size must be >= 1, got {size}")
    self._iterator, self._make_batch = iterator, make_batch
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self.consumed = 0
    self._thread = threading.Thread(target=self._fill, name="device-prefetch", daemon=True)
    self._thread.start()

  def _put(self, item: Any) -> bool:
    """Blocks until there is room (or close() was called); False when closing."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self) -> None:
    try:
      for host_batch in self._iterator:
        if not self._put(self._make_batch(host_batch)):
          return
      self._put(_DONE)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in next())
      self._put(_Failure(e))

  def __iter__(self) -> "DevicePrefetcher":
    return self

  def __next__(self) -> Any:
    item = self._queue.get()
    if item is _DONE:
      self._queue.put(_DONE)
      raise StopIteration
    if isinstance(item, _Failure):
      raise item.error
    self.consumed += 1
    return item

  def close(self) -> None:
    """Stops the thread (it finishes the batch it is making, then exits)."""
    self._stop.set()
    self._thread.join(timeout=30)

  def __enter__(self) -> "DevicePrefetcher":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
