"""DeepFloyd IF (diffusers format) → imagen_jax: load, convert, read back.

(Over 400 lines: the IF converter's load, convert, read-back and streaming of
tensors share the folder checks and abstract shapes; the config mapping, weights and
export are in ``if_config``, ``if_weights`` and ``if_export``.)

  model, params = load_unet("IF-I-XL-v1.0")                 # in memory
  model.apply({'params': params}, x, t, text_emb)          # stage I
  model.apply({'params': params}, x, t, text_emb, lowres=lowres,
              noise_level=noise_level)                     # stage II
  convert("IF-I-XL-v1.0", "converted/if_I", dtype="bfloat16")   # to disk
  stage_config, params = load_converted("converted/if_I")

Inputs are NHWC float images (``x`` the 3-channel noisy sample, ``lowres``
the upscaled, noised 3-channel conditioning image), IF's integer timesteps and
noise levels (0–999) and T5 embeddings [B, L, D]; the output is NHWC with IF's
6 channels (ε, then the learned-range variance interpolation v). IF passes no
text mask to its UNet: call it with ``text_mask=None``.

Tensors are read one at a time (``imagen_jax.safetensors_dir.WeightsReader``), converted
and cast, then placed on device (``load_unet``) or into the output tree
(``convert``), so the host never holds a second full copy of the weights.
``convert`` writes into a temporary sibling of ``out`` and renames it into
place only when everything succeeded.

``src`` is a diffusers IF pipeline folder (model_index.json, unet/,
scheduler/, ...) or a bare UNet folder (config.json + safetensors, what
diffusers' training scripts save for a fine-tuned UNet, and what
``if_export`` writes). A bare folder takes its scheduler settings from
``scheduler=`` (a folder holding scheduler_config.json, or a pipeline folder),
else from the pipeline folder around it (which also gives its T5), else from
IF's own defaults for the stage (stage II: in_channels 6 / a timestep class
embedding). The converted
config keeps the diffusers UNet config (``stage.diffusers_unet``) so that an
export reproduces it.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagen_jax import jsonfile
from imagen_jax import parallel
from imagen_jax.convert import if_config, if_weights
from imagen_jax.safetensors_dir import WeightsReader
from imagen_jax.models import UNet, UNetConfig, dummy_inputs
from imagen_jax.text import loading as t5_loading

FORMAT = "imagen_jax/deepfloyd_if"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
DTYPES = ("float32", "bfloat16")
TEXT_MAX_LENGTH = 77  # IF's tokenizer length (pipeline_if.encode_prompt)
SCHEDULES = ("squaredcos_cap_v2",)
SCHEDULER_FILE = "scheduler_config.json"
# What a bare UNet folder samples with unless told otherwise: IF's released
# scheduler config (stage II: sample_max_value IF_II_MAX_VALUE).
IF_SCHEDULER = if_config.IF_SCHEDULER
IF_II_MAX_VALUE = 1.0
IF_NOISING_SCHEDULER = dict(
  _class_name="DDPMScheduler",
  beta_schedule="squaredcos_cap_v2",
  num_train_timesteps=1000,
  variance_type="fixed_small",
  thresholding=False,
)


def _check_dtype(dtype: str) -> str:
  name = jnp.dtype(dtype).name
  if name not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  return name


def _scheduler_settings(folder: if_config.IFFolder) -> dict:
  """Sampling settings from scheduler_config.json (IF's DDPMScheduler)."""
  s = folder.scheduler_config
  bad = []
  if s.get("beta_schedule") not in SCHEDULES:
    bad.append(f"beta_schedule={s.get('beta_schedule')!r} (supported: {SCHEDULES})")
  if s.get("prediction_type", "epsilon") != "epsilon":
    bad.append(f"prediction_type={s['prediction_type']!r} (supported: 'epsilon')")
  if s.get("variance_type", "fixed_small") not in ("learned_range", "fixed_small"):
    bad.append(f"variance_type={s['variance_type']!r}")
  if s.get("timestep_spacing", "leading") not in ("leading", "trailing", "linspace"):
    bad.append(f"timestep_spacing={s['timestep_spacing']!r}")
  if bad:
    raise ValueError(f"{folder.path}: unsupported scheduler settings " + "; ".join(bad))
  threshold = (
    "dynamic" if s.get("thresholding") else "static" if s.get("clip_sample", True) else "none"
  )
  return dict(
    num_train_steps=int(s.get("num_train_timesteps", 1000)),
    variance=s.get("variance_type", "fixed_small"),
    threshold=threshold,
    quantile=float(s.get("dynamic_thresholding_ratio", 0.995)),
    max_value=float(s.get("sample_max_value", 1.0)),
    spacing=s.get("timestep_spacing", "leading"),
    steps_offset=int(s.get("steps_offset", 0)),
  )


def build_stage_config(
  folder: if_config.IFFolder, dtype: str = "float32", lowres_resolution: Optional[int] = None
) -> ml_collections.ConfigDict:
  """The stage config of a converted IF UNet (model, diffusion, sample, text).

  Args:
    folder: the read IF folder.
    dtype: compute and storage dtype of the converted UNet.
    lowres_resolution: stage II's input resolution (default resolution // 4,
      IF's ×4 super-resolution).
  """
  model = if_config.diffusers_config_to_model(folder.unet_config)
  model.update(dtype=dtype, param_dtype=dtype)
  sr = model["lowres_cond"]
  res = int(folder.unet_config.get("sample_size", 64))
  sched = _scheduler_settings(folder)
  stage = ml_collections.ConfigDict()
  stage.name = "if_II" if sr else "if_I"
  stage.resolution = res
  stage.lowres_resolution = (lowres_resolution or res // 4) if sr else None
  stage.model = model
  stage.diffusion = dict(
    kind="if_ddpm",
    prediction="eps",
    beta_schedule="squaredcos_cap_v2",
    num_train_steps=sched["num_train_steps"],
  )
  if sr:
    noising = folder.noising_config or {}
    if noising.get("beta_schedule", "squaredcos_cap_v2") not in SCHEDULES:
      raise ValueError(
        f"{folder.path}/image_noising_scheduler: unsupported beta_schedule "
        f"{noising['beta_schedule']!r} (supported: {SCHEDULES})"
      )
    stage.diffusion.aug_num_train_steps = int(noising.get("num_train_timesteps", 1000))
  # diffusers pipeline defaults: IF-I 100 steps, guidance 7; IF-II 50 steps, guidance 4.
  stage.sample = dict(
    sampler="if_ddpm",
    steps=50 if sr else 100,
    timesteps="",
    spacing=sched["spacing"],
    steps_offset=sched["steps_offset"],
    guidance=4.0 if sr else 7.0,
    threshold=sched["threshold"],
    quantile=sched["quantile"],
    max_value=sched["max_value"],
    variance=sched["variance"],
    noise_level=250 if sr else 0,
  )
  stage.text = dict(
    encoder=folder.text_encoder_dir or "",
    tokenizer=folder.tokenizer_dir or "",
    max_length=TEXT_MAX_LENGTH,
    dim=model["text_dim"],
    use_mask=False,
  )
  # The source UNet config, verbatim: export-diffusers writes it back.
  stage.diffusers_unet = folder.unet_config
  return stage


def _read_schedulers(path: str) -> tuple[dict, Optional[dict]]:
  """(scheduler config, image-noising scheduler config or None) from a folder."""
  if os.path.isfile(os.path.join(path, SCHEDULER_FILE)):
    return jsonfile.read_json(os.path.join(path, SCHEDULER_FILE)), None
  main = os.path.join(path, "scheduler", SCHEDULER_FILE)
  if not os.path.isfile(main):
    raise FileNotFoundError(
      f"scheduler folder {path!r} holds neither {SCHEDULER_FILE} nor scheduler/{SCHEDULER_FILE}"
    )
  noising = os.path.join(path, "image_noising_scheduler", SCHEDULER_FILE)
  return jsonfile.read_json(main), jsonfile.read_json(noising) if os.path.isfile(noising) else None


def _read_bare_unet(path: str) -> if_config.IFFolder:
  """A folder with only a diffusers UNet (config.json + weights)."""
  cfg = jsonfile.read_json(os.path.join(path, "config.json"))
  if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
    raise ValueError(
      f"{path}/config.json is a {cfg['_class_name']}, not a "
      "UNet2DConditionModel (nor is there a model_index.json)"
    )
  sr = cfg.get("class_embed_type") == "timestep" or cfg.get("in_channels") == 6
  sched = dict(IF_SCHEDULER, sample_max_value=IF_II_MAX_VALUE) if sr else dict(IF_SCHEDULER)
  noising = dict(IF_NOISING_SCHEDULER) if sr else None
  parent = os.path.dirname(os.path.abspath(path))
  text_encoder = tokenizer = None
  if os.path.isfile(os.path.join(parent, "model_index.json")) and os.path.isfile(
    os.path.join(parent, "scheduler", SCHEDULER_FILE)
  ):
    sched, noising = _read_schedulers(parent)  # the pipeline around it, and its T5
    te, tok = os.path.join(parent, "text_encoder"), os.path.join(parent, "tokenizer")
    text_encoder = te if os.path.isfile(os.path.join(te, "config.json")) else None
    tokenizer = tok if os.path.isdir(tok) else None
  return if_config.IFFolder(
    path=os.path.abspath(path),
    pipeline="UNet2DConditionModel",
    unet_dir=path,
    unet_config=cfg,
    scheduler_config=sched,
    noising_config=noising,
    text_encoder_dir=text_encoder,
    tokenizer_dir=tokenizer,
  )


def read_folder(src: str, scheduler: Optional[str] = None) -> if_config.IFFolder:
  """Reads a diffusers IF pipeline folder or a bare UNet folder.

  Args:
    src: the folder (see the module docstring).
    scheduler: optional folder whose scheduler settings replace the defaults
      (holding scheduler_config.json, or a pipeline folder with scheduler/).

  Raises:
    FileNotFoundError: no such folder, or neither layout's files.
    ValueError: files that are not those of an IF UNet (named).
  """
  bare = (
    os.path.isdir(src)
    and not os.path.isfile(os.path.join(src, "model_index.json"))
    and os.path.isfile(os.path.join(src, "config.json"))
  )
  folder = _read_bare_unet(src) if bare else if_config.read_if_folder(src)
  if scheduler:
    sched, noising = _read_schedulers(scheduler)
    folder = dataclasses.replace(
      folder, scheduler_config=sched, noising_config=noising or folder.noising_config
    )
  return folder


def _check_text_encoder(folder: if_config.IFFolder, text_dim: int) -> None:
  if folder.text_encoder_dir is None:
    return
  d_model = t5_loading.read_config(folder.text_encoder_dir).d_model
  if d_model != text_dim:
    raise ValueError(
      f"{folder.text_encoder_dir}: d_model={d_model}, but the UNet expects "
      f"{text_dim}-wide text embeddings (encoder_hid_dim / cross_attention_dim)"
    )


def abstract_params(model: UNet) -> Any:
  """Boxed abstract parameters of ``model`` (no memory allocated)."""
  c = model.config
  inputs = dummy_inputs(c, 1, c.downsample_factor, 4)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **inputs))["params"]


