"""The cascade sampler: prompts → T5 → stage 1 → stage 2 (→ stage 3) → images.

Any mix of stages drives through it: Imagen's continuous-time stages and
converted DeepFloyd IF stages alike (``imagen_jax.stages``).

    cascade = Cascade.from_workdir("runs/demo")          # config + EMA params
    cascade = Cascade.from_workdir("if_I,if_II")         # converted IF stages
    out = cascade.sample(["a red circle in the top left"], jax.random.key(0),
                         num_per_prompt=4)
    out.final            # uint8 [4, R, R, 3], the last stage's images
    out.images["base"]   # every stage's images, uint8 [4, R_stage, R_stage, 3]
    out.timings          # per stage: compile and run seconds

Prompts are encoded once (the empty prompt, for classifier-free guidance,
once per cascade; or the negative prompts). Each stage samples with its own
``config.stages.NAME.sample`` settings (sampler, steps, guidance,
thresholding, ...), sampler, steps and guidance overridable per call; stage
k > 1 conditions on stage k-1's output through ``Stage.lowres_inputs`` (resized
and noise-augmented at the stage's level). Each stage's whole denoising loop is ONE jitted call
(the sampler's); under a mesh its batch is split over the data-parallel axes
(padded to a multiple of their size, cut back afterwards). Image i of the output
is sample ``i % num_per_prompt`` of prompt ``i // num_per_prompt``.

Guidance: a scale of 1 (or 'off' / 'none'; None in the config) samples the
conditional model alone (one forward pass on B rows; w = 1 is exactly that);
any other scale runs classifier-free guidance, one forward pass on the doubled
[uncond; cond] batch. Changing one guided scale to another does not
recompile; switching guidance on or off does. Sampling runs in one process
(the images come back to the host with ``np.asarray``).
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from imagen_jax import parallel
from imagen_jax import run as run_lib
from imagen_jax.diffusion import guidance as guidance_lib
from imagen_jax.stages import SampleSettings, Stage, build_stage, resize, to_uint8
from imagen_jax.text import TextEncoder

_log = logging.getLogger(__name__)

_COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)


@dataclasses.dataclass
class StageTiming:
  """Wall time of one stage in one ``sample`` call."""

  compile_s: float = 0.0  # tracing + lowering + XLA compilation
  run_s: float = 0.0  # the rest: sampling itself (and transfers)
  compiles: int = 0  # XLA compilations (0: every program was cached)
  calls: int = 0  # jitted sampler calls (batches)


@dataclasses.dataclass
class CascadeOutput:
  """What ``Cascade.sample`` returns; N = len(prompts) · num_per_prompt."""

  prompts: list  # the P prompts, in order
  num_per_prompt: int
  images: dict  # stage name → uint8 [N, R, R, 3]
  timings: dict  # stage name → StageTiming
  settings: dict  # stage name → SampleSettings

  @property
  def final(self) -> np.ndarray:
    """uint8 [N, R, R, 3], the last stage's images."""
    return self.images[list(self.images)[-1]]


class _CompileTimer:
  """Sums the durations of JAX's compile events while active (a context manager)."""

  def __enter__(self):
    self.seconds, self.count = 0.0, 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event in _COMPILE_EVENTS:
      self.seconds += duration
      self.count += event == _COMPILE_EVENTS[-1]

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


def per_stage(value: Any, names: Sequence[str], what: str) -> list:
  """Expands a per-stage override to one entry per stage.

  Args:
    value: None (config values everywhere), a scalar (every stage), a sequence
      of len(names) entries, or a mapping {stage name: value} (others None).
    names: the stage names, cascade order.
    what: the option's name, for error messages.

  Returns:
    A list of len(names) entries (None = keep the config's value).

  Raises:
    ValueError: a sequence of the wrong length, or an unknown stage name.
  """
  if value is None or isinstance(value, (int, float, str)):
    return [value] * len(names)
  if isinstance(value, Mapping):
    unknown = sorted(set(value) - set(names))
    if unknown:
      raise ValueError(f"{what}: unknown stages {unknown}; the cascade has {list(names)}")
    return [value.get(n) for n in names]
  value = list(value)
  if len(value) != len(names):
    raise ValueError(
      f"{what} has {len(value)} value{'s' * (len(value) != 1)} but the "
      f"cascade has {len(names)} stages ({', '.join(names)}): give one "
      "value per stage"
    )
  return value


