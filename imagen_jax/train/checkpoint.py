"""Checkpoints of a cascade run (orbax) and loading them back for sampling.

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

import hashlib
import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp

from imagen_jax import parallel

CONFIG_FILE = "config.json"


def config_fingerprint(stage_config: Any) -> str:
  """A short hash of what makes checkpoints of a stage incompatible (its model)."""
  blob = json.dumps(json.loads(stage_config.model.to_json()), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes ``config.json`` (atomically) so sampling can rebuild the cascade."""
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
  with open(tmp, "w") as f:
    f.write(config.to_json(indent=2))
  os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (``config.json`` in its workdir)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: {workdir!r} holds no trained run "
                            f"(train one with: python train.py --config configs/demo.py "
                            f"--workdir {workdir})")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def stage_dir(workdir: str, stage_name: str) -> str:
  return os.path.join(os.path.abspath(workdir), stage_name)


class StageCheckpointer:
  """Saves and restores one stage's checkpoints (orbax CheckpointManager)."""

  def __init__(self, workdir: str, stage_name: str, keep: int = 2,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.join(stage_dir(workdir, stage_name), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           enable_async_checkpointing=async_save,
                                           read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

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

  def restore_ema(self, step: int, abstract_params: Any) -> Any:
    """Restores only the EMA params (what sampling needs)."""
    return self.manager.restore(step, args=ocp.args.Composite(
        ema=ocp.args.StandardRestore(abstract_params))).ema

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings (for sharded restore)."""
  if shardings is None:
    return abstract
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def load_ema_params(workdir: str, stage: Any, mesh=None, rules=None,
                    step: Optional[int] = None) -> tuple[Any, int]:
  """The EMA params of a trained stage, for sampling.

  Args:
    workdir: the run's workdir.
    stage: an ``imagen_jax.stages.Stage``.
    mesh, rules: place the params sharded (None: default device).
    step: a checkpoint step (default: the latest).

  Returns:
    (params, step).
  """
  ckpt_dir = os.path.join(stage_dir(workdir, stage.name), "checkpoints")
  latest = None
  if os.path.isdir(ckpt_dir):
    ckpt = StageCheckpointer(workdir, stage.name, read_only=True, async_save=False)
    latest = ckpt.latest_step()
  if latest is None:
    raise FileNotFoundError(
        f"stage {stage.name!r} has no checkpoint under {ckpt_dir}; train it with: "
        f"python train.py --config <config> --workdir {workdir} --stage {stage.name}")
  boxed = jax.eval_shape(stage.init, jax.random.PRNGKey(0))
  shardings = parallel.logical_shardings(boxed, mesh, rules) if mesh is not None else None
  abstract = abstract_with_shardings(nn.unbox(boxed), shardings)
  step = latest if step is None else step
  return ckpt.restore_ema(step, abstract), step
