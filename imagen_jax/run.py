"""Reading a run: its config, its stages' EMA parameters and checkpoint steps.

(Over 400 lines: every run format a sampler reads, trained or converted, is read
here in one place below the cascade.)

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
  the T5 recorded at conversion;

* a converted Stable Diffusion pipeline (``python -m imagen_jax.convert
  stable-diffusion``, format ``imagen_jax/stable_diffusion``): ``DIR/config.json`` +
  ``DIR/params/{unet,vae,text_encoder}`` + ``DIR/tokenizer/``. It is read wherever a
  converted IF folder is (alone, in a comma list 'if_I,if_II,x4', in a parent
  folder); ``read_sd_stage`` gives its latent stage config (``diffusion.kind =
  'latent'``, its CLIP tower named by ``text_encoder``) and the params of its UNet,
  VAE and CLIP text encoder. An x4 upscaler after another stage takes that stage's
  resolution as its input (``_chain_upscaler``).

Paths go through ``etils.epath`` (as orbax and TFDS do), so a workdir may be a
bucket (``gs://bucket/run``) that every host of a pod shares; local paths are
made absolute (orbax wants absolute paths), remote ones are left as given.
"""

import hashlib
import io
import json
import logging
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from imagen_jax import jsonfile
from imagen_jax import config as config_lib
from imagen_jax import parallel
from imagen_jax import stages

_log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
CONVERTED_FORMAT = "imagen_jax/deepfloyd_if"
CONVERTED_PARAMS = "params"
CONVERTED_SD_FORMAT = "imagen_jax/stable_diffusion"
# diffusers scheduler class → the sampler a converted SD stage uses by default
# (PNDM, SD 1.x's default, has no sampler here: its DDIM neighbour is used).
SD_SAMPLERS = dict(
  DDIMScheduler="ddim",
  PNDMScheduler="ddim",
  DDPMScheduler="ddpm",
  DPMSolverMultistepScheduler="dpmpp_2m",
  EulerDiscreteScheduler="euler",
  HeunDiscreteScheduler="heun",
)


