"""Compile a stage's train step or sampling loop for a TPU topology, ahead of time.

(Over 400 lines: the abstract train and sampling programs for a topology and the
report they fill are one unit: both share the report, its analysis and the abstract
text encoders.)

``compile_train(config, stage, topology, strategy, batch=...)`` lowers the
train step that ``train.py`` runs (``train.step.jit_train_step``, the frozen T5
inside it unless the config trains on precomputed embeddings, at the config's
dtypes) on a mesh of the topology's devices (``parallel.topology``) and runs
the TPU compiler; nothing runs. ``compile_sample`` does the same for one
stage's whole jitted sampling loop (``Stage.sample``). Each returns a
``Report`` (per chip) and the compiled executable (None when it failed).

Estimates: ``est_step_s`` is the TPU compiler's cost-model time
(``cost_analysis()['optimal_seconds']``); where the cost model gives none (it
answers a negative time for some large programs, e.g. T5-XXL's encoder) it is
the roofline of the compiler's own counts, max(flops / peak FLOP/s, bytes
accessed / HBM bandwidth) per chip (``Report.est_source``). XLA's cost analysis counts a loop
body once, whatever its trip count; the loops a program is known to run (the
``grad_accum`` microbatch scan, the sampler's steps) are multiplied back in
(``Report.loop_trips``), which also counts what surrounds the loop that many
times (the optimizer update, the sampler's set-up), so those estimates err
high. Model FLOPs come from XLA's cost analysis of the unpartitioned step with
plain einsum attention and rematerialization off (recomputation not counted).
"""

import dataclasses
import time
import types
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from imagen_jax import config as config_lib
from imagen_jax import parallel
from imagen_jax import run as run_lib
from imagen_jax.cascade import text as text_lib
from imagen_jax.diffusion import guidance as guidance_lib
from imagen_jax.models import attention
from imagen_jax.parallel import hlo, topology as topo_lib
from imagen_jax.stages import build_stage, stage_kind, stage_text_dim
from imagen_jax.text import clip_encoder
from imagen_jax.text.clip import CLIPTextConfig, CLIPTextModel
from imagen_jax.text import loading as text_loading
from imagen_jax.text.encoder import TextEncoder, resolve_dtype
from imagen_jax.text.t5 import T5Config, T5Encoder
from imagen_jax.train import optim, state as state_lib, step as step_lib


@dataclasses.dataclass
class Report:
  """One compiled program on one topology; bytes are per chip unless named total."""

  kind: str  # 'train' | 'sample'
  stage: str
  strategy: str
  topology: str
  chips: int
  mesh: dict
  batch: int
  grad_accum: int = 1
  remat: Optional[str] = None
  status: str = "ok"  # 'ok' | 'does not fit: ...' | 'error: ...'
  fits: Optional[bool] = None
  hbm_bytes: int = 0
  state_bytes: int = 0  # train: params + EMA + optimizer; sample: params
  state_bytes_total: int = 0
  argument_bytes: Optional[int] = None
  output_bytes: Optional[int] = None
  temp_bytes: Optional[int] = None
  peak_bytes: Optional[int] = None  # argument + output - aliased + temporaries
  collective_bytes: dict = dataclasses.field(default_factory=dict)
  model_flops: Optional[float] = None  # whole batch, all chips
  loop_trips: int = 1  # the known loop's trip count the cost model counted once
  est_step_s: Optional[float] = None  # compiler's estimate (cost model), not measured
  est_source: Optional[str] = None  # 'cost model' | 'roofline' (of the compiler's counts)
  est_images_per_s_per_chip: Optional[float] = None
  est_mfu: Optional[float] = None
  compile_s: Optional[float] = None
  steps: Optional[int] = None  # sample: denoising steps


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def with_overrides(config: Any, stage_name: str, remat=None, grad_accum=None, attn=None) -> Any:
  """A copy of ``config`` with the stage's remat policy / attention backend and
  ``train.grad_accum`` replaced (None: kept)."""
  cfg = config.copy_and_resolve_references()
  model = cfg.stages[stage_name].model
  with cfg.unlocked():
    if remat is not None:
      if "remat" in model:  # the key may hold a bool (older configs): retype it
        del model["remat"]
      model.remat = remat
    if attn is not None:
      model.attention_impl = attn
    if grad_accum is not None:
      cfg.train.grad_accum = int(grad_accum)
  return cfg


