"""Stable Diffusion (diffusers format) → imagen_jax: load, convert, read back, export.

  unet, p = load_unet("stable-diffusion-v1-5")          # a pipeline folder or its unet/
  out = unet.apply({'params': p}, x_t, t, text_emb)     # [B, h, w, 4] ε or v
  vae, pv = load_vae("stable-diffusion-v1-5")
  image = vae.apply({'params': pv}, z, method='decode')  # z unscaled (÷ scaling_factor)
  clip, pt = load_text_encoder("stable-diffusion-v1-5")
  text_emb = clip.apply({'params': pt}, ids)            # [B, 77, D]
  convert("stable-diffusion-v1-5", "converted/sd15", dtype="bfloat16")
  stage, params = load_converted("converted/sd15")      # params['unet'|'vae'|'text_encoder']
  export("converted/sd15", "sd15_again")                # a diffusers pipeline folder

Supported pipelines: ``sd_config.PIPELINES`` (SD 1.x/2.x text-to-image, the x4
upscaler). Tensors are read one at a time (``WeightsReader``: one file, a sharded
index, or the fp16 variant), converted and cast, then placed on device (the loaders)
or into the output tree (``convert``). Our parameter paths joined with dots are the
diffusers / transformers tensor names (``tensor_name``); the VAE's mid-block attention
is renamed, and CLIP names take transformers 4's ``text_model.`` prefix when the
checkpoint has it. A checkpoint tensor that no parameter claims, a parameter whose
tensor is absent, or a shape that does not fit is an error before anything is written.

The converted folder (``FORMAT``): ``config.json`` (the stage: our model configs, the
schedulers' settings, and the diffusers component configs for the export) and one
orbax checkpoint per component under ``params/``, plus the pipeline's ``tokenizer/``
copied as is (sampling needs it; a pipeline without one still converts). ``sample.py``
and the cascade sample converted folders through ``stages.LatentStage`` (``run``).
"""

import dataclasses
import json
import os
import shutil
from typing import Any, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagen_jax import jsonfile
from imagen_jax import parallel
from imagen_jax.convert import deepfloyd_if, if_export, if_weights, sd_config
from imagen_jax.models.sd_unet import SDUNet, SDUNetConfig, dummy_inputs
from imagen_jax.models.vae import AutoencoderKL, VAEConfig
from imagen_jax.safetensors_dir import WeightsReader, write_safetensors
from imagen_jax.text.clip import CLIPTextConfig, CLIPTextModel, hf_name

FORMAT = "imagen_jax/stable_diffusion"
TOKENIZER = "tokenizer"  # the pipeline's tokenizer folder, copied as is
COMPONENTS = ("unet", "vae", "text_encoder")
WEIGHTS_NAME = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
WEIGHTS_NAME["text_encoder"] = "model"
DTYPES = deepfloyd_if.DTYPES
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
_IGNORED = ("position_ids",)
_SCHEDULERS = ("scheduler", "low_res_scheduler")  # buffers some transformers checkpoints store


def build(
  component: str, cfg: dict, dtype: str = "float32", attention_impl: str = "auto", where: str = ""
) -> nn.Module:
  """Our module for a component's diffusers/transformers config.json dict."""
  if component == "unet":
    return SDUNet(sd_config.unet_config(cfg, dtype, attention_impl))
  if component == "vae":
    return AutoencoderKL(sd_config.vae_config(cfg, dtype, attention_impl, where or "vae"))
  d = jnp.dtype(dtype)
  return CLIPTextModel(sd_config.text_config(cfg), dtype=d, param_dtype=d)


def abstract_params(model: nn.Module) -> Any:
  """Boxed abstract parameters of a component module (no memory allocated)."""
  if isinstance(model, SDUNet):
    inputs = dummy_inputs(model.config, 1, 2 ** (len(model.config.block_out_channels) - 1))
    init = lambda: model.init(jax.random.PRNGKey(0), **inputs)  # noqa: E731
  elif isinstance(model, AutoencoderKL):
    x = jnp.zeros((1, model.config.downsample_factor, model.config.downsample_factor, 3))
    x = jnp.zeros(x.shape[:3] + (model.config.in_channels,))
    init = lambda: model.init(jax.random.PRNGKey(0), x)  # noqa: E731
  else:
    init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))  # noqa: E731
  return jax.eval_shape(init)["params"]


