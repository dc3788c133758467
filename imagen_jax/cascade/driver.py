"""The sampling driver: prompts → text embeddings → stage 1 → ... → last stage.

(Over 400 lines: the ``Cascade`` class, whose methods (placement, batching, the per-
stage calls) share its state; edits, output and timing are already in their own
modules.)

``Cascade.sample(prompts, rng, request)`` encodes the prompts (and the empty
or negative prompts of guidance) once per distinct text encoder (T5 for IF and
Imagen stages, a CLIP tower per Stable Diffusion stage: ``text``), cuts the
N = P · num_per_prompt rows into equal batches (padded to a multiple of the
data-parallel size), and runs each stage's jitted sampling loop on every batch,
stage k > 1 conditioned on stage k-1's output. Batch c of stage k samples with the key
``fold_in(fold_in(rng, k), c)``, so a batch's images depend on its rows, not on
which call or process ran it. Editing inputs are planned by ``edits``; timings
come from ``timing``; the output and its files are in ``images``.
"""

import contextlib
import logging
import time
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from imagen_jax import parallel
from imagen_jax import run as run_lib
from imagen_jax.cascade import edits as edits_lib
from imagen_jax.cascade.images import CascadeOutput
from imagen_jax.cascade.request import Batches, SampleRequest, noise_level_configs, per_stage
from imagen_jax.cascade.residency import Residency, check_mode
from imagen_jax.cascade.text import TextRows, load_encoders, text_length
from imagen_jax.cascade.timing import CompileTimer, StageTiming
from imagen_jax.diffusion import guidance as guidance_lib
from imagen_jax.diffusion import sampling
from imagen_jax.parallel import distributed
from imagen_jax.parallel import offload as offload_lib
from imagen_jax.stages import SampleSettings, Stage, build_stage, stage_text_dim

_log = logging.getLogger(__name__)


def sampling_mesh(config: Any) -> tuple[Optional[jax.sharding.Mesh], tuple]:
  """(mesh, rules) for sampling on this process's devices.

  One device: no mesh. Otherwise the run's ``config.mesh`` when it fits the
  devices present, else every device on ``data`` with the 'dp' rules. With
  several processes each samples its own batches on its own devices, so the
  mesh holds this process's devices only.
  """
  devices = jax.local_devices()
  if len(devices) == 1:
    return None, ()
  try:
    return parallel.make_mesh(config.mesh, devices), parallel.config_rules(config.mesh)
  except (ValueError, AttributeError, KeyError) as e:
    _log.warning(
      "config.mesh does not fit the %d devices present (%s); sampling "
      "data-parallel over all of them",
      len(devices),
      e,
    )
    return parallel.make_mesh(None, devices), parallel.logical_rules("dp")


