"""Our IF-layout UNet → a diffusers ``UNet2DConditionModel`` folder.

  export("converted/if_I", "out/unet")                      # a converted IF stage
  export("runs/if_ft", "out/unet", stage_name="if_II")      # a run's EMA params

writes ``out/unet/config.json`` and ``out/unet/diffusion_pytorch_model.safetensors``,
what ``UNet2DConditionModel.from_pretrained`` reads (and what ``deepfloyd_if``
reads back as a bare UNet folder). The inverse of the import: the same tensor
names (``if_weights.diffusers_name``), conv kernels HWIO → OIHW, linear
kernels (in, out) → (out, in) (``if_weights.to_torch``).

A stage is IF-layout when the diffusers config derived from its model config
(``model_to_diffusers_config``) maps back to the same UNet; anything else
(Efficient UNet, space-to-depth stem, conv resampling, ...) has no diffusers
counterpart and is refused, naming the fields. ``config.json`` is the
diffusers config the stage was converted from when the stage kept it
(``stage.diffusers_unet``) and it still describes the model; otherwise the
derived one. Everything is written into a temporary sibling of ``out`` and
renamed into place at the end; tensors are converted and written one at a time.
"""

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import ml_dtypes
import numpy as np

from imagen_jax import jsonfile
from imagen_jax.convert import deepfloyd_if, if_config, if_weights
from imagen_jax.models import UNetConfig
from imagen_jax.safetensors_dir import write_safetensors
from imagen_jax import run as run_lib
from imagen_jax.stages import build_stage

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
DIFFUSERS_VERSION = "0.42.1"  # the version whose UNet2DConditionModel the mapping was checked on
OUT_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# UNetConfig fields that change no parameter and no output of a float32 forward pass.
_IGNORED = ("dtype", "param_dtype", "remat")


# if_config.REQUIRED, plus the keys diffusers writes that our UNet has no use for
# (their UNet2DConditionModel defaults).
REQUIRED_DEFAULTS = dict(
  if_config.REQUIRED,
  addition_time_embed_dim=None,
  downsample_padding=1,
  dropout=0.0,
  encoder_hid_dim=None,
  projection_class_embeddings_input_dim=None,
  reverse_transformer_layers_per_block=None,
  transformer_layers_per_block=1,
  upcast_attention=False,
  use_linear_projection=False,
)


def _ints(value: Any) -> Any:
  """A float that is an integer as an int (diffusers' configs write 0, not 0.0)."""
  return int(value) if isinstance(value, float) and value.is_integer() else value