def config_fingerprint(stage_config: Any) -> str:
  """A short hash of what makes checkpoints of a stage incompatible (its model)."""
  blob = json.dumps(json.loads(stage_config.model.to_json()), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def as_path(path: Any) -> epath.Path:
  """An ``epath.Path``: local paths absolute, remote ones (``gs://...``) as given."""
  text = os.fspath(path)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes ``config.json`` (atomically) so sampling can rebuild the cascade."""
  root = as_path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  tmp = root / (CONFIG_FILE + ".tmp")
  tmp.write_text(config.to_json(indent=2))
  tmp.replace(root / CONFIG_FILE)


def write_png(path: Any, image: Any) -> None:
  """Writes a uint8 [H, W, 3] array as a PNG file at ``path`` (local or remote)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  epath.Path(path).write_bytes(buf.getvalue())


def stage_dir(workdir: str, stage_name: str) -> str:
  return os.fspath(as_path(workdir) / stage_name)


def checkpoint_dir(workdir: str, stage_name: str) -> str:
  return os.fspath(as_path(workdir) / stage_name / CHECKPOINTS)


def _is_file(path: Any) -> bool:
  p = epath.Path(path)
  return p.exists() and not p.is_dir()


def converted_format(path: Any) -> Optional[str]:
  """``CONVERTED_FORMAT`` (IF) or ``CONVERTED_SD_FORMAT`` for a converted folder, else None."""
  f = epath.Path(path) / CONFIG_FILE
  if not _is_file(f):
    return None
  found = jsonfile.read_json(f).get("format")
  return found if found in (CONVERTED_FORMAT, CONVERTED_SD_FORMAT) else None


def is_converted(path: str) -> bool:
  """Whether ``path`` is one converted DeepFloyd IF stage folder."""
  return converted_format(path) == CONVERTED_FORMAT


def _cascade_position(folder: Any) -> tuple:
  """Sort key of a converted folder in a parent folder: the text-to-image stage first,
  then the pixel super-resolution stages by resolution, then latent upscalers (the x4
  upscaler takes whatever resolution precedes it, so it ends the chain)."""
  meta = jsonfile.read_json(epath.Path(folder) / CONFIG_FILE)
  stage = meta["stage"]
  if meta.get("format") == CONVERTED_SD_FORMAT:
    upscaler = stage.get("pipeline") == "StableDiffusionUpscalePipeline"
    return upscaler, upscaler, 0
  return bool(stage.get("lowres_resolution")), False, stage["resolution"]


def converted_stage_dirs(path: str) -> Optional[list]:
  """The converted stage folders that ``path`` names, cascade order; None if none.

  ``path``: one converted folder (DeepFloyd IF or Stable Diffusion), 'A,B,C' (in
  cascade order: 'if_I,if_II,x4', 'sd15,x4'), or a folder whose sub-folders are
  converted stages (ordered by ``_cascade_position``).
  """
  if "," in path:
    return [p for p in path.split(",") if p]
  if converted_format(path):
    return [path]
  root = epath.Path(path)
  if root.is_dir() and not _is_file(root / CONFIG_FILE):
    subs = [os.fspath(d) for d in sorted(root.iterdir()) if d.is_dir() and converted_format(d)]
    if subs:
      return sorted(subs, key=_cascade_position)
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
  """A cascade config for converted stage folders, in the given order.

  IF stages share the T5 recorded at conversion of the first one (``config.text``);
  Stable Diffusion stages bring their CLIP tower (``text_encoder`` of their stage
  config). A latent upscaler after another stage takes that stage's resolution as
  its input (``lowres_resolution``) and upsamples it by its own factor.
  """
  config = config_lib.base_config()
  config.mesh.shape = {"data": -1}
  config.mesh.strategy = "dp"
  text = None
  for d in dirs:
    meta_file = epath.Path(d) / CONFIG_FILE
    if not _is_file(meta_file):
      raise FileNotFoundError(
        f"{meta_file} not found: {d!r} is not a converted IF or Stable Diffusion stage "
        "(python -m imagen_jax.convert deepfloyd-if|stable-diffusion --src ... --out ...)"
      )
    meta = jsonfile.read_json(meta_file)
    if meta.get("format") == CONVERTED_SD_FORMAT:
      stage = sd_stage_config(meta["stage"], d)
    elif meta.get("format") == CONVERTED_FORMAT:
      text = text or meta["stage"].get("text") or meta.get("text") or {}
      stage = ml_collections.ConfigDict(normalize_converted_stage(meta["stage"]))
      stage.source = os.fspath(as_path(d))  # where its params are read from
    else:
      raise ValueError(
        f"{meta_file}: format {meta.get('format')!r}, expected {CONVERTED_FORMAT!r} or "
        f"{CONVERTED_SD_FORMAT!r}"
      )
    if stage.name in config.stages:
      raise ValueError(f"two converted folders hold stage {stage.name!r}: {list(dirs)}")
    if config.stage_order and stage.get("lowres_resolution") and stage.diffusion.kind == "latent":
      _chain_upscaler(stage, config.stages[config.stage_order[-1]])
    config_lib.add_stage(config, stage)
  text = text or {}
  config.text.update(
    dict(
      path=text.get("encoder", ""),
      tokenizer=text.get("tokenizer", ""),
      max_length=int(text.get("max_length", 77)),
      dim=int(text.get("dim", 4096)),
      dtype="float32",
    )
  )
  return config


def _chain_upscaler(stage: ml_collections.ConfigDict, prev: ml_collections.ConfigDict) -> None:
  """A latent upscaler's sizes after ``prev``: input prev's resolution, output × its factor."""
  scale = int(stage.resolution) // int(stage.lowres_resolution)
  stage.lowres_resolution = int(prev.resolution)
  stage.resolution = scale * int(prev.resolution)


def read_config(path: str, as_written: bool = False) -> ml_collections.ConfigDict:
  """The cascade config of a run: a training workdir or converted IF / SD folders.

  A run with a fitted tokenizer gets ``text.tokenizer`` pointing at it, unless
  ``as_written`` (the file's settings exactly, as the trainer's checks compare).

  Raises:
    FileNotFoundError: nothing readable at ``path`` (the message says how to
      make a run).
    ValueError: a config.json that is not valid.
  """
  dirs = converted_stage_dirs(path)
  if dirs is not None:
    return _converted_config(dirs)
  file = epath.Path(path) / CONFIG_FILE
  if not _is_file(file):
    raise FileNotFoundError(
      f"{file} does not exist: {path!r} holds no trained run "
      f"(train one with: python train.py --config configs/demo.py "
      f"--workdir {path})"
    )
  config = ml_collections.ConfigDict(jsonfile.read_json(file))
  return config if as_written else with_fitted_tokenizer(config, path)


TOKENIZER_DIR = "tokenizer"  # a run's fitted tokenizer (config.text.fit_tokenizer)


def tokenizer_dir(workdir: Any) -> str:
  """Where the trainer writes a run's fitted word tokenizer."""
  return os.fspath(as_path(workdir) / TOKENIZER_DIR)


def with_fitted_tokenizer(config: ml_collections.ConfigDict, workdir: Any):
  """``config`` with ``text.tokenizer`` pointing at the run's fitted tokenizer.

  A config with ``text.fit_tokenizer`` set names no tokenizer folder: the
  trainer fits one on the training captions into ``WORKDIR/tokenizer``. Other
  configs come back unchanged.
  """
  text = config.get("text") or {}
  if not text.get("fit_tokenizer") or text.get("tokenizer"):
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.text.tokenizer = tokenizer_dir(workdir)
  return config


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings (for sharded restore)."""
  if shardings is None:
    return abstract
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def abstract_params(stage: Any, mesh=None, rules=None) -> Any:
  """The unboxed abstract params of a stage, with their shardings under a mesh."""
  boxed = stage.abstract_params()
  if mesh is not None:
    shardings = parallel.logical_shardings(boxed, mesh, rules)
  else:
    # An explicit target device: checkpoints written on other meshes and processes
    # (a pod) restore here too, never by the devices recorded at saving.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, nn.unbox(boxed))
  return abstract_with_shardings(nn.unbox(boxed), shardings)


def checkpoint_manager(
  workdir: str, stage_name: str, *, keep: int = 2, async_save: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
  """The orbax manager of one stage's checkpoints (read-only for sampling)."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    create=not read_only,
    enable_async_checkpointing=async_save,
    read_only=read_only,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir, stage_name), options=options)