def abstract_text_encoder(text_config: Any, mesh, rules) -> types.SimpleNamespace:
  """The frozen T5 of ``config.text`` as the train step takes it: ``apply_fn`` and
  sharded ShapeDtypeStruct ``params`` (nothing read but a local config.json)."""
  if text_config.get("path"):
    t5 = text_loading.read_config(text_config.path)
  else:
    t5 = T5Config.from_dict(dict(text_config.random), strict=True)
  boxed, shardings = TextEncoder._setup(  # pylint: disable=protected-access
    t5, text_config.dtype, None, mesh, rules
  )
  params = jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), nn.unbox(boxed), shardings)
  dtype = resolve_dtype(text_config.dtype)
  module = T5Encoder(t5, dtype=dtype, param_dtype=dtype, mesh=mesh)
  return types.SimpleNamespace(apply_fn=module.apply, params=params, embed_dim=t5.d_model)


def abstract_clip_encoder(stage_config: Any, mesh, rules) -> types.SimpleNamespace:
  """A latent stage's frozen CLIP tower as the train step takes it: ``apply_fn``, sharded
  ShapeDtypeStruct ``params``, ``embed_dim`` and ``max_length`` (from the converted
  folder's config.json and tokenizer; no weights read)."""
  _, folder, penultimate = text_lib.encoder_key(stage_config)
  text, tokenizer_dir = run_lib.read_sd_text_config(folder)
  clip = CLIPTextConfig.from_dict(text)
  module = CLIPTextModel(clip, skip_layers=1 if penultimate else 0)
  return types.SimpleNamespace(
    apply_fn=lambda params, ids, mask: module.apply(params, ids),
    params=clip_encoder.abstract_params(module, mesh, rules),
    embed_dim=clip.tower.hidden_size,
    max_length=clip_encoder.text_length(clip, clip_encoder.load_tokenizer(tokenizer_dir)),
  )


def train_program(config: Any, stage_name: str, mesh, rules, batch: int):
  """(jitted step, abstract args for its ``lower``, state shardings, abstract state)."""
  stage_config = config.stages[stage_name]
  tokens = not config.text.get("precomputed")
  if stage_kind(stage_config) == "latent":  # its own CLIP tower, in the step
    if not tokens:
      raise ValueError(
        f"stage {stage_name}: a latent stage encodes captions with its own CLIP tower; "
        "precomputed T5 embeddings (config.text.precomputed) do not apply"
      )
    encoder = abstract_clip_encoder(stage_config, mesh, rules)
    text_dim, text_len, tokens = encoder.embed_dim, encoder.max_length, True
  else:
    encoder = abstract_text_encoder(config.text, mesh, rules) if tokens else None
    text_dim, text_len = config.text.get("dim"), int(config.text.max_length)
  stage = build_stage(stage_config, text_dim=text_dim)
  tc = config_lib.stage_train_config(config, stage_name)
  tx = optim.make_optimizer(tc)
  shardings, abstract = state_lib.state_shardings(stage, tx, mesh, rules, text_len)
  step_fn = step_lib.jit_train_step(
    stage, tx, tc, shardings, mesh, rules, optim.lr_schedule(tc), text_encoder=encoder
  )
  rep = None if mesh is None else NamedSharding(mesh, P())
  split = step_lib.batch_shardings(mesh, tokens) or dict.fromkeys(
    ("image", "text_ids" if tokens else "text_emb", "text_mask")
  )
  r, d = stage.resolution, int(text_dim or 0)
  data = {"image": _sds((batch, r, r, 3), jnp.uint8, split["image"])}
  data["text_mask"] = _sds((batch, text_len), jnp.bool_, split["text_mask"])
  if tokens:
    data["text_ids"] = _sds((batch, text_len), jnp.int32, split["text_ids"])
    uncond = {"text_ids": _sds((text_len,), jnp.int32, rep)}
  else:
    data["text_emb"] = _sds((batch, text_len, d), jnp.float32, split["text_emb"])
    uncond = {"text_emb": _sds((text_len, d), jnp.float32, rep)}
  uncond["text_mask"] = _sds((text_len,), jnp.bool_, rep)
  rng = _sds((2,), jnp.uint32, rep)
  state = (
    abstract
    if mesh is None
    else jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), abstract, shardings)
  )
  args = (state, data, rng, uncond, None if encoder is None else encoder.params)
  return step_fn, args, shardings, abstract


