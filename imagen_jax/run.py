"""Reading a run: its config, its stages' EMA parameters and checkpoint steps.

Below both the trainer (which writes runs) and the cascade (which samples
them). A "run" is either

* a training workdir::

    WORKDIR/config.json                 the cascade config of the run
    WORKDIR/STAGE/checkpoints/STEP/     orbax items: train, ema, data, meta

* a converted DeepFloyd IF stage (``python -m imagen_jax.convert``):
  ``DIR/config.json`` ({format, stage, ...}) + ``DIR/params/`` (orbax), or a
  comma-separated list of such folders, stage I first, or a folder holding
  them as sub-folders. Its stages use the same stage-config schema as a
  trained run (``diffusion.kind = 'discrete'``), and the cascade config gets
  the T5 recorded at conversion.
"""

import hashlib
import json
import logging
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from imagen_jax import config as config_lib
from imagen_jax import parallel

_log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
CONVERTED_FORMAT = "imagen_jax/deepfloyd_if"
CONVERTED_PARAMS = "params"


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


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e})") from None


def stage_dir(workdir: str, stage_name: str) -> str:
  return os.path.join(os.path.abspath(workdir), stage_name)


def checkpoint_dir(workdir: str, stage_name: str) -> str:
  return os.path.join(stage_dir(workdir, stage_name), CHECKPOINTS)


def is_converted(path: str) -> bool:
  """Whether ``path`` is one converted DeepFloyd IF stage folder."""
  f = os.path.join(path, CONFIG_FILE)
  return os.path.isfile(f) and _read_json(f).get("format") == CONVERTED_FORMAT


def converted_stage_dirs(path: str) -> Optional[list]:
  """The converted stage folders that ``path`` names, cascade order; None if none.

  ``path``: one converted folder, 'A,B' (stage I first), or a folder whose
  sub-folders are converted stages (base stage first, then by resolution).
  """
  if "," in path:
    return [p for p in path.split(",") if p]
  if is_converted(path):
    return [path]
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, CONFIG_FILE)):
    subs = [os.path.join(path, d) for d in sorted(os.listdir(path))]
    subs = [d for d in subs if os.path.isdir(d) and is_converted(d)]
    if subs:
      def order(d):  # stage I (no low-res input) first, then by resolution
        stage = _read_json(os.path.join(d, CONFIG_FILE))["stage"]
        return bool(stage.get("lowres_resolution")), stage["resolution"]
      return sorted(subs, key=order)
  return None


def normalize_converted_stage(stage: dict) -> dict:
  """A converted stage's config in the common stage schema (old folders too)."""
  stage = json.loads(json.dumps(stage))
  diffusion = stage.setdefault("diffusion", {})
  if diffusion.get("kind") in (None, "if_ddpm"):
    diffusion["kind"] = "discrete"
  sample = stage.setdefault("sample", {})
  diffusion.setdefault("variance", sample.pop("variance", "learned_range"))
  if sample.get("sampler") == "if_ddpm":
    sample["sampler"] = "ddpm"
  diffusion.setdefault("cond_drop", 0.1)
  stage["use_text_mask"] = False
  stage.pop("text", None)
  return stage


def _converted_config(dirs: Sequence[str]) -> ml_collections.ConfigDict:
  """A cascade config for converted stage folders (T5 from the first one)."""
  config = config_lib.base_config()
  config.mesh.shape = {"data": -1}
  config.mesh.strategy = "dp"
  text = None
  for d in dirs:
    meta_file = os.path.join(d, CONFIG_FILE)
    if not os.path.isfile(meta_file):
      raise FileNotFoundError(f"{meta_file} not found: {d!r} is not a converted IF stage "
                              "(python -m imagen_jax.convert deepfloyd-if --src ... --out ...)")
    meta = _read_json(meta_file)
    if meta.get("format") != CONVERTED_FORMAT:
      raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected "
                       f"{CONVERTED_FORMAT!r}")
    text = text or meta["stage"].get("text") or meta.get("text") or {}
    stage = ml_collections.ConfigDict(normalize_converted_stage(meta["stage"]))
    stage.source = os.path.abspath(d)     # where its params are read from
    if stage.name in config.stages:
      raise ValueError(f"two converted folders hold stage {stage.name!r}: {list(dirs)}")
    config_lib.add_stage(config, stage)
  config.text.update(dict(path=text.get("encoder", ""), tokenizer=text.get("tokenizer", ""),
                          max_length=int(text.get("max_length", 77)),
                          dim=int(text.get("dim", 4096)), dtype="float32"))
  return config