def load_converted_params(folder: str, stage: Any, mesh=None, rules=None) -> Any:
  """The params of a converted stage folder (``python -m imagen_jax.convert``).

  Args:
    folder: the converted folder (config.json + params/).
    stage: the ``Stage`` whose parameter tree the params fill (a latent stage: its
      {'unet', 'vae'} from a converted Stable Diffusion folder).
    mesh, rules: place the params sharded (None: default device).
  """
  if stage.kind == "latent":
    return load_sd_params(folder, stage, mesh, rules)
  target = abstract_params(stage, mesh, rules)
  params = ocp.StandardCheckpointer().restore(as_path(folder) / CONVERTED_PARAMS, target)
  return jax.tree.map(jnp.asarray, params) if mesh is None else params


def load_ema_params(
  workdir: str, stage: Any, mesh=None, rules=None, step: Optional[int] = None
) -> tuple[Any, int]:
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
  source = stage.config.get("source")
  if source:
    return load_converted_params(source, stage, mesh, rules), 0
  target = abstract_params(stage, mesh, rules)
  ckpt_dir = checkpoint_dir(workdir, stage.name)
  manager = latest = None
  if epath.Path(ckpt_dir).is_dir():
    manager = checkpoint_manager(workdir, stage.name, read_only=True, async_save=False)
    latest = manager.latest_step()
  if latest is None:
    raise FileNotFoundError(
      f"stage {stage.name!r} has no checkpoint under {ckpt_dir}; train it with: "
      f"python train.py --config <config> --workdir {workdir} --stage {stage.name}"
    )
  restore = lambda s: (
    manager.restore(s, args=ocp.args.Composite(ema=ocp.args.StandardRestore(target))).ema
  )
  if step is not None:
    return restore(step), step
  # The newest step first; a damaged one (a file truncated by a lost host or
  # a full disk) is skipped with a warning, never deleted.
  failures = []
  for candidate in sorted(manager.all_steps(), reverse=True):
    try:
      params = restore(candidate)
    except Exception as e:  # pylint: disable=broad-except
      failures.append(
        f"step {candidate}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
      )
      _log.warning(
        "stage %s: checkpoint step %d under %s is unreadable (%s); trying the previous one",
        stage.name,
        candidate,
        ckpt_dir,
        failures[-1],
      )
      continue
    return params, candidate
  raise ValueError(
    f"stage {stage.name!r}: no checkpoint under {ckpt_dir} is readable ("
    + "; ".join(failures)
    + ")"
  )