def model_to_diffusers_config(model: Any, resolution: int) -> dict:
  """The diffusers ``UNet2DConditionModel`` config nearest to ``model``.

  Exact (``if_config.diffusers_config_to_model`` maps it back to ``model``)
  when the model is IF-layout; ``check_if_layout`` tells.

  Args:
    model: ``config.model`` (a dict or ConfigDict of UNetConfig fields).
    resolution: the stage's image size (``sample_size``).

  Returns:
    The config as diffusers writes it (every key its UNet2DConditionModel takes).
  """
  c = UNetConfig.from_config(dict(model))
  n = len(c.channels)
  kinds = tuple(c.attention)
  only = [k == "cross" for k in kinds]
  only_cfg = only[0] if len(set(only)) == 1 else only
  mid_only = c.mid_attention == "cross"
  mid_default = only_cfg if isinstance(only_cfg, bool) else False
  blocks = tuple(c.num_res_blocks)
  projected = c.text_proj_dim is not None
  cfg = dict(REQUIRED_DEFAULTS)
  cfg.update(
    _class_name="UNet2DConditionModel",
    _diffusers_version=DIFFUSERS_VERSION,
    act_fn=c.act,
    addition_embed_type="text" if c.text_pool == "attention" else None,
    addition_embed_type_num_heads=c.text_pool_heads,
    attention_head_dim=c.head_dim,
    block_out_channels=list(c.channels),
    class_embed_type="timestep" if c.aug_embed else None,
    cross_attention_dim=c.text_proj_dim if projected else c.text_dim,
    cross_attention_norm=c.text_norm,
    down_block_types=[
      ("SimpleCrossAttnDownBlock2D" if k != "none" else "ResnetDownsampleBlock2D") for k in kinds
    ],
    encoder_hid_dim=c.text_dim if projected else None,
    encoder_hid_dim_type="text_proj" if projected else None,
    flip_sin_to_cos=c.flip_sin_to_cos,
    freq_shift=_ints(c.freq_shift),
    in_channels=2 * c.in_channels if c.lowres_cond else c.in_channels,
    layers_per_block=blocks[0] if len(set(blocks)) == 1 else list(blocks),
    mid_block_only_cross_attention=None if mid_only == mid_default else mid_only,
    mid_block_scale_factor=_ints(
      c.resblock_out_scale if c.mid_out_scale is None else c.mid_out_scale
    ),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn" if c.mid_block else None,
    norm_eps=c.norm_eps,
    norm_num_groups=c.norm_groups,
    only_cross_attention=only_cfg,
    out_channels=c.out_channels,
    resnet_out_scale_factor=_ints(c.resblock_out_scale),
    resnet_skip_time_act=not c.resblock_time_act,
    sample_size=int(resolution),
    time_embedding_act_fn=c.time_act,
    time_embedding_dim=(
      None if c.time_embed_dim in (None, 4 * c.channels[0]) else c.time_embed_dim
    ),
    up_block_types=[
      ("SimpleCrossAttnUpBlock2D" if kinds[n - 1 - i] != "none" else "ResnetUpsampleBlock2D")
      for i in range(n)
    ],
  )
  return dict(sorted(cfg.items()))


def _canonical(model: Any) -> dict:
  """UNetConfig fields with the defaults that mean the same thing resolved."""
  d = {k: v for k, v in UNetConfig.from_config(dict(model)).__dict__.items() if k not in _IGNORED}
  if d["mid_out_scale"] is None:
    d["mid_out_scale"] = d["resblock_out_scale"]
  if d["time_embed_dim"] is None:
    d["time_embed_dim"] = 4 * d["channels"][0]
  if d["text_norm"] == "group_norm" and d["text_norm_groups"] is None:
    d["text_norm_groups"] = d["norm_groups"]
  return d


def check_if_layout(model: Any, resolution: int, what: str) -> dict:
  """The diffusers config of an IF-layout model, or a one-line ValueError.

  Args:
    model: ``config.model`` of the stage.
    resolution: the stage's resolution.
    what: names the stage in the error (e.g. "stage 'base' of runs/demo").

  Raises:
    ValueError: the model has no diffusers UNet2DConditionModel counterpart;
      the differing fields are named with ours and the nearest IF value.
  """
  why = "diffusers' UNet2DConditionModel in IF's layout cannot hold it"
  try:
    ours = _canonical(model)
    cfg = model_to_diffusers_config(model, resolution)
    back = _canonical(if_config.diffusers_config_to_model(cfg))
  except (TypeError, ValueError, KeyError) as e:
    raise ValueError(f"{what} is not IF-layout ({why}): {' '.join(str(e).split())}") from None
  diff = [f"{k}={ours[k]!r} (IF: {back[k]!r})" for k in ours if ours[k] != back.get(k)]
  if diff:
    raise ValueError(f"{what} is not IF-layout ({why}): {'; '.join(diff)}")
  return cfg


def _config_to_write(stage: Any, derived: dict) -> dict:
  """The stage's source diffusers config if it still describes the model, else ``derived``."""
  source = stage.get("diffusers_unet")
  if source is None:
    return derived
  source = source.to_dict() if hasattr(source, "to_dict") else dict(source)
  try:
    same = _canonical(if_config.diffusers_config_to_model(source)) == _canonical(stage.model)
  except (TypeError, ValueError, KeyError):
    same = False
  return source if same else derived


