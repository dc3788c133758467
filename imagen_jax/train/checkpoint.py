"""Saving and restoring a stage's training checkpoints (orbax), and their failures.

Reading a run for sampling (config.json, EMA params) is ``imagen_jax.run``.

Layout of a workdir::

  WORKDIR/config.json                    the cascade config of the run
  WORKDIR/STAGE/checkpoints/STEP/        orbax items:
      train   {step, params, opt_state}  to resume training
      ema     EMA params                 what sampling restores (alone)
      data    the input iterator state   (JSON) so resuming sees the same data
      meta    {stage, step, config_fingerprint, fingerprint} (JSON)
  WORKDIR/STAGE/damaged_checkpoints/STEP unreadable steps moved aside on resume
  WORKDIR/STAGE/metrics.jsonl, events.*  training metrics
  WORKDIR/STAGE/samples/step_N.png       sample grids

Saving is asynchronous; ``close()`` waits for the last save. Failures:

* resuming tries the latest step, then each earlier one; an unreadable step
  is moved to ``damaged_checkpoints/`` (kept, never deleted: a later save of
  the same step number would otherwise collide with it) with a warning;
* ``clean_tmp()`` removes the unfinished ``STEP.orbax-checkpoint-tmp-*``
  folders of a crashed save (call it while holding the workdir lock);
* a save that fails (disk full, quota, file-size limit) raises ``SaveError``
  in one line (path, bytes needed, bytes free) after removing its temp
  folder; the earlier checkpoints are untouched.
"""

import functools
import glob
import logging
import os
import re
import shutil
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from imagen_jax import run as run_lib

_log = logging.getLogger(__name__)
DAMAGED = "damaged_checkpoints"
_TMP_GLOB = "*.orbax-checkpoint-tmp*"


class SaveError(RuntimeError):
  """A checkpoint could not be written; the message names the path and the cause."""


def _reason(e: BaseException) -> str:
  """One line for an exception: the OS error inside it when there is one."""
  seen = e
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno:
      return f"[Errno {seen.errno}] {os.strerror(seen.errno)}"
    # TensorStore (orbax's writer) reports OS errors inside a ValueError's text.
    code = re.search(r"os_error_code='?(\d+)", str(seen))
    if code:
      return f"[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}"
    seen = seen.__cause__ or seen.__context__
  first = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {first[:300]}"


def _megabytes(n: float) -> str:
  return f"{n / 2**20:.1f} MB"


def read_latest_meta(workdir: str, stage_name: str) -> Optional[tuple[int, dict]]:
  """(step, meta) of the newest checkpoint whose meta reads; None if there is none."""
  directory = run_lib.checkpoint_dir(workdir, stage_name)
  if not os.path.isdir(directory):
    return None
  manager = run_lib.checkpoint_manager(workdir, stage_name, read_only=True, async_save=False)
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        return step, manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta
      except Exception as e:  # pylint: disable=broad-except
        _log.warning(
          "stage %s: the meta of checkpoint step %d is unreadable (%s)",
          stage_name,
          step,
          _reason(e),
        )
  finally:
    manager.close()
  return None


# orbax's replica-parallel save splits a replicated array among its replicas, one slice
# (a dispatched op) per replica; for small arrays the ops cost more than the split
# saves. Only slices of at least this many bytes are split: the big replicated weights
# of a pod still are, the biases and norms of every model are not.
MIN_REPLICA_SLICE_BYTES = 2**20


