"""DeepFloyd IF folders and their configs: diffusers UNet config → our ``config.model``.

A diffusers IF pipeline folder holds ``model_index.json``, ``unet/config.json``
with its weights, ``scheduler/scheduler_config.json`` and, usually,
``text_encoder/`` + ``tokenizer/`` (T5); super-resolution pipelines also hold
``image_noising_scheduler/``. ``read_if_folder`` validates it;
``diffusers_config_to_model`` maps ``UNet2DConditionModel``'s config in IF's
configuration (ResnetDownsampleBlock2D / SimpleCrossAttn blocks) onto the
fields of ``imagen_jax.models.UNetConfig``; anything else is an error that
names what is not supported. ``IF_SCHEDULER`` is IF's released scheduler config.

Imports neither jax nor flax: tools/ (run in a PyTorch venv) import it too.
"""

import dataclasses
import os
from typing import Any, Optional

from imagen_jax import jsonfile

DOWN_BLOCKS = {"ResnetDownsampleBlock2D": False, "SimpleCrossAttnDownBlock2D": True}
UP_BLOCKS = {"ResnetUpsampleBlock2D": False, "SimpleCrossAttnUpBlock2D": True}
MID_BLOCKS = ("UNetMidBlock2DSimpleCrossAttn", None)
ACTIVATIONS = {"gelu": "gelu", "silu": "silu", "swish": "silu"}
IMAGE_CHANNELS = 3
# diffusers' Attention builds its cross-attention GroupNorm with 32 groups, and
# its attention GroupNorm (and TextTimeEmbedding's LayerNorms) with eps 1e-5.
DIFFUSERS_TEXT_NORM_GROUPS = 32
DIFFUSERS_ATTN_EPS = 1e-5
# Config values that must hold (anything else has no counterpart in our UNet).
REQUIRED = dict(
  resnet_time_scale_shift="scale_shift",
  time_embedding_type="positional",
  timestep_post_act=None,
  time_cond_proj_dim=None,
  class_embeddings_concat=False,
  conv_in_kernel=3,
  conv_out_kernel=3,
  center_input_sample=False,
  dual_cross_attention=False,
  num_class_embeds=None,
  num_attention_heads=None,
  attention_type="default",
)
# The scheduler/scheduler_config.json of IF's released pipelines (IF-I-*, IF-II-*;
# diffusers' DDPMScheduler): what a bare UNet folder samples with unless told
# otherwise, what the benchmarks and the test fixtures write. Stage II differs only in
# sample_max_value (1.0).
IF_SCHEDULER = dict(
  _class_name="DDPMScheduler",
  beta_end=0.02,
  beta_schedule="squaredcos_cap_v2",
  beta_start=0.0001,
  clip_sample=True,
  clip_sample_range=1.0,
  dynamic_thresholding_ratio=0.95,
  num_train_timesteps=1000,
  prediction_type="epsilon",
  sample_max_value=1.5,
  steps_offset=0,
  thresholding=True,
  timestep_spacing="leading",
  trained_betas=None,
  variance_type="learned_range",
)


@dataclasses.dataclass(frozen=True)
class IFFolder:
  """The parts of a diffusers DeepFloyd IF pipeline folder.

  Attributes:
    path: the folder.
    pipeline: model_index.json's ``_class_name`` (e.g. 'IFPipeline').
    unet_dir: ``<path>/unet``.
    unet_config: the parsed ``unet/config.json``.
    scheduler_config: the parsed ``scheduler/scheduler_config.json``.
    noising_config: ``image_noising_scheduler/scheduler_config.json`` or None.
    text_encoder_dir: ``<path>/text_encoder`` when it holds a config, else None.
    tokenizer_dir: ``<path>/tokenizer`` when present, else None.
  """

  path: str
  pipeline: str
  unet_dir: str
  unet_config: dict
  scheduler_config: dict
  noising_config: Optional[dict]
  text_encoder_dir: Optional[str]
  tokenizer_dir: Optional[str]

  @property
  def is_super_resolution(self) -> bool:
    return self.unet_config.get("class_embed_type") == "timestep"