def _stage_of_run(src: str, stage_name: Optional[str]) -> ml_collections.ConfigDict:
  config = run_lib.read_config(src)
  stages = config.get("stages") or {}
  names = list(stages.keys())
  if stage_name is None and len(names) == 1:
    stage_name = names[0]
  if stage_name not in stages:
    raise ValueError(
      f"{src}/config.json has stages {names}; pick one with --stage"
      if stage_name is None
      else f"{src}/config.json has no stage {stage_name!r} (stages: {names})"
    )
  stage = stages[stage_name]
  if "name" not in stage:
    stage.name = stage_name
  return stage


def read_stage(
  src: str, stage_name: Optional[str] = None
) -> tuple[ml_collections.ConfigDict, bool]:
  """The stage config behind ``src``, and whether ``src`` is a converted IF folder.

  Args:
    src: a converted IF folder (``deepfloyd_if.convert`` output) or a run's workdir.
    stage_name: the stage (optional when ``src`` holds one stage).

  Raises:
    FileNotFoundError: ``src`` has no config.json.
    ValueError: no such stage, or an unreadable config.
  """
  config_file = os.path.join(src, CONFIG_FILE)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(
      f"{config_file} not found: --src must be a converted IF folder or a training run's workdir"
    )
  if jsonfile.read_json(config_file).get("format") == deepfloyd_if.FORMAT:
    stage = deepfloyd_if.read_converted_config(src)
    if stage_name not in (None, stage.name):
      raise ValueError(f"{src} holds the converted stage {stage.name!r}, not {stage_name!r}")
    return stage, True
  return _stage_of_run(src, stage_name), False


def _tensor_specs(params: Any, num_levels: int) -> list:
  """[(diffusers name, torch shape, our path)] sorted by name.

  ``params`` was restored into the model's abstract tree, so its structure and
  shapes are the model's.
  """
  return sorted(
    (
      if_weights.diffusers_name(path, num_levels),
      if_weights.torch_shape(path, tuple(a.shape)),
      path,
    )
    for path, a in if_weights.flat_params(params)
  )


def export(src: str, out: str, *, stage_name: Optional[str] = None, dtype: str = "float32") -> str:
  """Writes a diffusers UNet folder from a converted IF stage or a run's stage.

  Args:
    src: a converted IF folder, or a training run's workdir (its latest EMA params).
    out: the output folder; must not exist or be empty.
    stage_name: the stage to export (optional when ``src`` holds one).
    dtype: 'float32', 'float16' or 'bfloat16' for the written tensors.

  Returns:
    The absolute output path.

  Raises:
    FileNotFoundError, FileExistsError, ValueError: one-line messages naming
      the file or the stage and the problem (nothing written).
  """
  if dtype not in OUT_DTYPES:
    raise ValueError(f"dtype must be one of {sorted(OUT_DTYPES)}, got {dtype!r}")
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"output {out} exists and is not an empty directory")
  stage, converted = read_stage(src, stage_name)
  what = f"stage {stage.name!r} of {src}"
  derived = check_if_layout(stage.model, stage.resolution, what)
  unet_config = _config_to_write(stage, derived)
  if converted:
    _, params = deepfloyd_if.load_converted(src)
  else:
    try:
      params, _ = run_lib.load_ema_params(src, build_stage(stage))
    except FileNotFoundError:
      raise
    except Exception as e:  # orbax/tensorstore raise many kinds for a damaged checkpoint
      raise ValueError(
        f"{src}: cannot restore the EMA params of stage {stage.name!r} ({' '.join(str(e).split())})"
      ) from None
  specs = _tensor_specs(params, len(stage.model.channels))
  flat = dict(if_weights.flat_params(params))
  target = np.dtype(OUT_DTYPES[dtype])

  def tensors():
    for _, _, path in specs:
      array = np.asarray(jax.device_get(flat[path]))
      if array.dtype != target:
        array = array.astype(np.float32).astype(target)
      yield if_weights.to_torch(path, array)

  with deepfloyd_if.staged_output(out) as tmp:
    write_safetensors(
      os.path.join(tmp, WEIGHTS_FILE),
      [(name, shape, target) for name, shape, _ in specs],
      tensors(),
      metadata={"format": "pt"},
    )
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(unet_config, f, indent=2, sort_keys=True)
      f.write("\n")
  return out