def tensor_name(component: str, path: tuple[str, ...], clip_prefix: str = "text_model.") -> str:
  """The checkpoint tensor name of our parameter ``path`` in ``component``."""
  if component == "text_encoder":
    name = hf_name(path)[0]
    return clip_prefix + name[len("text_model.") :]
  mods = list(path[:-1])
  if component == "vae" and len(mods) >= 2 and mods[-2].endswith("attentions.0"):
    mods[-1] = _VAE_ATTENTION[mods[-1]]
  return ".".join(mods + [_LEAF[path[-1]]])


def _clip_prefix(keys: set) -> str:
  return "text_model." if any(k.startswith("text_model.") for k in keys) else ""


def plan(component: str, abstract: Any, reader: WeightsReader) -> list:
  """[(our path, tensor name, our shape)] for every parameter, checked against the
  checkpoint's names and shapes (headers only) before anything is read.

  Raises:
    KeyError: tensors missing, or checkpoint tensors no parameter claims (named).
    ValueError: a shape that does not fit (tensor and both shapes named).
  """
  keys = {k for k in reader.keys() if not k.endswith(_IGNORED)}
  prefix = _clip_prefix(keys)
  items = [
    (p, tensor_name(component, p, prefix), tuple(a.shape))
    for p, a in if_weights.flat_params(abstract)
  ]
  wanted = {name for _, name, _ in items}
  for what, names in (("missing from", wanted - keys), ("unclaimed in", keys - wanted)):
    if names:
      names = sorted(names)
      raise KeyError(
        f"{len(names)} tensor(s) {what} {reader.source} ({component}): {names[:10]}"
        f"{' ...' if len(names) > 10 else ''}"
      )
  for path, name, shape in items:
    stored, expected = tuple(reader.shape(name)), if_weights.torch_shape(path, shape)
    if stored != expected and not (len(stored) == 4 and stored[:2] == expected):
      raise ValueError(
        f"{reader.source}: tensor {name!r} has shape {stored}, but {component}/config.json "
        f"implies {expected}"
      )
  return items


def _to_flax(path: tuple[str, ...], tensor: np.ndarray, shape: tuple, dtype) -> np.ndarray:
  if tensor.ndim == 4 and len(shape) == 2:  # 1×1-conv attention weights of old VAEs
    tensor = tensor[:, :, 0, 0]
  array = if_weights.to_flax(path, tensor, shape)
  if array.dtype != dtype:
    array = array.astype(np.float32).astype(dtype)
  return np.ascontiguousarray(array)


def _stream(component: str, folder: str, model: nn.Module, boxed: Any, variant: Optional[str]):
  """Yields (our path, array in the param dtype), one tensor at a time."""
  dtype = jax.tree.leaves(nn.unbox(boxed))[0].dtype
  with WeightsReader(folder, variant, WEIGHTS_NAME[component]) as reader:
    for path, name, shape in plan(component, nn.unbox(boxed), reader):
      yield path, _to_flax(path, reader.get(name), shape, dtype)


def _prepare(component: str, src: str, dtype: str, attention_impl: str, variant: Optional[str]):
  folder = sd_config.component_dir(src, component)
  cfg = jsonfile.read_json(os.path.join(folder, "config.json"), "")
  model = build(component, cfg, deepfloyd_if._check_dtype(dtype), attention_impl, folder)  # pylint: disable=protected-access
  boxed = abstract_params(model)
  with WeightsReader(folder, variant, WEIGHTS_NAME[component]) as reader:
    plan(component, nn.unbox(boxed), reader)  # fails here, before any tensor is read
  return folder, cfg, model, boxed


def _load(component, src, dtype, variant, attention_impl, mesh, rules):
  folder, _, model, boxed = _prepare(component, src, dtype, attention_impl, variant)
  shardings = dict(if_weights.flat_params(parallel.logical_shardings(boxed, mesh, rules)))
  params: dict = {}
  for path, array in _stream(component, folder, model, boxed, variant):
    deepfloyd_if._set(params, path, jax.device_put(array, shardings.get(path)))  # pylint: disable=protected-access
  return model, params


def load_unet(
  src: str,
  *,
  dtype: str = "float32",
  variant: Optional[str] = None,
  attention_impl: str = "auto",
  mesh: Any = None,
  rules: Any = None,
):
  """(``SDUNet``, params) from a pipeline folder or its ``unet/`` folder.

  Args:
    src: the pipeline folder or the UNet's own folder.
    dtype: 'float32' or 'bfloat16' (compute and storage).
    variant: None (full precision, else the fp16 variant) or e.g. 'fp16'.
    attention_impl: the attention backend (``imagen_jax.models.attention``).
    mesh, rules: optional mesh and logical-axis rules; parameters are placed sharded.
  """
  return _load("unet", src, dtype, variant, attention_impl, mesh, rules)


