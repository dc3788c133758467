"""What a workdir's weights mean, and the refusal to resume them with other settings.

Two field sets, flattened to ``{"stages.base.diffusion.prediction": "v", ...}``:

* ``weights_fields``: what decides how a stage's weights are read — the stage
  config (model, diffusion, resolution, low-res resolution, ...; not its
  ``sample`` settings or ``steps_scale``) and the text encoder (all of
  ``config.text`` but ``dtype``). ``config.json`` must agree on these for
  every stage, since sampling rebuilds the cascade from it.
* ``resume_fields``: the weights fields plus what decides the data order and
  the optimizer state: ``data.name/src/split/builder_kwargs/seed``,
  ``train.batch_size``, ``train.optimizer``. Every checkpoint's meta carries
  them, and resuming compares them.

``check_workdir`` runs before anything is written: it names the first
differing field with both values. ``config.json`` is written once
(``write_config_once``, atomically, never replacing an existing one). A field
absent on one side (a field added to the code after the run started) is not
compared.
"""

import json
import logging
import os
from typing import Any, Optional, Sequence

import ml_collections

from imagen_jax import run as run_lib
from imagen_jax.train import checkpoint as ckpt_lib
from imagen_jax.train.validate import ConfigError

_log = logging.getLogger(__name__)

# Stage settings that do not change what the weights mean.
_STAGE_FREE = ("sample", "steps_scale", "name", "source")
_TEXT_FREE = ("dtype",)
_DATA_KEYS = ("name", "src", "split", "builder_kwargs", "seed")
_TRAIN_KEYS = ("batch_size", "optimizer")


class ConfigMismatch(ConfigError):
  """The workdir was trained with other settings; the message names the field."""


def _plain(tree: Any) -> Any:
  """ConfigDicts, tuples → JSON values (what config.json and the meta hold)."""
  if isinstance(tree, ml_collections.ConfigDict):
    tree = tree.to_dict()
  return json.loads(json.dumps(tree, default=list))


def _flatten(prefix: str, tree: Any, out: dict) -> dict:
  if isinstance(tree, dict):
    for key in sorted(tree):
      _flatten(f"{prefix}.{key}", tree[key], out)
  else:
    out[prefix] = tree
  return out


def weights_fields(config: Any, stage_name: str) -> dict:
  """The flattened stage and text-encoder settings that give the weights meaning."""
  stage = {k: v for k, v in _plain(config.stages[stage_name]).items() if k not in _STAGE_FREE}
  text = {k: v for k, v in _plain(config.text).items() if k not in _TEXT_FREE}
  out = _flatten(f"stages.{stage_name}", stage, {})
  return _flatten("text", text, out)


def resume_fields(config: Any, stage_name: str) -> dict:
  """``weights_fields`` plus the data-order and optimizer-structure settings."""
  out = weights_fields(config, stage_name)
  data = _plain(config.data)
  _flatten("data", {k: data.get(k) for k in _DATA_KEYS}, out)
  train = _plain(config.train)
  return _flatten("train", {k: train.get(k) for k in _TRAIN_KEYS}, out)


def first_difference(old: dict, new: dict) -> Optional[tuple[str, Any, Any]]:
  """(field, old value, new value) of the first field both have and differ on."""
  for key in sorted(old.keys() & new.keys()):
    if old[key] != new[key]:
      return key, old[key], new[key]
  return None


def _group(field: str) -> str:
  parts = field.split(".")
  if parts[0] == "stages":
    return {"model": "model", "diffusion": "diffusion setting"}.get(parts[2], "setting")
  return {
    "text": "text encoder",
    "data": "data source",
    "train": "batch size" if field == "train.batch_size" else "optimizer",
  }[parts[0]]


def _refuse(where: str, stage_name: str, diff: tuple) -> ConfigMismatch:
  field, old, new = diff
  return ConfigMismatch(
    f"{where} was trained with a different {_group(field)} for stage {stage_name!r}: "
    f"config.{field} is {old!r} there but {new!r} now; use another --workdir or the "
    f"same settings (nothing was written)"
  )


def check_meta(meta: dict, config: Any, name: str, where: str) -> bool:
  """Compares a checkpoint's meta with ``config``.

  Returns:
    True: a full fingerprint matched; False: only the old model hash
    (checkpoints from before full fingerprints) matched.

  Raises:
    ConfigMismatch: they differ (names the field and both values).
  """
  if "fingerprint" in meta:
    diff = first_difference(meta["fingerprint"], resume_fields(config, name))
    if diff:
      raise _refuse(where, name, diff)
    return True
  want = run_lib.config_fingerprint(config.stages[name])
  if meta.get("config_fingerprint") != want:
    raise ConfigMismatch(
      f"{where} was trained with a different model for stage {name!r} "
      f"(model fingerprint {meta.get('config_fingerprint')} vs {want}); "
      f"use another --workdir (nothing was written)"
    )
  return False


def _check_latest(workdir: str, config: Any, name: str) -> Optional[bool]:
  """``check_meta`` on a stage's newest readable checkpoint; None without one."""
  found = ckpt_lib.read_latest_meta(workdir, name)
  if found is None:
    return None
  step, meta = found
  return check_meta(
    meta, config, name, os.path.join(run_lib.checkpoint_dir(workdir, name), str(step))
  )


def check_workdir(workdir: str, config: Any, stage_names: Sequence[str]) -> None:
  """Refuses a workdir trained with other settings, before anything is written.

  Args:
    workdir: the run directory (may not exist yet).
    config: the cascade config about to be trained.
    stage_names: the stages about to be trained.

  Raises:
    ConfigMismatch: config.json or a checkpoint disagrees (names the first
      differing field and both values), or config.json is missing while
      checkpoints that cannot vouch for the config exist.
  """
  path = run_lib.as_path(workdir) / run_lib.CONFIG_FILE  # local or gs://
  have_config = path.is_file()
  if have_config:
    old = run_lib.read_config(workdir, as_written=True)
    for name in config.stage_order:
      if name in old.get("stages", {}):
        diff = first_difference(weights_fields(old, name), weights_fields(config, name))
        if diff:
          raise _refuse(path, name, diff)
  trained = {}
  for name in config.stage_order:
    if name in stage_names or not have_config:
      trained[name] = _check_latest(workdir, config, name)
  if not have_config and any(v is not None for v in trained.values()):
    legacy = [n for n, v in trained.items() if v is False]
    if legacy:
      raise ConfigMismatch(
        f"{path} is missing and the checkpoints of stage {legacy[0]!r} predate full "
        f"config fingerprints, so they cannot vouch for this config; restore config.json "
        f"or use another --workdir (nothing was written)"
      )
    _log.warning(
      "%s was missing; the checkpoints' fingerprints match this config, so it is written again",
      path,
    )


def write_config_once(workdir: str, config: Any) -> bool:
  """Writes ``config.json`` atomically unless it exists; returns whether it wrote.

  A link of a finished temp file: the file appears complete or not at all, and
  a config.json that appeared meanwhile (another stage's trainer) is kept and
  compared instead of replaced.
  """
  root = run_lib.as_path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  if (root / run_lib.CONFIG_FILE).exists():
    return False
  if "://" in os.fspath(root):  # object stores: a whole-object write is atomic
    (root / run_lib.CONFIG_FILE).write_text(config.to_json(indent=2))
    return True
  path = os.path.join(os.fspath(root), run_lib.CONFIG_FILE)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(config.to_json(indent=2))
    f.flush()
    os.fsync(f.fileno())
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    check_workdir(workdir, config, ())
    return False
  finally:
    os.unlink(tmp)
