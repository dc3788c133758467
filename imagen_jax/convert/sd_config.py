"""Stable Diffusion pipeline folders (diffusers) → our model configs and sampling settings.

A folder is either a pipeline (``model_index.json`` naming one of ``PIPELINES``, with
``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``; the upscaler also
``low_res_scheduler/`` and ``max_noise_level``) or one component's own folder
(``config.json`` + safetensors). Every check raises a one-line error naming the file,
the value found and what is supported.
"""

import math
import os
import warnings
from typing import Any

from imagen_jax import jsonfile
from imagen_jax.models.sd_unet import DOWN_BLOCKS, UP_BLOCKS, SDUNetConfig
from imagen_jax.models.vae import VAEConfig
from imagen_jax.text.clip import CLIPTextConfig

PIPELINES = ("StableDiffusionPipeline", "StableDiffusionUpscalePipeline")
# component folder → the class its config.json must name.
COMPONENTS = {
  "unet": "UNet2DConditionModel",
  "vae": "AutoencoderKL",
  "text_encoder": "CLIPTextModel",
}
SCHEDULES = ("scaled_linear", "linear")
PREDICTIONS = ("epsilon", "v_prediction")
DEFAULT_SCALING_FACTOR = 0.18215  # diffusers' AutoencoderKL default (SD 1.x/2.x)
PLAUSIBLE_SCALING = (0.01, 10.0)
# UNet2DConditionModel settings our SDUNet does not implement: key → accepted values.
_UNET_ONLY = dict(
  act_fn=("silu",),
  addition_embed_type=(None,),
  attention_type=("default",),
  center_input_sample=(False,),
  class_embed_type=(None,),
  class_embeddings_concat=(False,),
  conv_in_kernel=(3,),
  conv_out_kernel=(3,),
  cross_attention_norm=(None,),
  downsample_padding=(1,),
  dual_cross_attention=(False,),
  encoder_hid_dim=(None,),
  mid_block_type=("UNetMidBlock2DCrossAttn", None),
  resnet_out_scale_factor=(1.0,),
  resnet_skip_time_act=(False,),
  resnet_time_scale_shift=("default",),
  time_cond_proj_dim=(None,),
  time_embedding_act_fn=(None,),
  time_embedding_dim=(None,),
  time_embedding_type=("positional",),
  timestep_post_act=(None,),
  transformer_layers_per_block=(1,),
)


class ConversionWarning(UserWarning):
  """A doubtful input the conversion went on with (the value used is named)."""


def pipeline_class(src: str) -> str:
  """model_index.json's ``_class_name``, checked against ``PIPELINES``."""
  index = jsonfile.read_json(
    os.path.join(src, "model_index.json"), "not a diffusers pipeline folder"
  )
  found = str(index.get("_class_name", ""))
  if found not in PIPELINES:
    raise ValueError(
      f"{src}/model_index.json describes {found or 'no pipeline'!r}; supported: {PIPELINES}"
    )
  return found


def component_dir(src: str, component: str) -> str:
  """The folder of ``component`` ('unet', 'vae', 'text_encoder'): ``src/component`` of a
  pipeline folder, or ``src`` itself when it is that component's folder."""
  if not os.path.isdir(src):
    raise FileNotFoundError(f"{src}: no such folder")
  if os.path.isfile(os.path.join(src, "model_index.json")):
    pipeline_class(src)
    path = os.path.join(src, component)
    jsonfile.read_json(os.path.join(path, "config.json"), f"the pipeline has no {component}")
    return path
  config = jsonfile.read_json(
    os.path.join(src, "config.json"),
    f"expected a Stable Diffusion pipeline folder or a {COMPONENTS[component]} folder",
  )
  found = config.get("_class_name") or (config.get("architectures") or [None])[0]
  if found != COMPONENTS[component]:
    raise ValueError(
      f"{src}/config.json describes {found!r}, not a {COMPONENTS[component]} ({component})"
    )
  return src


def _per_block(cfg: dict, key: str, default: Any, n: int) -> tuple:
  value = cfg.get(key, default)
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"unet config {key}={value} has {len(value)} entries, expected {n}")
    return tuple(value)
  return (value,) * n


def unet_config(cfg: dict, dtype: str = "float32", attention_impl: str = "auto") -> SDUNetConfig:
  """diffusers UNet2DConditionModel config.json dict → ``SDUNetConfig``."""
  bad = [
    f"{k}={cfg[k]!r} (supported: {list(ok)})"
    for k, ok in _UNET_ONLY.items()
    if k in cfg and cfg[k] not in ok
  ]
  for key, ok in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
    bad += [f"{key} entry {b!r} (supported: {list(ok)})" for b in cfg.get(key, ()) if b not in ok]
  if isinstance(cfg.get("cross_attention_dim"), (list, tuple)):
    bad.append(f"per-block cross_attention_dim={cfg['cross_attention_dim']}")
  if bad:
    raise ValueError("unsupported UNet2DConditionModel settings: " + "; ".join(bad))
  n = len(cfg["block_out_channels"])
  heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
  return SDUNetConfig(
    in_channels=cfg.get("in_channels", 4),
    out_channels=cfg.get("out_channels", 4),
    block_out_channels=tuple(cfg["block_out_channels"]),
    down_block_types=tuple(cfg["down_block_types"]),
    up_block_types=tuple(cfg["up_block_types"]),
    layers_per_block=int(cfg.get("layers_per_block", 2)),
    heads=tuple(int(h) for h in _per_block({"h": heads}, "h", 8, n)),
    cross_attention_dim=int(cfg.get("cross_attention_dim", 1280)),
    use_linear_projection=bool(cfg.get("use_linear_projection", False)),
    upcast_attention=bool(cfg.get("upcast_attention", False)),
    only_cross_attention=tuple(bool(v) for v in _per_block(cfg, "only_cross_attention", False, n)),
    num_class_embeds=cfg.get("num_class_embeds"),
    norm_num_groups=int(cfg.get("norm_num_groups", 32)),
    norm_eps=float(cfg.get("norm_eps", 1e-5)),
    flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
    freq_shift=float(cfg.get("freq_shift", 0)),
    mid_block_scale_factor=float(cfg.get("mid_block_scale_factor", 1.0)),
    attention_impl=attention_impl,
    dtype=dtype,
    param_dtype=dtype,
  )