class Cascade:
  """Text → stage 1 → ... → last stage, sharded over a mesh when one is given.

  Attributes:
    config: the cascade config.
    stage_names: stage names, generation order.
    stages: name → ``Stage`` (one object per stage: the jitted loops key on it).
    params: name → the stage's (EMA) params, placed on the mesh (in host memory between
      uses when ``offload`` is "stages", and while the prompts are encoded unless "none").
    offload: which params wait in host memory between their uses (``residency``).
    text_encoders: name → the stage's frozen text encoder (T5 ``TextEncoder`` or
      ``CLIPEncoder``; one object per distinct tower, ``cascade.text``).
    text_encoder: the first stage's encoder.
    text_len: L of the first stage's encoder (``config.text.max_length`` for T5).
    num_shards: how many ways the batch splits (1 without a mesh).
    checkpoint_steps: name → checkpoint step (``from_workdir`` only).
    shared: every process of a multi-process run samples its share of each
      call's batches on its own devices (``from_workdir``, the processes all
      calling ``sample`` alike); False: this process samples them all.
  """

  def __init__(
    self,
    config: Any,
    params: Mapping[str, Any],
    text_encoder: Any,
    mesh: Optional[jax.sharding.Mesh] = None,
    rules: Optional[Sequence] = None,
    *,
    stages: Optional[Mapping[str, Stage]] = None,
    offload: str = "none",
  ):
    """Builds the cascade.

    Args:
      config: the cascade config (``imagen_jax.config`` layout).
      params: stage name → params (boxed or plain); every stage needs an entry.
      text_encoder: encodes prompts (``encode(prompts, L) -> (emb, mask)``,
        ``embed_dim``): one for every stage, or a mapping stage name → encoder
        (``cascade.text.load_encoders``); widths must match the stages' text_dim.
      mesh: optional mesh; the batch splits over its data-parallel axes and
        each stage's params are placed by their logical names.
      rules: logical-axis rules for the mesh (``parallel.config_rules``).
      stages: optional prebuilt ``Stage`` objects (default: built from config).
      offload: which params wait in host memory between their uses: "none", "text"
        (the text encoders) or "stages" (the encoders and every stage; ``residency``).
    """
    self.offload = check_mode(offload)
    self.config = config
    self.stage_names = tuple(config.stage_order)
    if not self.stage_names:
      raise ValueError("config.stage_order is empty: the cascade has no stages")
    missing = [n for n in self.stage_names if n not in params]
    if missing:
      raise ValueError(f"no params for stages {missing}")
    if isinstance(text_encoder, Mapping):
      self.text_encoders = {n: text_encoder[n] for n in self.stage_names}
    else:
      self.text_encoders = dict.fromkeys(self.stage_names, text_encoder)
    self.stages = (
      dict(stages)
      if stages is not None
      else {
        n: build_stage(config.stages[n], text_dim=self.text_encoders[n].embed_dim)
        for n in self.stage_names
      }
    )
    first = self.stages[self.stage_names[0]]
    if first.is_sr:
      raise ValueError(
        f"the first stage {first.name!r} is a super-resolution stage; "
        "it needs a lower-resolution stage before it"
      )
    lengths = {n: text_length(e, config) for n, e in self.text_encoders.items()}
    self._text = TextRows(self.text_encoders, lengths)
    self.text_encoder = self.text_encoders[self.stage_names[0]]
    self.text_len = lengths[self.stage_names[0]]
    self.mesh = mesh
    self.rules = tuple(rules or ()) if mesh is not None else ()
    self._batch_axes, self.num_shards = parallel.batch_axes(mesh, self.rules)
    self._param_shardings = {}
    self.params = {n: self._place_params(self.stages[n], params[n]) for n in self.stage_names}
    self._residency = Residency(self.offload, self.params, self.text_encoders)
    self.checkpoint_steps = {}
    self.shared = False
    self._lowres_fns = {}

  @classmethod
  def from_workdir(
    cls, workdir: str, *, config: Any = None, mesh: Any = "auto", rules=None, offload="none"
  ) -> "Cascade":
    """The cascade of a run: a training workdir or converted IF / Stable Diffusion stages.

    Args:
      workdir: the run's workdir (``train.py --workdir``), a converted IF or
        Stable Diffusion folder, a comma list ('if_I,if_II,x4', 'sd15,x4'), or a
        folder holding converted stages (``imagen_jax.run``).
      config: the run's config as ``run.read_config`` gives it, possibly edited
        (e.g. another text encoder); default: read it.
      mesh: "auto" (``sampling_mesh``), None (one device) or a mesh.
      rules: logical-axis rules when a mesh is given.
      offload: as in ``Cascade``; other than "none", each stage's params go to host
        memory as soon as they are read (never all on the devices at once).

    Raises:
      FileNotFoundError: no config.json, or stages without a checkpoint (the
        message names them and the command that trains them).
    """
    check_mode(offload)
    config = run_lib.read_config(workdir) if config is None else config
    auto = isinstance(mesh, str) and mesh == "auto"
    if auto:
      mesh, rules = sampling_mesh(config)
    stages = {
      n: build_stage(config.stages[n], text_dim=stage_text_dim(config, n))
      for n in config.stage_order
    }
    params, steps, missing = {}, {}, []
    for name, stage in stages.items():
      try:
        params[name], steps[name] = run_lib.load_ema_params(workdir, stage, mesh, rules)
        if offload != "none":
          params[name] = offload_lib.to_host(params[name])
      except FileNotFoundError as e:
        missing.append(str(e))
    if missing:
      raise FileNotFoundError("\n".join(missing))
    encoders = load_encoders(config, mesh, rules)
    cascade = cls(config, params, encoders, mesh, rules, stages=stages, offload=offload)
    cascade.checkpoint_steps = steps
    # Every process of the run loads it on its own devices: they share each call's batches.
    cascade.shared = auto and jax.process_count() > 1
    return cascade

  def _place_params(self, stage: Stage, params: Any) -> Any:
    params = nn.unbox(params)
    if self.mesh is None:
      return params
    if stage.name not in self._param_shardings:  # traced once per stage, not per call
      shardings = parallel.logical_shardings(stage.abstract_params(), self.mesh, self.rules)
      if self.offload != "none":  # kept in host memory between uses (``residency``)
        shardings = jax.tree.map(lambda s: s.with_memory_kind(offload_lib.HOST), shardings)
      self._param_shardings[stage.name] = shardings
    return jax.device_put(params, self._param_shardings[stage.name])

  def set_params(self, name: str, params: Any) -> None:
    """Replaces one stage's params (e.g. the EMA params during training)."""
    self.params[name] = self._residency.place(self._place_params(self.stages[name], params))

  def _put(self, x: Any) -> jax.Array:
    """Places a host array with its leading (batch) axis split over the mesh."""
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, parallel.batch_sharding(self.mesh, self.rules))

  def _context(self):
    """The mesh and logical-axis rules that the UNet's constraints resolve under."""
    if self.mesh is None:
      return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def _together(self):
    """On a mesh that spans processes (every one of them runs each call): the
    sampling loop is compiled everywhere before any process runs it."""
    if self.mesh is None or jax.process_count() == 1:
      return contextlib.nullcontext()
    if all(d.process_index == jax.process_index() for d in self.mesh.devices.flat):
      return contextlib.nullcontext()
    return sampling.compiled_first(lambda: distributed.barrier("sampling loop compiled"))

  def settings(
    self, steps: Any = None, guidance: Any = None, sampler: Any = None, noise_level: Any = None
  ) -> dict:
    """name → SampleSettings: the config's settings with per-stage overrides.

    Args:
      steps, guidance, sampler: None, one value for every stage, one per
        stage, or a mapping {stage name: value} (see ``per_stage``).
      noise_level: the same for the super-resolution stages' low-res noise
        level (one value: every super-resolution stage; see ``SampleRequest``).

    Raises:
      ValueError: a setting no stage can run (names the stage).
    """
    names = self.stage_names
    steps = per_stage(steps, names, "steps")
    guidance = per_stage(guidance, names, "guidance")
    sampler = per_stage(sampler, names, "sampler")
    sample_configs = noise_level_configs(
      {n: self.config.stages[n].sample for n in names},
      {n: self.stages[n].is_sr for n in names},
      noise_level,
    )
    return {
      n: self.stages[n].sample_settings(sample_configs[n], st, g, sa)
      for n, st, g, sa in zip(names, steps, guidance, sampler)
    }

  def uncond_text(self) -> tuple[np.ndarray, np.ndarray]:
    """The empty prompt's (emb [L, D], mask [L]) of the first stage's encoder (once)."""
    with self._residency.encoding():
      return self._text.uncond(self.text_encoder, self.text_len)

  def sample(
    self,
    prompts: Sequence[str],
    rng: jax.Array,
    request: Optional[SampleRequest] = None,
    *,
    progress: bool = True,
    **options: Any,
  ) -> CascadeOutput:
    """Generates ``request.num_per_prompt`` images per prompt through every stage.

    Args:
      prompts: P strings (longer than text_len tokens: truncated, with a warning).
      rng: PRNG key; the same key, prompts and batch size give the same images.
      request: what to make (``SampleRequest``); or give its fields as keywords
        (``num_per_prompt=4, steps=[32, 16]``), not both.
      progress: show a tqdm bar per stage.

    Returns:
      A ``CascadeOutput``: each stage's uint8 [N, R, R, 3] images (N = P ·
      num_per_prompt, prompt-major: image i is sample i % num_per_prompt of
      prompt i // num_per_prompt), per-stage timings and settings.

    Raises:
      ValueError: bad prompts, overrides or editing inputs (naming them).
    """
    if request is None:
      request = SampleRequest(**options)
    elif options:
      raise TypeError(f"give a SampleRequest or its fields, not both ({sorted(options)})")
    if isinstance(prompts, str) or not prompts:
      raise ValueError("prompts must be a non-empty list of strings")
    request.check()
    settings = self.settings(request.steps, request.guidance, request.sampler, request.noise_level)
    plan = edits_lib.make_plan(
      [self.stages[n] for n in self.stage_names],
      request.start_stage,
      request.init_image,
      request.strength,
      request.mask,
      request.lowres_image,
    )
    with self._residency.encoding():
      rows = self._text.rows(prompts, request.negative_prompt, request.num_per_prompt)
    n = len(prompts) * request.num_per_prompt
    batches = Batches.of(n, request.batch_size, self.num_shards, self.shared)
    images, timings = self._run_stages(rows, batches, settings, plan, rng, progress)
    return CascadeOutput(
      prompts=list(prompts),
      num_per_prompt=request.num_per_prompt,
      images=images,
      timings=timings,
      settings=settings,
    )

  def _run_stages(self, rows, batches, settings, plan, rng, progress) -> tuple[dict, dict]:
    """Every stage from the plan's start on this process's batches.

    Returns:
      (name → every batch's uint8 images, gathered from all processes;
       name → this process's timing).
    """
    images, timings, prev = {}, {}, None
    mine = batches.mine()
    if plan.lowres is not None:
      prev = dict.fromkeys(mine, jnp.broadcast_to(plan.lowres, (batches.size,) + plan.lowres.shape))
    for k, name in enumerate(self.stage_names):
      if k < plan.start:
        continue
      stage, s = self.stages[name], settings[name]
      timing, outs = StageTiming(), {}
      edit = plan.stage_edit(stage, batches.size, first=k == plan.start)
      desc = f"stage {k + 1}/{len(self.stage_names)} {name} ({stage.resolution}px, {s.steps} steps)"
      with self._residency.running(name):
        for c in tqdm(mine, desc=desc, unit="batch", disable=not progress):
          text = {f: batches.rows(v, c) for f, v in rows[name]["text"].items()}
          uncond = {f: batches.rows(v, c) for f, v in rows[name]["uncond"].items()}
          key = jax.random.fold_in(jax.random.fold_in(rng, k), c)
          before = None if prev is None else prev[c]
          outs[c] = self._run_stage(stage, s, text, uncond, before, key, timing, edit)
      images[name], timings[name], prev = batches.gather(outs, stage.image_shape), timing, outs
    return images, timings

  def _run_stage(
    self,
    stage: Stage,
    s: SampleSettings,
    text: dict,
    uncond: dict,
    prev: Optional[jax.Array],
    rng: jax.Array,
    timing: StageTiming,
    edit: Optional[dict] = None,
  ) -> jax.Array:
    """One batch through one stage: x0 float32 [b, R, R, C] in [-1, 1].

    Args:
      text, uncond: {'text_emb' [b, L, D], 'text_mask' [b, L]}: the prompts and
        the unconditional (empty or negative) prompts; b divides over the mesh.
      prev: the previous stage's x0 [b, r, r, C] (None for the first stage).
      edit: the sampler's editing inputs for this stage (``EditPlan.stage_edit``).
    """
    rng_aug, rng_sample = jax.random.split(rng)
    batch = len(text["text_mask"])
    with CompileTimer() as timer:
      start = time.perf_counter()
      if s.guided:
        text = guidance_lib.cfg_batch(text, uncond)
      args = {k: self._put(v) for k, v in text.items()}
      args["params"] = self.params[stage.name]
      if stage.is_sr:
        args.update(self._lowres_fn(stage, s)(prev, rng_aug))
      if edit:
        edit = {k: (self._put(v) if getattr(v, "ndim", 0) else v) for k, v in edit.items()}
      with self._context(), self._together():
        x0 = stage.sample(args, s, batch, rng_sample, edit)
      x0 = jnp.clip(x0, -1.0, 1.0).block_until_ready()
      timing.add_call(time.perf_counter() - start, timer)
    return x0

  def _lowres_fn(self, stage: Stage, s: SampleSettings):
    """Jitted (prev x0 [b, r, r, C], rng) → the stage's low-res model inputs.

    Doubled to the [uncond; cond] rows when the stage samples with guidance.
    Only the low-res level and whether guidance is on shape it: another
    guidance scale reuses the compiled function.
    """
    key = (stage.name, s.guided, s.aug_level)
    if key not in self._lowres_fns:

      def fn(prev, rng):
        inputs = stage.lowres_inputs(prev, s, rng)
        return guidance_lib.cfg_batch(inputs) if s.guided else inputs

      out = None
      if self.mesh is not None:
        out = parallel.batch_sharding(self.mesh, self.rules)
      self._lowres_fns[key] = jax.jit(fn, out_shardings=out)
    return self._lowres_fns[key]


def sub_cascade(
  config: Any, workdir: str, stage: Stage, ema_params: Any, text_encoder: Any, mesh=None, rules=None
) -> Optional["Cascade"]:
  """The cascade up to `stage`: earlier stages from their checkpoints, `stage` from ema_params.

  ``text_encoder``: one encoder for every stage, or stage name → its encoder
  (``cascade.text.load_encoders``). Returns None (one warning) when an earlier stage
  has no checkpoint yet.
  """
  order = list(config.stage_order)
  upto = order[: order.index(stage.name) + 1]
  sub = ml_collections.ConfigDict(config.to_dict())
  sub.stage_order = tuple(upto)
  stages, params = {stage.name: stage}, {}
  for name in upto[:-1]:
    encoder = text_encoder[name] if isinstance(text_encoder, Mapping) else text_encoder
    stages[name] = build_stage(config.stages[name], text_dim=encoder.embed_dim)
    try:
      params[name], _ = run_lib.load_ema_params(workdir, stages[name], mesh, rules)
    except FileNotFoundError:
      _log.warning("no samples of stage %s yet: stage %s is not trained", stage.name, name)
      return None
  params[stage.name] = ema_params
  return Cascade(sub, params, text_encoder, mesh, rules, stages=stages)