def is_converted_sd(path: Any) -> bool:
  """Whether ``path`` is one converted Stable Diffusion folder."""
  return converted_format(path) == CONVERTED_SD_FORMAT


def _scheduler_section(s: dict) -> dict:
  keys = ("beta_start", "beta_end", "num_train_steps", "set_alpha_to_one")
  return dict(beta_schedule=s["schedule"], **{k: s[k] for k in keys})


def sd_stage_config(converted: dict, folder: str) -> ml_collections.ConfigDict:
  """The latent stage config of a converted SD folder's ``config.json`` ``stage``.

  Resolution: the UNet's ``sample_size`` × the VAE factor (the x4 upscaler:
  ``lowres_resolution`` = sample_size, the resolution 4× that); sampling defaults as
  the diffusers pipelines (50 steps, guidance 7.5; the upscaler 75 steps, guidance 9
  and noise level 100, IF's setting, capped by ``max_noise_level``).
  """
  upscaler = converted["pipeline"] == "StableDiffusionUpscalePipeline"
  sched = converted["sampling"]["scheduler"]
  factor = 2 ** (len(converted["vae"]["block_out_channels"]) - 1)
  size = int(converted["diffusers"]["unet"].get("sample_size") or 64)
  diffusion = dict(kind="latent", prediction=sched["prediction"], cond_drop=0.1)
  diffusion.update(_scheduler_section(sched))
  sample = dict(
    sampler=SD_SAMPLERS.get(sched["scheduler_class"], "ddim"),
    steps=75 if upscaler else 50,
    spacing=sched["spacing"],
    steps_offset=sched["steps_offset"],
    guidance=9.0 if upscaler else 7.5,
    threshold="none",
    eta=0.0,
  )
  stage = dict(
    name="x4" if upscaler else "sd",
    resolution=size * factor,
    source=os.fspath(as_path(folder)),
    model=converted["model"],
    vae=converted["vae"],
    text_encoder=dict(
      kind="clip",
      folder=os.fspath(as_path(folder)),
      penultimate=False,
      dim=int(converted["text"]["dim"]),
    ),
    diffusion=diffusion,
    sample=sample,
  )
  if upscaler:
    stage["lowres_resolution"] = size
    diffusion["low_res"] = _scheduler_section(converted["sampling"]["low_res_scheduler"])
    diffusion["max_noise_level"] = int(converted["sampling"]["max_noise_level"])
    sample["noise_level"] = min(100, diffusion["max_noise_level"])
  return ml_collections.ConfigDict(stage)