def model_flops(config: Any, stage_name: str, batch: int) -> Optional[float]:
  """FLOPs of one train step of the whole batch (XLA's cost analysis, one device, no
  remat, einsum attention so no loop hides FLOPs); T5's forward included."""
  cfg = with_overrides(config, stage_name, remat="none", grad_accum=1, attn="xla")
  step_fn, args, _, _ = train_program(cfg, stage_name, None, (), batch)
  cost = step_fn.lower(*args).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def _compile(report: Report, lower_fn) -> Any:
  """Lowers and compiles; a failure becomes the report's status (never raises)."""
  t0 = time.perf_counter()
  try:
    with attention.target_platform("tpu"):
      lowered = lower_fn()
    compiled = lowered.compile()
  except Exception as err:  # pylint: disable=broad-except
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    if hlo.is_oom(err):
      report.status, report.fits = f"does not fit: the TPU compiler says: {first}", False
    else:
      report.status = f"error at compile: {first}"
    return None
  report.compile_s = time.perf_counter() - t0
  return compiled


def analyze(report: Report, compiled: Any, images: int) -> Report:
  """Fills the report's memory, fit, collective and estimated-time fields.

  ``images``: images one execution makes or trains on (all chips together).
  """
  mem = hlo.memory(compiled)
  if mem is not None:
    report.argument_bytes, report.output_bytes = mem["argument"], mem["output"]
    report.temp_bytes, report.peak_bytes = mem["temp"], mem["peak"]
    report.fits = report.peak_bytes <= report.hbm_bytes
    if not report.fits:
      over = (report.peak_bytes - report.hbm_bytes) / 2**30
      report.status = (
        f"does not fit: needs {report.peak_bytes / 2**30:.1f} GiB per chip, "
        f"{over:.1f} GiB over the {report.hbm_bytes / 2**30:.0f} GiB of HBM"
      )
  report.collective_bytes = hlo.collective_bytes(compiled)
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  seconds, report.est_source = estimated_seconds(cost, topo_lib.parse(report.topology).chip)
  if seconds > 0:
    report.est_step_s = seconds * report.loop_trips
    report.est_images_per_s_per_chip = images / report.est_step_s / report.chips
    if report.model_flops:
      peak = topo_lib.parse(report.topology).chip.peak_bf16_flops
      report.est_mfu = report.model_flops / (report.est_step_s * report.chips * peak)
  return report


def estimated_seconds(cost: Optional[dict], chip: topo_lib.Chip) -> tuple[float, Optional[str]]:
  """(seconds, source) of one execution per chip from a compiled cost analysis: its
  ``optimal_seconds`` when positive, else the roofline of its ``flops`` and ``bytes
  accessed`` on ``chip``; (0.0, None) when it has neither."""
  if not cost:
    return 0.0, None
  seconds = float(cost.get("optimal_seconds", 0.0))
  if seconds > 0:
    return seconds, "cost model"
  flops, moved = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  if flops <= 0 and moved <= 0:
    return 0.0, None
  return max(flops / chip.peak_bf16_flops, moved / chip.hbm_bytes_per_s), "roofline"


def dp_size(mesh_shape: dict) -> int:
  """Chips the batch is split over (the mesh's batch axes, ``parallel.BATCH_MESH_AXES``)."""
  return int(np.prod([int(mesh_shape.get(a, 1)) for a in parallel.BATCH_MESH_AXES]))


def compile_train(
  config: Any,
  stage_name: str,
  topology: topo_lib.Topology,
  devices: list,
  mesh_shape: dict,
  rules,
  *,
  strategy: str,
  batch: int,
  grad_accum: int = 1,
  remat: Optional[str] = None,
  flops: Optional[float] = None,
  attn: Optional[str] = None,
) -> tuple[Report, Any]:
  """Compiles the stage's train step for the topology (bad input was checked by
  ``topo_lib.check_mesh`` / ``check_batch`` before); never raises for the program.
  ``attn``: the stage's ``model.attention_impl`` for this compile (None: the config's)."""
  report = Report(
    kind="train",
    stage=stage_name,
    strategy=strategy,
    topology=topology.name,
    chips=topology.chips,
    mesh=dict(mesh_shape),
    batch=batch,
    grad_accum=grad_accum,
    remat=remat,
    hbm_bytes=topology.chip.hbm_bytes,
    model_flops=flops,
    loop_trips=grad_accum,
  )
  cfg = with_overrides(config, stage_name, remat=remat, grad_accum=grad_accum, attn=attn)
  mesh = topo_lib.make_mesh(mesh_shape, devices)
  with attention.target_platform("tpu"):
    step_fn, args, shardings, abstract = train_program(cfg, stage_name, mesh, rules, batch)
  report.state_bytes = hlo.tree_bytes(abstract, shardings)
  report.state_bytes_total = hlo.tree_bytes(abstract)
  compiled = _compile(report, lambda: step_fn.lower(*args))
  if compiled is not None:
    analyze(report, compiled, batch)
  return report, compiled