def scaling_factor(cfg: dict, where: str) -> float:
  """The VAE's latent scaling factor; absent or implausible → a warning and
  ``DEFAULT_SCALING_FACTOR``."""
  value = cfg.get("scaling_factor")
  lo, hi = PLAUSIBLE_SCALING
  if value is None:
    warnings.warn(
      f"{where}: no scaling_factor; using {DEFAULT_SCALING_FACTOR} (diffusers' default)",
      ConversionWarning,
      stacklevel=2,
    )
    return DEFAULT_SCALING_FACTOR
  if not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
    warnings.warn(
      f"{where}: scaling_factor={value!r} is implausible (expected {lo}..{hi}); using "
      f"{DEFAULT_SCALING_FACTOR}",
      ConversionWarning,
      stacklevel=2,
    )
    return DEFAULT_SCALING_FACTOR
  return float(value)


def vae_config(
  cfg: dict, dtype: str = "float32", attention_impl: str = "auto", where: str = "vae"
) -> VAEConfig:
  """diffusers AutoencoderKL config.json dict → ``VAEConfig``."""
  bad = []
  if cfg.get("act_fn", "silu") != "silu":
    bad.append(f"act_fn={cfg['act_fn']!r} (supported: 'silu')")
  for key, ok in (
    ("down_block_types", "DownEncoderBlock2D"),
    ("up_block_types", "UpDecoderBlock2D"),
  ):
    bad += [f"{key} entry {b!r} (supported: {ok!r})" for b in cfg.get(key, ()) if b != ok]
  if bad:
    raise ValueError(f"{where}: unsupported AutoencoderKL settings: " + "; ".join(bad))
  return VAEConfig(
    in_channels=cfg.get("in_channels", 3),
    out_channels=cfg.get("out_channels", 3),
    latent_channels=cfg.get("latent_channels", 4),
    block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
    layers_per_block=int(cfg.get("layers_per_block", 1)),
    norm_num_groups=int(cfg.get("norm_num_groups", 32)),
    scaling_factor=scaling_factor(cfg, where),
    use_quant_conv=bool(cfg.get("use_quant_conv", True)),
    use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
    mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
    attention_impl=attention_impl,
    dtype=dtype,
    param_dtype=dtype,
  )


def text_config(cfg: dict) -> CLIPTextConfig:
  """transformers CLIPTextModel config.json dict → ``CLIPTextConfig``."""
  return CLIPTextConfig.from_json(cfg.get("text_config", cfg))


def scheduler_settings(cfg: dict, where: str) -> dict:
  """A diffusers scheduler_config.json → our sampling parameters (betas by name and
  range, prediction type, timestep spacing), checked."""
  bad = []
  if cfg.get("beta_schedule", "linear") not in SCHEDULES:
    bad.append(f"beta_schedule={cfg.get('beta_schedule')!r} (supported: {SCHEDULES})")
  if cfg.get("trained_betas") is not None:
    bad.append("trained_betas (supported: none)")
  if cfg.get("prediction_type", "epsilon") not in PREDICTIONS:
    bad.append(f"prediction_type={cfg['prediction_type']!r} (supported: {PREDICTIONS})")
  if cfg.get("rescale_betas_zero_snr"):
    bad.append("rescale_betas_zero_snr=true (supported: false)")
  if bad:
    raise ValueError(f"{where}: unsupported scheduler settings: " + "; ".join(bad))
  return dict(
    scheduler_class=cfg.get("_class_name", ""),
    schedule=cfg.get("beta_schedule", "linear"),
    beta_start=float(cfg.get("beta_start", 0.0001)),
    beta_end=float(cfg.get("beta_end", 0.02)),
    num_train_steps=int(cfg.get("num_train_timesteps", 1000)),
    prediction=cfg.get("prediction_type", "epsilon"),
    spacing=cfg.get("timestep_spacing", "leading"),
    steps_offset=int(cfg.get("steps_offset", 0)),
    set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)),
  )


def pipeline_settings(src: str) -> dict:
  """The sampling settings of a pipeline folder: ``scheduler`` and, for the upscaler,
  ``low_res_scheduler`` and ``max_noise_level``."""
  kind = pipeline_class(src)
  index = jsonfile.read_json(os.path.join(src, "model_index.json"), "")
  out = dict(pipeline=kind)
  names = ["scheduler"] + (["low_res_scheduler"] if kind == PIPELINES[1] else [])
  for name in names:
    file = os.path.join(src, name, "scheduler_config.json")
    out[name] = scheduler_settings(jsonfile.read_json(file, f"the pipeline has no {name}"), file)
  if kind == PIPELINES[1]:
    out["max_noise_level"] = int(index.get("max_noise_level", 350))
  return out