@functools.cache
def _register_array_handler() -> None:
  """Every jax.Array is saved through an ArrayHandler with the floor above (once)."""
  handler = ocp.type_handlers.ArrayHandler(
    min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES
  )
  ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class StageCheckpointer:
  """Saves and restores one stage's checkpoints (orbax CheckpointManager)."""

  def __init__(
    self,
    workdir: str,
    stage_name: str,
    keep: int = 2,
    async_save: bool = True,
    read_only: bool = False,
  ):
    self.stage_name = stage_name
    self.directory = run_lib.checkpoint_dir(workdir, stage_name)
    if not read_only:
      _register_array_handler()
    self.manager = run_lib.checkpoint_manager(
      workdir, stage_name, keep=keep, async_save=async_save, read_only=read_only
    )
    self._pending = None  # (step, bytes) of a save not known to have finished
    self._failed_step = None

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def clean_tmp(self) -> list:
    """Removes the temp folders of unfinished saves (a crash); returns their names."""
    removed = []
    for path in sorted(glob.glob(os.path.join(self.directory, _TMP_GLOB))):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(os.path.basename(path))
      _log.warning(
        "stage %s: removed %s, an unfinished checkpoint of an earlier run", self.stage_name, path
      )
    return removed

  def save(self, step: int, state: Any, data_state: dict, meta: dict, force: bool = False) -> bool:
    """Starts saving ``state`` (a TrainState) at ``step``; returns whether it saves.

    Raises:
      SaveError: this save, or the previous asynchronous one, failed.
    """
    train = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    args = ocp.args.Composite(
      train=ocp.args.StandardSave(train),
      ema=ocp.args.StandardSave(state.ema_params),
      data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta),
    )
    nbytes = sum(x.nbytes for x in jax.tree.leaves((train, state.ema_params)))
    self._guard(self.manager.wait_until_finished)  # a failed earlier save shows here
    self._pending = (step, nbytes)
    return self._guard(lambda: self.manager.save(step, args=args, force=force))

  def _guard(self, fn):
    """Runs ``fn``; a failure of the pending save becomes a one-line SaveError."""
    try:
      out = fn()
    except Exception as e:  # pylint: disable=broad-except
      if self._pending is None:
        raise
      raise self._failed(e) from e
    return out

  def _failed(self, e: BaseException) -> SaveError:
    """Removes the failed save's temp folder; the SaveError that reports it."""
    step, nbytes = self._pending
    self._pending = None
    self._failed_step = step
    self._remove_tmp(step)
    try:
      free = _megabytes(shutil.disk_usage(self.directory).free)
    except OSError:
      free = "unknown"
    kept = sorted(
      s for s in self.manager.all_steps() if s != step and os.path.isdir(self.step_dir(s))
    )
    return SaveError(
      f"could not save the stage {self.stage_name!r} checkpoint of step {step} to "
      f"{self.step_dir(step)}: {_reason(e)} (it needs about {_megabytes(nbytes)}; "
      f"{free} free there); temp folder removed, earlier checkpoints intact: "
      f"{kept or 'none'}"
    )

  def _remove_tmp(self, step: int, settle: float = 0.0) -> None:
    """Removes the temp folders of ``step``; with ``settle`` > 0, again until none
    has reappeared for that long (writer threads of a failed save may still land)."""
    quiet_since = time.monotonic()
    deadline = quiet_since + 10 * settle
    while True:
      paths = glob.glob(os.path.join(self.directory, f"{step}{_TMP_GLOB[1:]}"))
      for path in paths:
        shutil.rmtree(path, ignore_errors=True)
      now = time.monotonic()
      if paths:
        quiet_since = now
      if now - quiet_since >= settle or now > deadline:
        return
      time.sleep(0.05)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores (state, data_state, meta); ``abstract_state`` carries the shardings."""
    train = {
      "step": abstract_state.step,
      "params": abstract_state.params,
      "opt_state": abstract_state.opt_state,
    }
    out = self.manager.restore(
      step,
      args=ocp.args.Composite(
        train=ocp.args.StandardRestore(train),
        ema=ocp.args.StandardRestore(abstract_state.ema_params),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
      ),
    )
    state = abstract_state.replace(
      step=out.train["step"],
      params=out.train["params"],
      opt_state=out.train["opt_state"],
      ema_params=out.ema,
    )
    return state, out.data, out.meta

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict, dict]]:
    """The newest readable checkpoint as (step, state, data_state, meta), or None.

    Unreadable newer steps are moved to ``damaged_checkpoints/`` (with a
    warning naming them) once an older step has restored.

    Raises:
      ValueError: checkpoints exist but none of them restores.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        state, data_state, meta = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        failures.append((step, _reason(e)))
        _log.warning(
          "stage %s: checkpoint step %d (%s) is unreadable: %s; trying the previous one",
          self.stage_name,
          step,
          self.step_dir(step),
          failures[-1][1],
        )
        continue
      for bad, _ in failures:
        self._move_aside(bad)
      return step, state, data_state, meta
    if failures:
      raise ValueError(
        f"stage {self.stage_name!r}: no checkpoint under {self.directory} "
        f"restores (" + "; ".join(f"step {s}: {r}" for s, r in failures) + "); nothing was changed"
      )
    return None

  def _move_aside(self, step: int) -> None:
    """Moves an unreadable step out of the manager's folder (never deletes it)."""
    target = os.path.join(os.path.dirname(self.directory), DAMAGED, str(step))
    if os.path.exists(target):
      target += time.strftime("_%Y%m%d_%H%M%S")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.rename(self.step_dir(step), target)
      print(
        f"stage {self.stage_name}: damaged checkpoint step {step} moved to {target} "
        f"(kept for inspection)",
        flush=True,
      )
    self.manager.reload()

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def wait(self) -> None:
    self._guard(self.manager.wait_until_finished)
    self._pending = None

  def close(self) -> None:
    """Waits for the last save and closes the manager.

    Raises:
      SaveError: the last save failed.
    """
    error = None
    try:
      self.wait()
    except SaveError as e:
      error = e
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-except
      if error is None:  # else: the same failure again; report it once
        raise
    if self._failed_step is not None:
      self._remove_tmp(self._failed_step, settle=0.5)
    if error is not None:
      raise error