def sample_program(config: Any, stage_name: str, mesh, rules, batch: int, steps=None):
  """(jitted sampling of one image batch through the stage, abstract args, params'
  shardings, abstract params): the cascade's per-stage call (guidance doubling,
  low-res inputs from the previous stage's x0, ``Stage.sample``'s whole loop)."""
  stage_config = config.stages[stage_name]
  stage = build_stage(stage_config, text_dim=stage_text_dim(config, stage_name))
  settings = stage.sample_settings(stage_config.sample, steps=steps)
  if stage_kind(stage_config) == "latent":  # its own CLIP tower's width and length
    clip = abstract_clip_encoder(stage_config, None, ())
    text_len, d, emb_dtype = int(clip.max_length), int(clip.embed_dim), jnp.float32
  else:
    text_len, d = int(config.text.max_length), int(config.text.dim)
    emb_dtype = resolve_dtype(config.text.dtype)
  boxed = stage.abstract_params(text_len)
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = nn.unbox(boxed)
  split = parallel.batch_sharding(mesh, rules)
  rep = NamedSharding(mesh, P())
  text = {
    "text_emb": _sds((batch, text_len, d), emb_dtype, split),
    "text_mask": _sds((batch, text_len), jnp.bool_, split),
  }
  prev = None
  if stage.is_sr:
    r = int(stage.lowres_resolution)
    prev = _sds((batch, r, r, stage.image_shape[-1]), jnp.float32, split)
  params = jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), abstract, shardings)

  def run(params, text, uncond, prev, rng):
    rng_aug, rng_sample = jax.random.split(rng)
    args = guidance_lib.cfg_batch(text, uncond) if settings.guided else dict(text)
    args["params"] = params
    if stage.is_sr:
      low = stage.lowres_inputs(prev, settings, rng_aug)
      args.update(guidance_lib.cfg_batch(low) if settings.guided else low)
    return stage.sample(args, settings, batch, rng_sample)

  def lower(*a):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jax.jit(run).lower(*a)

  rng = _sds((2,), jnp.uint32, rep)
  return lower, (params, text, dict(text), prev, rng), settings, shardings, abstract


def compile_sample(
  config: Any,
  stage_name: str,
  topology: topo_lib.Topology,
  devices: list,
  *,
  batch: int,
  strategy: str = "dp",
  steps: Optional[int] = None,
) -> tuple[Report, Any]:
  """Compiles one stage's sampling of ``batch`` images for the topology (params
  sharded by ``strategy``'s rules, the batch over all chips)."""
  mesh_shape = topo_lib.strategy_mesh(strategy, topology.chips)
  rules = parallel.logical_rules(strategy)
  mesh = topo_lib.make_mesh(mesh_shape, devices)
  with attention.target_platform("tpu"):
    lower, args, settings, shardings, abstract = sample_program(
      config, stage_name, mesh, rules, batch, steps
    )
  return _compile_inference(
    "sample", stage_name, strategy, topology, mesh_shape, batch, lambda: lower(*args),
    (abstract, shardings), steps=settings.steps,
  )  # fmt: skip


def _compile_inference(
  kind, name, strategy, topology, mesh_shape, batch, lower, state, steps=None
) -> tuple[Report, Any]:
  """The report of a sampling or text-encoding program (``state``: its abstract params
  and their shardings); compiled and analyzed for ``batch`` images (None if it failed)."""
  report = Report(
    kind=kind,
    stage=name,
    strategy=strategy,
    topology=topology.name,
    chips=topology.chips,
    mesh=mesh_shape,
    batch=batch,
    hbm_bytes=topology.chip.hbm_bytes,
    loop_trips=steps or 1,
    steps=steps,
    state_bytes=hlo.tree_bytes(*state),
    state_bytes_total=hlo.tree_bytes(state[0]),
  )
  compiled = _compile(report, lower)
  if compiled is not None:
    analyze(report, compiled, batch)
  return report, compiled