def _stream(
  folder: if_config.IFFolder, model: UNet, boxed: Any, variant: Optional[str]
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """Yields (our path, converted array in the param dtype), one tensor at a time."""
  dtype = jnp.dtype(model.config.param_dtype)
  with WeightsReader(folder.unet_dir, variant) as reader:
    items = if_weights.plan(
      nn.unbox(boxed), len(model.config.channels), reader.keys(), reader.shape
    )
    for path, name, shape in items:
      array = if_weights.to_flax(path, reader.get(name), shape)
      if array.dtype != dtype:
        array = array.astype(np.float32).astype(dtype)
      yield path, np.ascontiguousarray(array)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _prepare(
  src: str,
  dtype: str,
  lowres_resolution: Optional[int] = None,
  scheduler: Optional[str] = None,
  variant: Optional[str] = None,
):
  folder = read_folder(src, scheduler)
  stage = build_stage_config(folder, _check_dtype(dtype), lowres_resolution)
  _check_text_encoder(folder, stage.text.dim)
  with WeightsReader(folder.unet_dir, variant) as reader:
    reader.keys()  # a missing or damaged weights file fails here, before any tracing
  return folder, stage, UNet(UNetConfig.from_config(stage.model))


def load_unet(
  src: str,
  *,
  dtype: str = "float32",
  variant: Optional[str] = None,
  mesh: Any = None,
  rules: Any = None,
) -> tuple[UNet, dict]:
  """Loads a diffusers IF UNet into our UNet, tensor by tensor.

  Args:
    src: the IF pipeline folder (model_index.json, unet/, scheduler/, ...) or a
      bare UNet folder (config.json + safetensors).
    dtype: 'float32' or 'bfloat16' (compute and storage).
    variant: None (full precision, else the fp16 variant) or e.g. 'fp16'.
    mesh, rules: optional mesh and logical-axis rules
      (``parallel.logical_rules('fsdp')``); parameters are placed sharded.

  Returns:
    (model, params): ``model.apply({'params': params}, x, t, text_emb[, lowres=,
    noise_level=])`` → [B, H, W, 6].
  """
  folder, _, model = _prepare(src, dtype, variant=variant)
  boxed = abstract_params(model)
  shardings = dict(if_weights.flat_params(parallel.logical_shardings(boxed, mesh, rules)))
  params = {}
  for path, array in _stream(folder, model, boxed, variant):
    _set(params, path, jax.device_put(array, shardings.get(path)))
    del array
  return model, params


@contextlib.contextmanager
def staged_output(out: str) -> Iterator[str]:
  """Yields a temporary sibling of ``out`` that becomes ``out`` on success.

  ``out`` must not exist or be an empty directory. On any exception the
  temporary folder is removed and ``out`` is untouched.

  Raises:
    FileExistsError: ``out`` exists and is not an empty directory.
  """
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"output {out} exists and is not an empty directory")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  try:
    yield tmp
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
    if os.path.isdir(out):
      os.rmdir(out)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def convert(
  src: str,
  out: str,
  *,
  dtype: str = "float32",
  variant: Optional[str] = None,
  lowres_resolution: Optional[int] = None,
  scheduler: Optional[str] = None,
) -> str:
  """Converts an IF UNet into ``out`` (config.json + orbax params/).

  Nothing appears at ``out`` unless the whole conversion succeeded.

  Args:
    src: the IF pipeline folder or a bare UNet folder.
    out: the output directory; must not exist or be empty.
    dtype: 'float32' or 'bfloat16' storage (and compute) dtype.
    variant: weights variant (see ``load_unet``).
    lowres_resolution: stage II's low-resolution input size (default res // 4).
    scheduler: a folder whose scheduler settings to use (see ``read_folder``).

  Returns:
    The absolute output path.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"output {out} exists and is not an empty directory")
  folder, stage, model = _prepare(src, dtype, lowres_resolution, scheduler, variant)
  boxed = abstract_params(model)
  with staged_output(out) as tmp:
    params = {}
    with WeightsReader(folder.unet_dir, variant) as reader:
      weights = os.path.relpath(reader.source, folder.path)
    for path, array in _stream(folder, model, boxed, variant):
      _set(params, path, array)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
    checkpointer.wait_until_finished()
    meta = dict(
      format=FORMAT,
      version=1,
      source=folder.path,
      pipeline=folder.pipeline,
      weights=weights,
      scheduler=folder.scheduler_config,
      stage=stage.to_dict(),
    )
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=2)
  return out


def read_converted_config(out_dir: str) -> ml_collections.ConfigDict:
  """The stage config of a ``convert`` output (its config.json), validated.

  Raises:
    FileNotFoundError: no config.json.
    ValueError: not JSON, or not written by ``convert``.
  """
  config_file = os.path.join(out_dir, CONFIG_FILE)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"{config_file} not found: not a converted IF stage")
  meta = jsonfile.read_json(config_file)
  if meta.get("format") != FORMAT or not isinstance(meta.get("stage"), dict):
    raise ValueError(f"{config_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
  return ml_collections.ConfigDict(meta["stage"])


def load_converted(
  out_dir: str, *, mesh: Any = None, rules: Any = None
) -> tuple[ml_collections.ConfigDict, dict]:
  """Reads a ``convert`` output back.

  Args:
    out_dir: the directory ``convert`` wrote.
    mesh, rules: optional mesh and logical-axis rules to restore sharded.

  Returns:
    (stage_config, params): ``UNet(UNetConfig.from_config(stage_config.model))``
    applies to ``{'params': params}``.

  Raises:
    FileNotFoundError, ValueError: no or a damaged config.json or params/ (named).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  stage = read_converted_config(out_dir)
  model = UNet(UNetConfig.from_config(stage.model))
  boxed = abstract_params(model)
  target = nn.unbox(boxed)
  if mesh is not None:
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      target,
      parallel.logical_shardings(boxed, mesh, rules),
    )
  params_dir = os.path.abspath(os.path.join(out_dir, PARAMS_DIR))
  try:
    params = ocp.StandardCheckpointer().restore(params_dir, target)
  except Exception as e:  # orbax/tensorstore raise many kinds for a damaged checkpoint
    raise ValueError(
      f"{params_dir}: cannot restore the converted params ({' '.join(str(e).split())})"
    ) from None
  if mesh is None:
    params = jax.tree.map(jnp.asarray, params)
  return stage, params