def read_sd_stage(folder: str, mesh=None, rules=None) -> tuple[ml_collections.ConfigDict, dict]:
  """(stage config, params) of a converted Stable Diffusion folder.

  Args:
    folder: the ``convert`` output (config.json + params/{unet,vae,text_encoder}).
    mesh, rules: place the UNet and VAE params sharded (None: default device).

  Returns:
    (config, {'unet', 'vae', 'text_encoder'}): ``stages.build_stage(config)`` samples
    with {'unet', 'vae'}; the text encoder's params (unsharded) are for the CLIP tower
    its ``text_encoder`` section names.

  Raises:
    ValueError: not a converted SD folder, or a checkpoint that does not restore.
  """
  meta_file = as_path(folder) / CONFIG_FILE
  meta = jsonfile.read_json(meta_file) if _is_file(meta_file) else {}
  if meta.get("format") != CONVERTED_SD_FORMAT:
    raise ValueError(
      f"{meta_file}: format {meta.get('format')!r}, expected {CONVERTED_SD_FORMAT!r} "
      "(python -m imagen_jax.convert stable-diffusion --src ... --out ...)"
    )
  config = sd_stage_config(meta["stage"], folder)
  params = load_sd_params(folder, stages.build_stage(config), mesh, rules)
  params["text_encoder"] = _restore_sd_part(folder, "text_encoder", None)
  if mesh is None:
    params["text_encoder"] = jax.tree.map(jnp.asarray, params["text_encoder"])
  return config, params


def _restore_sd_part(folder: str, part: str, target: Any) -> Any:
  path = as_path(folder) / CONVERTED_PARAMS / part
  try:
    return ocp.StandardCheckpointer().restore(path, target)
  except Exception as e:  # orbax/tensorstore raise many kinds for a damaged checkpoint
    raise ValueError(f"{path}: cannot restore ({' '.join(str(e).split())})") from None


def load_sd_params(folder: str, stage: Any, mesh=None, rules=None) -> dict:
  """A latent stage's {'unet', 'vae'} params from a converted Stable Diffusion folder,
  placed sharded under a mesh (default device otherwise)."""
  target = abstract_params(stage, mesh, rules)
  params = {part: _restore_sd_part(folder, part, target[part]) for part in ("unet", "vae")}
  return jax.tree.map(jnp.asarray, params) if mesh is None else params


def sd_tokenizer_dir(folder: str) -> str:
  """The CLIP tokenizer folder of a converted Stable Diffusion folder (sampling needs it).

  Raises:
    FileNotFoundError: the folder has none (one line: what to copy where).
  """
  path = as_path(folder) / "tokenizer"
  if not path.is_dir():
    raise FileNotFoundError(
      f"{folder} has no tokenizer/ (the pipeline it was converted from had none): copy the "
      f"pipeline's CLIPTokenizer folder (vocab.json, merges.txt, tokenizer_config.json) to {path}"
    )
  return os.fspath(path)


def read_sd_text_config(folder: str) -> tuple[dict, str]:
  """(CLIP text config dict, tokenizer folder) of a converted SD folder, no weights read.

  Raises:
    FileNotFoundError: no tokenizer folder (``sd_tokenizer_dir``).
    ValueError: not a converted SD folder.
  """
  tokenizer = sd_tokenizer_dir(folder)
  meta = jsonfile.read_json(as_path(folder) / CONFIG_FILE)
  if meta.get("format") != CONVERTED_SD_FORMAT:
    raise ValueError(f"{folder}: format {meta.get('format')!r}, expected {CONVERTED_SD_FORMAT!r}")
  return meta["stage"]["text"], tokenizer


def read_sd_text_encoder(folder: str) -> tuple[dict, Any, str]:
  """(CLIP text config dict, params, tokenizer folder) of a converted SD folder: what
  ``text.clip_encoder.CLIPEncoder`` is built from (``CLIPTextConfig.from_dict``).

  Raises:
    FileNotFoundError: no tokenizer folder (``sd_tokenizer_dir``).
    ValueError: not a converted SD folder, or a checkpoint that does not restore.
  """
  text, tokenizer = read_sd_text_config(folder)
  return text, _restore_sd_part(folder, "text_encoder", None), tokenizer