def read_if_folder(path: str) -> IFFolder:
  """Reads and validates a diffusers DeepFloyd IF pipeline folder.

  Raises:
    FileNotFoundError: not a directory, or a required file is missing.
    ValueError: the files are not those of a DeepFloyd IF pipeline.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"DeepFloyd IF folder {path!r} does not exist")
  hint = "a diffusers DeepFloyd IF folder has model_index.json, unet/, scheduler/"
  index = jsonfile.read_json(os.path.join(path, "model_index.json"), hint)
  pipeline = str(index.get("_class_name", ""))
  if not pipeline.startswith("IF"):
    raise ValueError(
      f"{path}/model_index.json describes {pipeline or 'no pipeline'!r}, "
      "not a DeepFloyd IF pipeline (IFPipeline, IFSuperResolutionPipeline, ...)"
    )
  unet = jsonfile.read_json(os.path.join(path, "unet", "config.json"), hint)
  if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
    raise ValueError(
      f"{path}/unet/config.json is a {unet['_class_name']}, not a UNet2DConditionModel"
    )
  sched = jsonfile.read_json(os.path.join(path, "scheduler", "scheduler_config.json"), hint)
  noising_file = os.path.join(path, "image_noising_scheduler", "scheduler_config.json")
  noising = jsonfile.read_json(noising_file, "") if os.path.isfile(noising_file) else None
  te = os.path.join(path, "text_encoder")
  tok = os.path.join(path, "tokenizer")
  return IFFolder(
    path=os.path.abspath(path),
    pipeline=pipeline,
    unet_dir=os.path.join(path, "unet"),
    unet_config=unet,
    scheduler_config=sched,
    noising_config=noising,
    text_encoder_dir=(
      os.path.abspath(te) if os.path.isfile(os.path.join(te, "config.json")) else None
    ),
    tokenizer_dir=os.path.abspath(tok) if os.path.isdir(tok) else None,
  )


def _per_block(value: Any, n: int, name: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"unet config {name} has {len(value)} entries for {n} blocks")
    return tuple(value)
  return (value,) * n


def _check_supported(cfg: dict) -> None:
  """Raises ValueError naming every config value our UNet cannot express."""
  bad = [
    f"{k}={cfg[k]!r} (supported: {v!r})" for k, v in REQUIRED.items() if k in cfg and cfg[k] != v
  ]
  down = [b for b in cfg.get("down_block_types", ()) if b not in DOWN_BLOCKS]
  up = [b for b in cfg.get("up_block_types", ()) if b not in UP_BLOCKS]
  if down:
    bad.append(f"down_block_types {down} (supported: {sorted(DOWN_BLOCKS)})")
  if up:
    bad.append(f"up_block_types {up} (supported: {sorted(UP_BLOCKS)})")
  if cfg.get("mid_block_type", MID_BLOCKS[0]) not in MID_BLOCKS:
    bad.append(f"mid_block_type {cfg['mid_block_type']!r} (supported: {MID_BLOCKS[0]!r} or null)")
  for key, allowed in (("act_fn", ACTIVATIONS), ("time_embedding_act_fn", ACTIVATIONS)):
    if cfg.get(key) is not None and cfg[key] not in allowed:
      bad.append(f"{key}={cfg[key]!r} (supported: {sorted(allowed)})")
  for key, allowed in (
    ("class_embed_type", (None, "timestep")),
    ("addition_embed_type", (None, "text")),
    ("encoder_hid_dim_type", (None, "text_proj")),
    ("cross_attention_norm", (None, "group_norm", "layer_norm")),
  ):
    if cfg.get(key) not in allowed:
      bad.append(f"{key}={cfg[key]!r} (supported: {list(allowed)})")
  if not isinstance(cfg.get("cross_attention_dim", 1280), int):
    bad.append(f"per-block cross_attention_dim {cfg['cross_attention_dim']!r}")
  if cfg.get("norm_num_groups", 32) is None:
    bad.append("norm_num_groups=None")
  if bad:
    raise ValueError("unsupported diffusers UNet config: " + "; ".join(bad))


def _attention_kinds(cfg: dict, n: int) -> tuple[tuple[str, ...], str]:
  """Per-level attention kinds (from the down blocks) and the mid block's."""
  down = tuple(cfg["down_block_types"])
  up = tuple(cfg["up_block_types"])
  if len(up) != n or len(down) != n:
    raise ValueError(
      f"unet config has {len(down)} down and {len(up)} up blocks for {n} block_out_channels"
    )
  only = cfg.get("only_cross_attention", False)
  only = _per_block(only, n, "only_cross_attention")
  kinds = tuple(
    "none" if not DOWN_BLOCKS[b] else ("cross" if o else "self_cross") for b, o in zip(down, only)
  )
  for k, b in enumerate(up):
    if UP_BLOCKS[b] != (kinds[n - 1 - k] != "none"):
      raise ValueError(
        f"unsupported diffusers UNet config: up_blocks[{k}] is {b} but "
        f"down_blocks[{n - 1 - k}] is {down[n - 1 - k]} (our UNet uses the "
        "same attention on both sides of a level)"
      )
  mid_only = cfg.get("mid_block_only_cross_attention")
  if mid_only is None:
    mid_only = (
      cfg.get("only_cross_attention", False)
      if isinstance(cfg.get("only_cross_attention", False), bool)
      else False
    )
  return kinds, "cross" if mid_only else "self_cross"