def read_config(path: str) -> ml_collections.ConfigDict:
  """The cascade config of a run: a training workdir or converted IF stage folders.

  Raises:
    FileNotFoundError: nothing readable at ``path`` (the message says how to
      make a run).
    ValueError: a config.json that is not valid.
  """
  dirs = converted_stage_dirs(path)
  if dirs is not None:
    return _converted_config(dirs)
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file} does not exist: {path!r} holds no trained run "
                            f"(train one with: python train.py --config configs/demo.py "
                            f"--workdir {path})")
  return ml_collections.ConfigDict(_read_json(file))


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings (for sharded restore)."""
  if shardings is None:
    return abstract
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def abstract_params(stage: Any, mesh=None, rules=None) -> Any:
  """The unboxed abstract params of a stage, with their shardings under a mesh."""
  boxed = stage.abstract_params()
  shardings = parallel.logical_shardings(boxed, mesh, rules) if mesh is not None else None
  return abstract_with_shardings(nn.unbox(boxed), shardings)


def checkpoint_manager(workdir: str, stage_name: str, *, keep: int = 2,
                       async_save: bool = True, read_only: bool = False
                       ) -> ocp.CheckpointManager:
  """The orbax manager of one stage's checkpoints (read-only for sampling)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         enable_async_checkpointing=async_save,
                                         read_only=read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir, stage_name), options=options)


def load_ema_params(workdir: str, stage: Any, mesh=None, rules=None,
                    step: Optional[int] = None) -> tuple[Any, int]:
  """The sampling parameters of one stage: a run's EMA params, or converted params.

  Args:
    workdir: the run (see the module docstring); for converted stages the
      stage config's ``source`` folder is read.
    stage: an ``imagen_jax.stages.Stage``.
    mesh, rules: place the params sharded (None: default device).
    step: a checkpoint step (default: the newest readable one, with a warning
      naming each newer unreadable step).

  Returns:
    (params, step); step is 0 for converted stages.
  """
  target = abstract_params(stage, mesh, rules)
  source = stage.config.get("source")
  if source:
    params = ocp.StandardCheckpointer().restore(
        os.path.abspath(os.path.join(source, CONVERTED_PARAMS)), target)
    return (jax.tree.map(jnp.asarray, params) if mesh is None else params), 0
  ckpt_dir = checkpoint_dir(workdir, stage.name)
  manager = latest = None
  if os.path.isdir(ckpt_dir):
    manager = checkpoint_manager(workdir, stage.name, read_only=True, async_save=False)
    latest = manager.latest_step()
  if latest is None:
    raise FileNotFoundError(
        f"stage {stage.name!r} has no checkpoint under {ckpt_dir}; train it with: "
        f"python train.py --config <config> --workdir {workdir} --stage {stage.name}")
  restore = lambda s: manager.restore(s, args=ocp.args.Composite(
      ema=ocp.args.StandardRestore(target))).ema
  if step is not None:
    return restore(step), step
  # The newest step first; a damaged one (a file truncated by a lost host or
  # a full disk) is skipped with a warning, never deleted.
  failures = []
  for candidate in sorted(manager.all_steps(), reverse=True):
    try:
      params = restore(candidate)
    except Exception as e:  # pylint: disable=broad-except
      failures.append(f"step {candidate}: {type(e).__name__}: "
                      f"{(str(e).strip().splitlines() or [''])[0][:200]}")
      _log.warning("stage %s: checkpoint step %d under %s is unreadable (%s); trying the "
                   "previous one", stage.name, candidate, ckpt_dir, failures[-1])
      continue
    return params, candidate
  raise ValueError(f"stage {stage.name!r}: no checkpoint under {ckpt_dir} is readable ("
                   + "; ".join(failures) + ")")