def text_encoders(config: Any) -> dict:
  """Encoder name → the stages it encodes for: ``'t5'`` (``config.text``) for the
  pixel stages, ``'STAGE/clip'`` for each latent stage's own CLIP tower."""
  names: dict = {}
  for name in config.stage_order:
    key = f"{name}/clip" if stage_kind(config.stages[name]) == "latent" else "t5"
    names.setdefault(key, []).append(name)
  return names


def compile_text(
  config: Any,
  encoder: str,
  topology: topo_lib.Topology,
  devices: list,
  *,
  batch: int,
  strategy: str = "dp",
) -> tuple[Report, Any]:
  """Compiles one prompt batch through a frozen text encoder (a key of
  ``text_encoders``): ids [batch, L] → embeddings, params sharded by ``strategy``."""
  mesh_shape = topo_lib.strategy_mesh(strategy, topology.chips)
  rules = parallel.logical_rules(strategy)
  mesh = topo_lib.make_mesh(mesh_shape, devices)
  if encoder == "t5":
    enc = abstract_text_encoder(config.text, mesh, rules)
    length = int(config.text.max_length)
  else:
    enc = abstract_clip_encoder(config.stages[encoder.split("/")[0]], mesh, rules)
    length = int(enc.max_length)
  split = parallel.batch_sharding(mesh, rules)
  ids = _sds((batch, length), jnp.int32, split)
  mask = _sds((batch, length), jnp.bool_, split)

  def lower():
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jax.jit(enc.apply_fn).lower(enc.params, ids, mask)

  state = (enc.params, jax.tree.map(lambda a: a.sharding, enc.params))
  return _compile_inference("text", encoder, strategy, topology, mesh_shape, batch, lower, state)


def check_config(config: Any, stage_name: str, topology: topo_lib.Topology) -> tuple:
  """(the stage's train config, the mesh on the topology); TopologyError (one line)
  for a mesh that does not divide the chips or a batch that does not divide dp × K."""
  tc = config_lib.stage_train_config(config, stage_name)
  mesh_shape = topo_lib.config_mesh(config.mesh, topology)
  topo_lib.check_batch(int(tc.batch_size), dp_size(mesh_shape), int(tc.get("grad_accum", 1)))
  return tc, mesh_shape


def compile_config(
  config: Any, stage_name: str, topology: topo_lib.Topology, devices: list
) -> tuple[Report, Any]:
  """The stage's train step as ``train.py`` would run it on the topology: the
  config's mesh (``config.mesh``), rules, batch, grad_accum and remat."""
  tc, mesh_shape = check_config(config, stage_name, topology)
  k = int(tc.get("grad_accum", 1))
  return compile_train(
    config,
    stage_name,
    topology,
    devices,
    mesh_shape,
    parallel.config_rules(config.mesh),
    strategy=str(config.mesh.strategy),
    batch=int(tc.batch_size),
    grad_accum=k,
  )


def save_compiled(compiled: Any, path: str) -> None:
  """Writes the executable (``jax.experimental.serialize_executable``: bytes and
  the argument/result trees, pickled) for a job on that topology to load with
  ``serialize_executable.deserialize_and_load``."""
  import pickle  # pylint: disable=import-outside-toplevel
  from jax.experimental import serialize_executable  # pylint: disable=import-outside-toplevel

  payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  with open(path, "wb") as f:
    pickle.dump({"executable": payload, "in_tree": in_tree, "out_tree": out_tree}, f)


def one_line(report: Report) -> str:
  """``stage NAME: compiled for TOPO (...): peak ... per chip, fits; est ...``."""
  mesh = "×".join(f"{k} {v}" for k, v in report.mesh.items())
  head = f"stage {report.stage}: {report.kind} step for {report.topology} "
  head += f"({report.chips} chips, mesh {mesh})"
  if report.peak_bytes is None:
    return f"{head}: {report.status}"
  fit = "fits" if report.fits else report.status
  est = (
    ""
    if report.est_step_s is None
    else f"; est. step {report.est_step_s:.3f} s (compiler's estimate, {report.est_source})"
  )
  return (
    f"{head}: peak {report.peak_bytes / 2**30:.2f} GiB of {report.hbm_bytes / 2**30:.0f} GiB "
    f"HBM per chip, {fit}{est}"
  )