def diffusers_config_to_model(unet_config: Any) -> dict:
  """Maps a diffusers ``UNet2DConditionModel`` config (IF style) to ``config.model``.

  Args:
    unet_config: the parsed ``unet/config.json`` (a dict) or its path.

  Returns:
    A dict of ``imagen_jax.models.UNetConfig`` fields (float32 dtypes; the
    caller sets ``dtype`` / ``param_dtype``).

  Raises:
    ValueError: block types or settings that our UNet cannot express (named).
  """
  cfg = jsonfile.read_json(unet_config, "") if isinstance(unet_config, str) else dict(unet_config)
  _check_supported(cfg)
  channels = tuple(int(c) for c in cfg["block_out_channels"])
  n = len(channels)
  kinds, mid_kind = _attention_kinds(cfg, n)
  head_dims = set(_per_block(cfg.get("attention_head_dim", 8), n, "attention_head_dim"))
  if len(head_dims) != 1:
    raise ValueError(
      f"unsupported diffusers UNet config: attention_head_dim differs per "
      f"block {cfg['attention_head_dim']!r}"
    )
  in_ch = int(cfg.get("in_channels", 4))
  if in_ch not in (IMAGE_CHANNELS, 2 * IMAGE_CHANNELS):
    raise ValueError(
      f"unsupported diffusers UNet config: in_channels={in_ch} (IF: 3 for "
      "stage I, 6 = image + upscaled low-res image for super-resolution)"
    )
  norm_eps = float(cfg.get("norm_eps", 1e-5))
  has_attn = any(k != "none" for k in kinds) or cfg.get("mid_block_type") is not None
  if has_attn and norm_eps != DIFFUSERS_ATTN_EPS:
    raise ValueError(
      f"unsupported diffusers UNet config: norm_eps={norm_eps} (diffusers' "
      f"SimpleCrossAttn blocks normalize with {DIFFUSERS_ATTN_EPS})"
    )
  cross_dim = int(cfg.get("cross_attention_dim", 1280))
  hid_dim = cfg.get("encoder_hid_dim")
  projected = hid_dim is not None  # diffusers: encoder_hid_dim alone means text_proj
  text_norm = cfg.get("cross_attention_norm")
  act = ACTIVATIONS[cfg.get("act_fn", "silu")]
  time_act = cfg.get("time_embedding_act_fn")
  return dict(
    channels=channels,
    num_res_blocks=tuple(
      int(b) for b in _per_block(cfg.get("layers_per_block", 2), n, "layers_per_block")
    ),
    attention=kinds,
    mid_block=cfg.get("mid_block_type", MID_BLOCKS[0]) is not None,
    mid_attention=mid_kind,
    in_channels=IMAGE_CHANNELS,
    out_channels=int(cfg.get("out_channels", 4)),
    head_dim=int(head_dims.pop()),
    time_embed_dim=cfg.get("time_embedding_dim") or 4 * channels[0],
    text_dim=int(hid_dim) if projected else cross_dim,
    text_proj_dim=cross_dim if projected else None,
    text_pool="attention" if cfg.get("addition_embed_type") == "text" else "none",
    text_pool_heads=int(cfg.get("addition_embed_type_num_heads", 64)),
    text_pool_projected=False,
    text_norm=text_norm,
    text_norm_groups=DIFFUSERS_TEXT_NORM_GROUPS if text_norm == "group_norm" else None,
    lowres_cond=in_ch == 2 * IMAGE_CHANNELS,
    aug_embed=cfg.get("class_embed_type") == "timestep",
    efficient=False,
    resample="resblock",
    skip_scale=1.0,
    resblock_out_scale=float(cfg.get("resnet_out_scale_factor", 1.0)),
    mid_out_scale=float(cfg.get("mid_block_scale_factor", 1.0)),
    norm_groups=int(cfg.get("norm_num_groups", 32)),
    norm_eps=norm_eps,
    act=act,
    time_act=ACTIVATIONS[time_act] if time_act else None,
    resblock_time_act=not cfg.get("resnet_skip_time_act", False),
    flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
    freq_shift=float(cfg.get("freq_shift", 0)),
    attn_bias=True,
    patch_size=1,
    dtype="float32",
    param_dtype="float32",
  )