def load_vae(
  src: str,
  *,
  dtype: str = "float32",
  variant: Optional[str] = None,
  attention_impl: str = "auto",
  mesh: Any = None,
  rules: Any = None,
):
  """(``AutoencoderKL``, params) from a pipeline folder or its ``vae/`` folder (as
  ``load_unet``); the latent scaling factor is ``model.config.scaling_factor``."""
  return _load("vae", src, dtype, variant, attention_impl, mesh, rules)


def load_text_encoder(
  src: str,
  *,
  dtype: str = "float32",
  variant: Optional[str] = None,
  mesh: Any = None,
  rules: Any = None,
):
  """(``CLIPTextModel``, params) from a pipeline folder or its ``text_encoder/`` folder
  (as ``load_unet``). The weights are the whole tower: the penultimate layer (SD 2's
  choice, diffusers' ``clip_skip``) is the call's or module's ``skip_layers``
  (``model.clone(skip_layers=1)``)."""
  return _load("text_encoder", src, dtype, variant, "auto", mesh, rules)


def _stage(src: str, settings: dict, models: dict, configs: dict) -> dict:
  """The converted stage config: our configs, the sampling settings, diffusers' configs."""
  text: CLIPTextConfig = models["text_encoder"].config
  return dict(
    name="stable_diffusion",
    kind="latent",
    pipeline=settings["pipeline"],
    source=os.path.abspath(src),
    model=dataclasses.asdict(models["unet"].config),
    vae=dataclasses.asdict(models["vae"].config),
    text=dict(kind="clip", dim=text.tower.hidden_size, **dataclasses.asdict(text)),
    sampling={k: v for k, v in settings.items() if k != "pipeline"},
    diffusers=configs,
  )


