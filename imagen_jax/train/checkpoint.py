"""Saving and restoring a stage's training checkpoints (orbax).

Reading a run for sampling (config.json, EMA params) is ``imagen_jax.run``.

Layout of a workdir::

  WORKDIR/config.json                    the cascade config of the run
  WORKDIR/STAGE/checkpoints/STEP/        orbax items:
      train   {step, params, opt_state}  to resume training
      ema     EMA params                 what sampling restores (alone)
      data    the input iterator state   (JSON) so resuming sees the same data
      meta    {stage, step, config_fingerprint} (JSON)
  WORKDIR/STAGE/metrics.jsonl, events.*  training metrics
  WORKDIR/STAGE/samples/step_N.png       sample grids

Saving is asynchronous; ``close()`` waits for the last save.
"""

from typing import Any, Optional

import orbax.checkpoint as ocp

from imagen_jax import run as run_lib


class StageCheckpointer:
  """Saves and restores one stage's checkpoints (orbax CheckpointManager)."""

  def __init__(self, workdir: str, stage_name: str, keep: int = 2,
               async_save: bool = True, read_only: bool = False):
    self.directory = run_lib.checkpoint_dir(workdir, stage_name)
    self.manager = run_lib.checkpoint_manager(workdir, stage_name, keep=keep,
                                              async_save=async_save, read_only=read_only)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict,
           force: bool = False) -> bool:
    """Starts saving ``state`` (a TrainState) at ``step``; returns whether it saves."""
    train = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    args = ocp.args.Composite(train=ocp.args.StandardSave(train),
                              ema=ocp.args.StandardSave(state.ema_params),
                              data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores (state, data_state, meta); ``abstract_state`` carries the shardings."""
    train = {"step": abstract_state.step, "params": abstract_state.params,
             "opt_state": abstract_state.opt_state}
    out = self.manager.restore(step, args=ocp.args.Composite(
        train=ocp.args.StandardRestore(train),
        ema=ocp.args.StandardRestore(abstract_state.ema_params),
        data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    state = abstract_state.replace(step=out.train["step"], params=out.train["params"],
                                   opt_state=out.train["opt_state"], ema_params=out.ema)
    return state, out.data, out.meta

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