def sampling_mesh(config: Any) -> tuple[Optional[jax.sharding.Mesh], tuple]:
  """(mesh, rules) for sampling on this host's devices.

  One device: no mesh. Otherwise the run's ``config.mesh`` when it fits the
  devices present, else every device on ``data`` with the 'dp' rules.
  """
  if jax.device_count() == 1:
    return None, ()
  try:
    return parallel.make_mesh(config.mesh), parallel.config_rules(config.mesh)
  except (ValueError, AttributeError, KeyError) as e:
    _log.warning(
      "config.mesh does not fit the %d devices present (%s); sampling "
      "data-parallel over all of them",
      jax.device_count(),
      e,
    )
    return parallel.make_mesh(None), parallel.logical_rules("dp")


class Cascade:
  """Text → stage 1 → ... → last stage, sharded over a mesh when one is given.

  Attributes:
    config: the cascade config.
    stage_names: stage names, generation order.
    stages: name → ``Stage`` (one object per stage: the jitted loops key on it).
    params: name → the stage's (EMA) params, placed on the mesh.
    text_encoder: the frozen ``TextEncoder``.
    text_len: L, tokens per prompt (``config.text.max_length``).
    num_shards: how many ways the batch splits (1 without a mesh).
    checkpoint_steps: name → checkpoint step (``from_workdir`` only).
  """

  def __init__(
    self,
    config: Any,
    params: Mapping[str, Any],
    text_encoder: TextEncoder,
    mesh: Optional[jax.sharding.Mesh] = None,
    rules: Optional[Sequence] = None,
    *,
    stages: Optional[Mapping[str, Stage]] = None,
  ):
    """Builds the cascade.

    Args:
      config: the cascade config (``imagen_jax.config`` layout).
      params: stage name → params (boxed or plain); every stage needs an entry.
      text_encoder: encodes prompts; its width must match the stages' text_dim.
      mesh: optional mesh; the batch splits over its data-parallel axes and
        each stage's params are placed by their logical names.
      rules: logical-axis rules for the mesh (``parallel.config_rules``).
      stages: optional prebuilt ``Stage`` objects (default: built from config).
    """
    self.config = config
    self.stage_names = tuple(config.stage_order)
    if not self.stage_names:
      raise ValueError("config.stage_order is empty: the cascade has no stages")
    missing = [n for n in self.stage_names if n not in params]
    if missing:
      raise ValueError(f"no params for stages {missing}")
    self.stages = (
      dict(stages)
      if stages is not None
      else {
        n: build_stage(config.stages[n], text_dim=text_encoder.embed_dim) for n in self.stage_names
      }
    )
    first = self.stages[self.stage_names[0]]
    if first.is_sr:
      raise ValueError(
        f"the first stage {first.name!r} is a super-resolution stage; "
        "it needs a lower-resolution stage before it"
      )
    self.text_encoder = text_encoder
    self.text_len = int(config.text.max_length)
    self.mesh = mesh
    self.rules = tuple(rules or ()) if mesh is not None else ()
    self._batch_axes, self.num_shards = parallel.batch_axes(mesh, self.rules)
    self._param_shardings = {}
    self.params = {n: self._place_params(self.stages[n], params[n]) for n in self.stage_names}
    self.checkpoint_steps = {}
    self._uncond = None
    self._lowres_fns = {}

  @classmethod
  def from_workdir(
    cls, workdir: str, *, config: Any = None, mesh: Any = "auto", rules=None
  ) -> "Cascade":
    """The cascade of a run: a training workdir or converted DeepFloyd IF stages.

    Args:
      workdir: the run's workdir (``train.py --workdir``), a converted IF
        stage folder, 'if_I,if_II', or a folder holding converted stages
        (``imagen_jax.run``).
      config: the run's config as ``run.read_config`` gives it, possibly edited
        (e.g. another text encoder); default: read it.
      mesh: "auto" (``sampling_mesh``), None (one device) or a mesh.
      rules: logical-axis rules when a mesh is given.

    Raises:
      FileNotFoundError: no config.json, or stages without a checkpoint (the
        message names them and the command that trains them).
    """
    config = run_lib.read_config(workdir) if config is None else config
    if mesh == "auto":
      mesh, rules = sampling_mesh(config)
    stages = {
      n: build_stage(config.stages[n], text_dim=config.text.get("dim")) for n in config.stage_order
    }
    params, steps, missing = {}, {}, []
    for name, stage in stages.items():
      try:
        params[name], steps[name] = run_lib.load_ema_params(workdir, stage, mesh, rules)
      except FileNotFoundError as e:
        missing.append(str(e))
    if missing:
      raise FileNotFoundError("\n".join(missing))
    encoder = TextEncoder.from_config(config.text, mesh, rules)
    cascade = cls(config, params, encoder, mesh, rules, stages=stages)
    cascade.checkpoint_steps = steps
    return cascade

  def _place_params(self, stage: Stage, params: Any) -> Any:
    params = nn.unbox(params)
    if self.mesh is None:
      return params
    if stage.name not in self._param_shardings:  # traced once per stage, not per call
      self._param_shardings[stage.name] = parallel.logical_shardings(
        stage.abstract_params(), self.mesh, self.rules
      )
    return jax.device_put(params, self._param_shardings[stage.name])

  def set_params(self, name: str, params: Any) -> None:
    """Replaces one stage's params (e.g. the EMA params during training)."""
    self.params[name] = self._place_params(self.stages[name], params)

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

  def settings(self, steps: Any = None, guidance: Any = None, sampler: Any = None) -> dict:
    """name → SampleSettings: the config's settings with per-stage overrides.

    Args:
      steps, guidance, sampler: None, one value for every stage, one per
        stage, or a mapping {stage name: value} (see ``per_stage``).

    Raises:
      ValueError: a setting no stage can run (names the stage).
    """
    steps = per_stage(steps, self.stage_names, "steps")
    guidance = per_stage(guidance, self.stage_names, "guidance")
    sampler = per_stage(sampler, self.stage_names, "sampler")
    return {
      n: self.stages[n].sample_settings(self.config.stages[n].sample, st, g, sa)
      for n, st, g, sa in zip(self.stage_names, steps, guidance, sampler)
    }

  def uncond_text(self) -> tuple[np.ndarray, np.ndarray]:
    """The empty prompt's (emb [L, D], mask [L]), encoded once per cascade."""
    if self._uncond is None:
      emb, mask = self.text_encoder.encode([""], self.text_len)
      self._uncond = (np.asarray(emb)[0], np.asarray(mask)[0])
    return self._uncond

  def _negative_text(self, negative: Any, num_prompts: int, num_per_prompt: int):
    """(emb [N, L, D], mask [N, L]) of the unconditional rows, or None for the empty prompt."""
    if negative is None or negative == "" or negative == []:
      return None
    negative = [negative] if isinstance(negative, str) else list(negative)
    if len(negative) not in (1, num_prompts):
      raise ValueError(
        f"negative prompts: give one for all prompts or one per prompt "
        f"({num_prompts}), got {len(negative)}"
      )
    if len(negative) == 1:
      negative = negative * num_prompts
    emb, mask = self.text_encoder.encode(negative, self.text_len)
    return (
      np.repeat(np.asarray(emb), num_per_prompt, axis=0),
      np.repeat(np.asarray(mask), num_per_prompt, axis=0),
    )

  def sample(
    self,
    prompts: Sequence[str],
    rng: jax.Array,
    *,
    steps: Any = None,
    guidance: Any = None,
    sampler: Any = None,
    negative_prompt: Any = None,
    num_per_prompt: int = 1,
    batch_size: Optional[int] = None,
    init_image: Optional[np.ndarray] = None,
    strength: float = 1.0,
    mask: Optional[np.ndarray] = None,
    lowres_image: Optional[np.ndarray] = None,
    start_stage: Optional[str] = None,
    progress: bool = True,
  ) -> CascadeOutput:
    """Generates num_per_prompt images per prompt through every stage.

    Args:
      prompts: P strings (longer than text_len tokens: truncated, with a warning).
      rng: PRNG key; the same key, prompts and batch size give the same images.
      steps: per-stage step counts (see ``settings``); None: the config's.
      guidance: per-stage guidance scales; None: the config's.
      sampler: per-stage sampler names; None: the config's.
      negative_prompt: one string for every prompt, or P strings: replaces the
        empty prompt as the unconditional branch of guidance.
      num_per_prompt: images per prompt.
      batch_size: images per jitted call (default: all N at once); rounded up
        to a multiple of the data-parallel size. Every call of a stage has the
        same shape, so the stage compiles once.
      init_image: uint8 [H, W, 3] (square, any size): image-to-image. The
        start stage begins from it (resized to the stage's resolution) noised
        to ``strength``: 0 returns it unchanged, 1 is text-to-image.
      strength: in [0, 1], how much of the start stage's schedule runs.
      mask: with ``init_image``, inpainting: [H', W'] (square, any size), 1 or
        > 127 = regenerate. Every stage keeps the image outside the mask (at its
        resolution, the mask resized by nearest neighbour) and repaints inside;
        an all-zero mask returns the image, an all-one mask is image-to-image.
      lowres_image: uint8 [h, w, 3]: the low-resolution input of a
        super-resolution ``start_stage`` (super-resolve a user's image).
      start_stage: the first stage to run (default: the cascade's first);
        a super-resolution stage needs ``lowres_image`` (or ``init_image``).
      progress: show a tqdm bar per stage.

    Returns:
      A ``CascadeOutput``: each stage's uint8 [N, R, R, 3] images (N = P ·
      num_per_prompt, prompt-major), per-stage timings and settings.
    """
    if isinstance(prompts, str) or not prompts:
      raise ValueError("prompts must be a non-empty list of strings")
    if num_per_prompt < 1:
      raise ValueError(f"num_per_prompt must be >= 1, got {num_per_prompt}")
    if batch_size is not None and batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    settings = self.settings(steps, guidance, sampler)
    plan = self._edit_plan(init_image, strength, mask, lowres_image, start_stage)
    emb, text_mask = self.text_encoder.encode(list(prompts), self.text_len)
    emb = np.repeat(np.asarray(emb), num_per_prompt, axis=0)
    mask = np.repeat(np.asarray(text_mask), num_per_prompt, axis=0)
    negative = self._negative_text(negative_prompt, len(prompts), num_per_prompt)
    if negative is None:
      u_emb, u_mask = self.uncond_text()
      negative = (
        np.broadcast_to(u_emb, emb.shape).astype(emb.dtype),
        np.broadcast_to(u_mask, mask.shape),
      )
    n = len(emb)
    chunk = min(batch_size or n, n)
    chunk = -(-chunk // self.num_shards) * self.num_shards
    starts = list(range(0, n, chunk))
    images, timings, prev = {}, {}, None
    if plan.lowres is not None:
      prev = [jnp.broadcast_to(plan.lowres, (chunk,) + plan.lowres.shape)] * len(starts)
    for k, name in enumerate(self.stage_names):
      if k < plan.start:
        continue
      stage, s = self.stages[name], settings[name]
      timing, outs = StageTiming(), []
      edit = plan.stage_edit(stage, chunk, first=k == plan.start)
      desc = f"stage {k + 1}/{len(self.stage_names)} {name} ({stage.resolution}px, {s.steps} steps)"
      for c, start in enumerate(tqdm(starts, desc=desc, unit="batch", disable=not progress)):
        rows = slice(start, start + chunk)
        text = {
          "text_emb": parallel.pad_rows(emb[rows], chunk),
          "text_mask": parallel.pad_rows(mask[rows], chunk),
        }
        uncond = {
          "text_emb": parallel.pad_rows(negative[0][rows], chunk),
          "text_mask": parallel.pad_rows(negative[1][rows], chunk),
        }
        key = jax.random.fold_in(jax.random.fold_in(rng, k), c)
        outs.append(
          self._run_stage(
            stage, s, text, uncond, None if prev is None else prev[c], key, timing, edit
          )
        )
      images[name] = np.concatenate(
        [np.asarray(to_uint8(x))[: min(chunk, n - start)] for x, start in zip(outs, starts)]
      )
      timings[name], prev = timing, outs
    return CascadeOutput(
      prompts=list(prompts),
      num_per_prompt=num_per_prompt,
      images=images,
      timings=timings,
      settings=settings,
    )

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
      edit: the sampler's editing inputs for this stage (``_EditPlan``).
    """
    rng_aug, rng_sample = jax.random.split(rng)
    batch = len(text["text_mask"])
    with _CompileTimer() as timer:
      start = time.perf_counter()
      if s.guided:
        text = guidance_lib.cfg_batch(text, uncond)
      args = {k: self._put(v) for k, v in text.items()}
      args["params"] = self.params[stage.name]
      if stage.is_sr:
        args.update(self._lowres_fn(stage, s)(prev, rng_aug))
      if edit:
        edit = {k: (self._put(v) if getattr(v, "ndim", 0) else v) for k, v in edit.items()}
      with self._context():
        x0 = stage.sample(args, s, batch, rng_sample, edit)
      x0 = jnp.clip(x0, -1.0, 1.0).block_until_ready()
      wall = time.perf_counter() - start
    timing.compile_s += timer.seconds
    timing.run_s += max(wall - timer.seconds, 0.0)
    timing.compiles += timer.count
    timing.calls += 1
    return x0

  def _edit_plan(self, init_image, strength, mask, lowres_image, start_stage) -> "_EditPlan":
    """Validates the editing inputs of ``sample`` (ValueError naming the problem)."""
    names = self.stage_names
    if start_stage is not None and start_stage not in names:
      raise ValueError(f"start stage {start_stage!r} is not in the cascade {list(names)}")
    start = names.index(start_stage) if start_stage is not None else 0
    if not 0.0 <= float(strength) <= 1.0:
      raise ValueError(f"strength must be in [0, 1], got {strength}")
    image = None if init_image is None else _image_float(init_image, "init image")
    keep = None
    if mask is not None:
      if image is None:
        raise ValueError("a mask needs an init image (inpainting)")
      keep = _mask_keep(mask)
    lowres = None if lowres_image is None else _image_float(lowres_image, "low-res image")
    if self.stages[names[start]].is_sr and lowres is None:
      if image is None:
        raise ValueError(
          f"stage {names[start]!r} is a super-resolution stage: starting there "
          "needs a low-resolution image"
        )
      lowres = image
    elif not self.stages[names[start]].is_sr and lowres is not None:
      raise ValueError(f"stage {names[start]!r} takes no low-resolution image")
    return _EditPlan(start=start, image=image, strength=float(strength), keep=keep, lowres=lowres)

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

  Returns None (one warning) when an earlier stage has no checkpoint yet.
  """
  order = list(config.stage_order)
  upto = order[: order.index(stage.name) + 1]
  sub = ml_collections.ConfigDict(config.to_dict())
  sub.stage_order = tuple(upto)
  stages, params = {stage.name: stage}, {}
  for name in upto[:-1]:
    stages[name] = build_stage(config.stages[name], text_dim=text_encoder.embed_dim)
    try:
      params[name], _ = run_lib.load_ema_params(workdir, stages[name], mesh, rules)
    except FileNotFoundError:
      _log.warning("no samples of stage %s yet: stage %s is not trained", stage.name, name)
      return None
  params[stage.name] = ema_params
  return Cascade(sub, params, text_encoder, mesh, rules, stages=stages)


def _image_float(image: Any, what: str) -> jax.Array:
  """uint8 [H, W, 3] (square) → float32 [H, W, 3] in [-1, 1]."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"the {what} must be an RGB image [H, W, 3], got shape {image.shape}")
  if image.shape[0] != image.shape[1]:
    raise ValueError(
      f"the {what} is {image.shape[1]}x{image.shape[0]}: stages are square, give a square image"
    )
  if image.dtype != np.uint8:
    raise ValueError(f"the {what} must be uint8, got {image.dtype}")
  return jnp.asarray(image, jnp.float32) / 127.5 - 1.0


def _mask_keep(mask: Any) -> Optional[jax.Array]:
  """[H, W] (or [H, W, 1]) mask, white = regenerate → float [H, W, 1] of 1 = regenerate.

  None for an all-white mask (image-to-image); an all-zero mask stays (nothing to do).
  """
  mask = np.asarray(mask)
  if mask.ndim == 3 and mask.shape[-1] in (1, 3):
    mask = mask.max(axis=-1)
  if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
    raise ValueError(f"the mask must be a square [H, W] image, got shape {mask.shape}")
  regen = (mask > 127) if mask.dtype == np.uint8 else (mask > 0.5)
  if regen.all():
    return None
  return jnp.asarray(regen, jnp.float32)[..., None]


@dataclasses.dataclass
class _EditPlan:
  """What ``Cascade.sample`` was asked to edit: where to start, from what."""

  start: int  # index of the first stage to run
  image: Optional[jax.Array]  # init image [H, W, 3] in [-1, 1]
  strength: float
  keep: Optional[jax.Array]  # mask [H, W, 1], 1 = regenerate (None: whole image)
  lowres: Optional[jax.Array]  # low-res input of an SR start stage [h, w, 3]

  def stage_edit(self, stage: Stage, batch: int, first: bool) -> Optional[dict]:
    """The sampler's edit inputs for one stage at batch size ``batch``.

    Inpainting acts at every stage; image-to-image (``x_init``) at the first
    stage run only: later stages refine what it made.
    """
    if self.image is None or (self.keep is None and not first):
      return None
    r = stage.resolution
    image = resize(self.image[None], r)[0] if self.image.shape[0] != r else self.image
    edit = {}
    if self.keep is not None:
      idx = jnp.arange(r) * self.keep.shape[0] // r
      mask = self.keep[idx][:, idx]
      edit.update(
        known=jnp.broadcast_to(image, (batch, r, r, 3)),
        mask=jnp.broadcast_to(mask, (batch, r, r, 1)),
      )
    if first and (self.keep is None or self.strength < 1.0):
      edit.update(x_init=jnp.broadcast_to(image, (batch, r, r, 3)), strength=self.strength)
    return edit or None


def make_grid(
  images: np.ndarray,
  cols: Optional[int] = None,
  pad: int = 2,
  borders: Optional[Sequence[tuple]] = None,
) -> np.ndarray:
  """Tiles images into one picture.

  Args:
    images: uint8 [N, R, R, 3].
    cols: images per row (default: ceil(sqrt(N))).
    pad: pixels between images (and around them).
    borders: optional RGB color per image, drawn in its padding.

  Returns:
    uint8 [rows · (R + pad) + pad, cols · (R + pad) + pad, 3].
  """
  n, r = images.shape[0], images.shape[1]
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * (r + pad) + pad, cols * (r + pad) + pad, 3), 32, np.uint8)
  for i, image in enumerate(images):
    y, x = (i // cols) * (r + pad) + pad, (i % cols) * (r + pad) + pad
    if borders is not None and pad:
      grid[y - pad : y + r + pad, x - pad : x + r + pad] = borders[i]
    grid[y : y + r, x : x + r] = image
  return grid


def _wrap(text: str, font: Any, width: int, draw: Any) -> list[str]:
  """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide."""
  lines, line = [], ""
  for word in text.split():
    trial = f"{line} {word}".strip()
    if line and draw.textlength(trial, font=font) > width:
      lines.append(line)
      line = word
    else:
      line = trial
  return lines + ([line] if line else [])


def captioned_grid(
  images: np.ndarray,
  captions: Sequence[str],
  cols: Optional[int] = None,
  min_cell: int = 128,
  pad: int = 4,
) -> np.ndarray:
  """A grid a person can read: cells upscaled (nearest) to >= min_cell px, captions under them.

  Args:
    images: uint8 [N, R, R, 3].
    captions: N strings (wrapped to the cell width).
    cols: images per row (default: ceil(sqrt(N))).
    min_cell: smallest cell size in pixels; smaller images are repeated by an
      integer factor (nearest neighbour), so pixels stay sharp.
    pad: pixels between cells.

  Returns:
    uint8 [H, W, 3].
  """
  n, r = images.shape[0], images.shape[1]
  scale = max(1, -(-min_cell // r))
  cell = r * scale
  font = ImageFont.load_default()
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  wrapped = [_wrap(c, font, cell, probe) for c in captions]
  line_h = int(font.getbbox("Ag")[3]) + 2
  text_h = line_h * max(1, max(len(w) for w in wrapped))
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  w, h = cols * (cell + pad) + pad, rows * (cell + text_h + pad) + pad
  canvas = Image.new("RGB", (w, h), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, (image, lines) in enumerate(zip(images, wrapped)):
    x = (i % cols) * (cell + pad) + pad
    y = (i // cols) * (cell + text_h + pad) + pad
    canvas.paste(Image.fromarray(np.repeat(np.repeat(image, scale, 0), scale, 1)), (x, y))
    for k, text in enumerate(lines):
      draw.text((x, y + cell + k * line_h), text, fill=(0, 0, 0), font=font)
  return np.asarray(canvas)


def save_outputs(out: CascadeOutput, out_dir: str) -> dict:
  """Writes the images of a sample call.

  Files: ``{prompt:03d}_{sample:02d}.png`` per final image, ``grid.png`` (the
  final images upscaled to >= 128 px per cell with their prompts under them,
  one row per prompt when num_per_prompt > 1), ``grid_{stage}.png`` per stage
  (plain tiles), ``prompts.json`` (the prompts, in order).

  Returns:
    {'dir', 'images': [paths], 'grid', 'prompts'}.
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i, image in enumerate(out.final):
    p, k = divmod(i, out.num_per_prompt)
    paths.append(os.path.join(out_dir, f"{p:03d}_{k:02d}.png"))
    Image.fromarray(image).save(paths[-1])
  cols = out.num_per_prompt if out.num_per_prompt > 1 else None
  for name, images in out.images.items():
    Image.fromarray(make_grid(images, cols)).save(os.path.join(out_dir, f"grid_{name}.png"))
  grid = os.path.join(out_dir, "grid.png")
  captions = [out.prompts[i // out.num_per_prompt] for i in range(len(out.final))]
  Image.fromarray(captioned_grid(out.final, captions, cols)).save(grid)
  prompts = os.path.join(out_dir, "prompts.json")
  with open(prompts, "w", encoding="utf-8") as f:
    json.dump(out.prompts, f, indent=1)
  return {"dir": out_dir, "images": paths, "grid": grid, "prompts": prompts}


def timings_table(out: CascadeOutput) -> str:
  """One line per stage: images, steps, guidance, compile and run seconds."""
  n = len(out.final)
  lines = []
  for name, t in out.timings.items():
    s = out.settings[name]
    lines.append(
      f"{name}: {n} images, {s.sampler} {s.steps} steps, guidance "
      f"{s.guidance if s.guided else 'off'}, compile {t.compile_s:.1f}s, "
      f"run {t.run_s:.1f}s ({t.calls} call{'s' * (t.calls > 1)})"
    )
  return "\n".join(lines)