def convert(src: str, out: str, *, dtype: str = "float32", variant: Optional[str] = None) -> str:
  """Converts a Stable Diffusion pipeline folder into ``out`` (config.json + params/).

  Every component is checked (configs, tensor names and shapes) before anything is
  written; nothing appears at ``out`` unless the whole conversion succeeded.

  Returns:
    The absolute output path.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"output {out} exists and is not an empty directory")
  if not os.path.isfile(os.path.join(src, "model_index.json")):
    raise FileNotFoundError(f"{src}/model_index.json not found: convert needs a pipeline folder")
  settings = sd_config.pipeline_settings(src)
  parts = {c: _prepare(c, src, dtype, "auto", variant) for c in COMPONENTS}
  configs = {c: p[1] for c, p in parts.items()}
  configs["model_index"] = jsonfile.read_json(os.path.join(src, "model_index.json"), "")
  with WeightsReader(parts["text_encoder"][0], variant, WEIGHTS_NAME["text_encoder"]) as reader:
    configs["text_encoder_prefix"] = _clip_prefix(reader.keys())  # written back as found
  for name in _SCHEDULERS:
    if name in settings:
      configs[name] = jsonfile.read_json(os.path.join(src, name, "scheduler_config.json"), "")
  stage = _stage(src, settings, {c: p[2] for c, p in parts.items()}, configs)
  with deepfloyd_if.staged_output(out) as tmp:
    checkpointer = ocp.StandardCheckpointer()
    for component, (folder, _, model, boxed) in parts.items():
      params: dict = {}
      for path, array in _stream(component, folder, model, boxed, variant):
        deepfloyd_if._set(params, path, array)  # pylint: disable=protected-access
      checkpointer.save(os.path.join(tmp, "params", component), params)
      checkpointer.wait_until_finished()
    copy_tokenizer(src, tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(dict(format=FORMAT, version=1, stage=stage), f, indent=2)
  return out


def copy_tokenizer(src: str, out: str) -> bool:
  """Copies ``src/tokenizer/`` (the pipeline's CLIPTokenizer files) to ``out/tokenizer/``.

  A pipeline without one converts all the same (the UNet, VAE and text tower are
  complete); sampling refuses the converted folder in one line (``run.sd_tokenizer_dir``).

  Returns:
    Whether there was a tokenizer to copy.
  """
  folder = os.path.join(src, TOKENIZER)
  if not os.path.isdir(folder):
    return False
  shutil.copytree(folder, os.path.join(out, TOKENIZER))
  return True


def read_converted_config(out_dir: str) -> ml_collections.ConfigDict:
  """The stage config of a ``convert`` output, validated (ValueError if not ours)."""
  meta = jsonfile.read_json(os.path.join(out_dir, "config.json"), "not a converted folder")
  if meta.get("format") != FORMAT or not isinstance(meta.get("stage"), dict):
    raise ValueError(f"{out_dir}/config.json: format {meta.get('format')!r}, expected {FORMAT!r}")
  return ml_collections.ConfigDict(meta["stage"])


def converted_modules(stage: ml_collections.ConfigDict) -> dict:
  """{'unet': SDUNet, 'vae': AutoencoderKL, 'text_encoder': CLIPTextModel} of a stage."""
  d = stage.to_dict()
  unet = {k: tuple(v) if isinstance(v, list) else v for k, v in d["model"].items()}
  vae = {k: tuple(v) if isinstance(v, list) else v for k, v in d["vae"].items()}
  dtype = jnp.dtype(unet["dtype"])
  clip = CLIPTextConfig.from_dict(d["text"])
  return dict(
    unet=SDUNet(SDUNetConfig(**unet)),
    vae=AutoencoderKL(VAEConfig(**vae)),
    text_encoder=CLIPTextModel(clip, dtype=dtype, param_dtype=dtype),
  )


def load_converted(out_dir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(stage config, {component: params}) of a ``convert`` output; modules from
  ``converted_modules(stage)``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  stage = read_converted_config(out_dir)
  params = {}
  for component, model in converted_modules(stage).items():
    target = nn.unbox(abstract_params(model))
    path = os.path.abspath(os.path.join(out_dir, "params", component))
    try:
      params[component] = jax.tree.map(
        jnp.asarray, ocp.StandardCheckpointer().restore(path, target)
      )
    except Exception as e:  # orbax/tensorstore raise many kinds for a damaged checkpoint
      raise ValueError(f"{path}: cannot restore ({' '.join(str(e).split())})") from None
  return stage, params


def _export_component(
  folder: str, component: str, cfg: dict, params: Any, dtype, clip_prefix: str
) -> None:
  specs = sorted(
    (tensor_name(component, p, clip_prefix), if_weights.torch_shape(p, tuple(a.shape)), p)
    for p, a in if_weights.flat_params(params)
  )
  flat = dict(if_weights.flat_params(params))

  def tensors() -> Iterator[np.ndarray]:
    for _, _, path in specs:
      array = np.asarray(jax.device_get(flat[path]))
      yield if_weights.to_torch(path, array.astype(np.float32).astype(dtype))

  os.makedirs(folder)
  write_safetensors(
    os.path.join(folder, WEIGHTS_NAME[component] + ".safetensors"),
    [(name, shape, dtype) for name, shape, _ in specs],
    tensors(),
    metadata={"format": "pt"},
  )
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)


def export(src: str, out: str, *, dtype: str = "float32") -> str:
  """Writes a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/,
  scheduler configs) from a ``convert`` output; float32 round trips bit for bit.

  Returns:
    The absolute output path.
  """
  if dtype not in if_export.OUT_DTYPES:
    raise ValueError(f"dtype must be one of {sorted(if_export.OUT_DTYPES)}, got {dtype!r}")
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"output {out} exists and is not an empty directory")
  stage, params = load_converted(src)
  return write_pipeline(stage, params, src, out, dtype)


def write_pipeline(
  stage: ml_collections.ConfigDict, params: dict, tokenizer_src: str, out: str, dtype: str
) -> str:
  """Writes ``params`` ({component: params}) as the diffusers pipeline folder ``out`` with
  the component and scheduler configs of a converted ``stage`` and the tokenizer of
  ``tokenizer_src`` (a converted folder); nothing is written unless all of it is."""
  with deepfloyd_if.staged_output(out) as tmp:
    target = np.dtype(if_export.OUT_DTYPES[dtype])
    for component in COMPONENTS:
      cfg = stage.diffusers[component].to_dict()
      prefix = stage.diffusers.get("text_encoder_prefix", "text_model.")
      _export_component(
        os.path.join(tmp, component), component, cfg, params[component], target, prefix
      )
    copy_tokenizer(tokenizer_src, tmp)
    files = {"model_index.json": "model_index"}
    files.update({f"{n}/scheduler_config.json": n for n in _SCHEDULERS if n in stage.diffusers})
    for file, key in files.items():
      os.makedirs(os.path.dirname(os.path.join(tmp, file)), exist_ok=True)
      with open(os.path.join(tmp, file), "w") as f:
        json.dump(stage.diffusers[key].to_dict(), f, indent=2, sort_keys=True)
  return out
