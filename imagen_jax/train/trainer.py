"""The training loop: data → frozen text encoder → sharded train step → metrics, samples,
checkpoints.

(Over 400 lines: one stage's loop, its resume (checkpoint or converted init), the
data iterator and the process-level setup around it; the periodic actions are in
``periodic``.)

``train_and_evaluate(config, workdir, stages)`` trains the named stages (all of
them, in cascade order, by default). Re-running the same command resumes every
stage from its last checkpoint, with the data iterator where it was; SIGTERM
(preemption) saves a checkpoint and returns ``preempted=True``. Each stage trains
with its own frozen text encoder as the cascade samples it (``cascade.text``: T5,
or a latent stage's CLIP tower).
"""

import contextlib
import dataclasses
import functools
import logging
import os
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from imagen_jax import config as config_lib
from imagen_jax import lockfile
from imagen_jax import parallel
from imagen_jax import run as run_lib
from imagen_jax.cascade import text as text_lib
from imagen_jax.data import datasets, pipeline, streaming
from imagen_jax.eval import during_training
from imagen_jax.stages import Stage, build_stage
from imagen_jax.text import TextEncoder, words
from imagen_jax.train import checkpoint as ckpt_lib
from imagen_jax.parallel import distributed
from imagen_jax.train import optim, periodic, prefetch
from imagen_jax.train import embeddings as embeddings_lib
from imagen_jax.train import fingerprint, signals, validate
from imagen_jax.train import state as state_lib, step as step_lib

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class StageResult:
  stage: str
  step: int
  preempted: bool
  last_metrics: dict
  stop_signal: Optional[int] = None  # the signal that stopped it (preempted)


def _data_iterator(
  config, stage: Stage, per_process_batch: int, start_example: int, data_state=None
):
  # Process 0 prepares a missing (or changed) dataset while the others wait: one
  # writer. The others then find it prepared.
  if distributed.is_primary():
    datasets.prepare_from_config(config.data)
  distributed.barrier("data prepared")
  return iter(
    pipeline.train_input(
      config.data,
      resolution=stage.resolution,
      batch_size=per_process_batch,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      start_example=start_example,
      data_state=data_state,  # a streamed corpus resumes from its stored positions
    )
  )


def _restore_or_init(ckpt, stage, tx, mesh, rules, config, text_len, rng):
  """(state, shardings, data_state or None): a fresh state or the newest readable
  checkpoint (an unreadable newer one is moved aside with a warning)."""
  state, shardings = state_lib.create_train_state(rng, stage, tx, mesh, rules, text_len)
  if ckpt.latest_step() is None:
    return state, shardings, None
  abstract = run_lib.abstract_with_shardings(
    jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state), shardings
  )
  del state
  step, state, data_state, meta = ckpt.restore_latest(abstract)
  fingerprint.check_meta(meta, config, stage.name, ckpt.step_dir(step))
  if jax.process_index() == 0:
    print(f"stage {stage.name}: resumed from step {step} ({ckpt.step_dir(step)})", flush=True)
  return state, shardings, data_state


def _init_from_converted(state, stage: Stage, mesh, rules):
  """A fresh state whose params (and EMA) start from ``stage.init_from``, if set.

  ``init_from`` names a converted stage folder (``configs/deepfloyd_if.py``):
  fine-tuning starts from its weights; resuming reads the run's own checkpoints.
  """
  folder = stage.config.get("init_from")
  if not folder or int(state.step) != 0:
    return state
  params = run_lib.load_converted_params(folder, stage, mesh, rules)
  _log.warning("stage %s: initialized from the converted weights in %s", stage.name, folder)
  return state.replace(params=params, ema_params=jax.tree.map(lambda x: x.copy(), params))


def train_stage(
  config: Any,
  workdir: str,
  stage_name: str,
  text_encoder: TextEncoder,
  mesh=None,
  rules=None,
  sample_fn=None,
  stop: Optional[signals.StopSignals] = None,
  eval_fn=None,
) -> StageResult:
  """Trains one stage to its step count, resuming from its last readable checkpoint.

  ``text_encoder``: the stage's frozen ``TextEncoder`` or ``CLIPEncoder``.

  ``stop`` (installed by ``train_and_evaluate``) turns SIGTERM/SIGINT into a
  checkpoint and a clean stop; without it signals keep their default action.
  ``eval_fn(stage, ema_params, step) -> {metric: value}`` runs every
  ``train.eval_every`` steps; its values go to metrics.jsonl / TensorBoard.
  """
  with contextlib.ExitStack() as cleanup:  # progress bar, writer; checkpoints on errors
    return _train_stage(
      config,
      workdir,
      stage_name,
      text_encoder,
      mesh,
      rules,
      sample_fn,
      stop or signals.StopSignals(),
      cleanup,
      eval_fn,
    )


def _train_stage(
  config, workdir, stage_name, text_encoder, mesh, rules, sample_fn, stop, cleanup, eval_fn=None
) -> StageResult:
  """``train_stage``; ``cleanup`` (an ExitStack) closes what it registers on any exit."""
  stop.phase = "setup"
  stage = build_stage(config.stages[stage_name], text_dim=text_encoder.embed_dim)
  tc = config_lib.stage_train_config(config, stage_name)
  step_lib.check_batch(tc.batch_size, tc.get("grad_accum", 1), mesh)
  per_process = validate.per_process_batch(tc.batch_size, mesh)
  tx, lr_fn = optim.make_optimizer(tc), optim.lr_schedule(tc)
  text_len = text_lib.text_length(text_encoder, config)
  stage_rng = jax.random.fold_in(
    jax.random.PRNGKey(tc.seed), list(config.stage_order).index(stage_name)
  )
  init_rng, rng = jax.random.split(stage_rng)
  ckpt = ckpt_lib.StageCheckpointer(
    workdir, stage_name, keep=tc.keep_checkpoints, async_save=tc.async_checkpoint
  )
  if jax.process_index() == 0:
    ckpt.clean_tmp()
  cleanup.push(_close_on_error(ckpt))
  state, shardings, data_state = _restore_or_init(
    ckpt, stage, tx, mesh, rules, config, text_len, init_rng
  )
  if data_state is None:
    state = _init_from_converted(state, stage, mesh, rules)
  step = int(state.step)
  examples = data_position(data_state, step, tc.batch_size)
  it = _data_iterator(config, stage, per_process, examples, data_state)
  meta = {
    "stage": stage_name,
    "config_fingerprint": run_lib.config_fingerprint(config.stages[stage_name]),
    "fingerprint": fingerprint.resume_fields(config, stage_name),
  }
  if step >= tc.num_steps:
    ckpt.close()
    print(f"stage {stage_name}: already trained ({step}/{tc.num_steps} steps)")
    return StageResult(stage_name, step, False, {})

  cached = embeddings_lib.CaptionEmbeddings(config) if config.text.get("precomputed") else None
  uncond = _uncond(text_encoder, cached, text_len)
  step_encoder = None if cached else text_encoder  # None: the batch holds embeddings
  text_params = None if cached else text_encoder.params
  step_fn = step_lib.jit_train_step(
    stage, tx, tc, shardings, mesh, rules, lr_fn, text_encoder=step_encoder
  )
  actions = periodic.make_actions(
    workdir,
    stage,
    tc,
    ckpt,
    meta,
    stop,
    sample_fn,
    eval_fn,
    step,
    input_metrics=lambda: streaming.input_metrics(it),  # streamed corpora: skips by reason
    data_fields=lambda examples: streaming.checkpoint_fields(it, examples),
  )
  cleanup.callback(actions.writer.close)
  cleanup.callback(actions.bar.close)  # also on an error: its line ends before the message
  make_batch = functools.partial(
    _global_batch, text_encoder=text_encoder, text_len=text_len, mesh=mesh, cached=cached
  )
  # From here a signal means: save after this step, then stop.
  with stop.loop(), prefetch.DevicePrefetcher(it, make_batch) as batches:
    if jax.process_index() == 0:
      print(f"stage {stage_name}: compiling the train step", flush=True)
    step, preempted, last = _loop(
      batches,
      lambda state, batch: step_fn(state, batch, rng, uncond, text_params),
      lambda state, batch: distributed.compile_together(
        step_fn.lower, state, batch, rng, uncond, text_params, name="train step"
      ),
      state,
      step,
      examples,
      tc,
      actions,
    )
  actions.bar.close()
  ckpt.close()
  return StageResult(stage_name, step, preempted, last, stop.signum if preempted else None)


def _loop(batches, train_step, compile_step, state, step: int, examples: int, tc, actions) -> tuple:
  """Steps until ``tc.num_steps`` or an agreed stop: (step, preempted, last metrics).

  ``compile_step(state, batch)`` runs before the first step (every process
  compiles before any runs). After each step the periodic actions run in order:
  metrics, sample grids, evaluation, the stop agreement, then the checkpoint
  (forced by a stop).
  """
  last, preempted, first = {}, False, True
  while step < tc.num_steps:
    batch = next(batches)  # read, tokenized and on the devices during the last step
    if first:
      compile_step(state, batch)
      first = False
    step_start = time.perf_counter()
    state, metrics = train_step(state, batch)
    step += 1
    examples += tc.batch_size
    actions.guard.record(step, metrics["finite"])
    last = actions.log.maybe(step, metrics, step_start) or last
    actions.grids.maybe(step, state)
    actions.evaluate.maybe(step, state)
    preempted = actions.stop.maybe(step)
    actions.checkpoint.maybe(step, state, examples, force=preempted)
    if preempted:
      break
  return step, preempted, last


def _close_on_error(ckpt: ckpt_lib.StageCheckpointer):
  """An ExitStack callback: on an error, still wait for a save in flight (a good,
  earlier state) and close the manager, without hiding the error."""

  def on_exit(exc_type, exc, tb):
    del exc, tb
    if exc_type is not None:
      try:
        ckpt.close()
      except Exception as e:  # pylint: disable=broad-except
        _log.warning("while stopping: %s", e)
    return False

  return on_exit


def data_position(data_state: Optional[dict], step: int, batch_size: int) -> int:
  """Global examples a resumed run has consumed (its next example's position).

  Checkpoints store it in examples, so a resumed run may use another batch size
  or process count and still continue the same example sequence. Older
  checkpoints stored grain's batch count, which meant examples only at the
  batch size they were written with (then the step count says as much).
  """
  if not data_state:
    return 0
  if "examples" in data_state:
    return int(data_state["examples"])
  return int(data_state.get("next_index", step)) * batch_size


def _uncond(text_encoder: TextEncoder, cached, text_len: int) -> dict:
  """The empty caption as the step takes it: tokens, or its cached embedding."""
  if cached is not None:
    emb, mask = cached.lookup([""])
    return {"text_emb": emb[0], "text_mask": mask[0]}
  ids, mask = text_encoder.tokenize([""], text_len)
  return {"text_ids": ids[0], "text_mask": mask[0]}


def _global_batch(local: dict, text_encoder: TextEncoder, text_len: int, mesh, cached=None) -> dict:
  """Tokenizes this process's captions (or looks up their cached embeddings) and
  assembles global arrays.

  The frozen T5 runs inside the train step, so only token ids cross to the devices.
  """
  captions = [str(c) for c in local["caption"]]
  if cached is not None:
    emb, mask = cached.lookup(captions)
    batch = {"image": np.asarray(local["image"]), "text_emb": emb, "text_mask": mask}
  else:
    ids, mask = text_encoder.tokenize(captions, text_len)
    batch = {"image": np.asarray(local["image"]), "text_ids": ids, "text_mask": mask}
  if mesh is None:
    return jax.device_put(batch)
  return pipeline.make_global_batch(batch, mesh, parallel.batch_sharding(mesh).spec)


def train_and_evaluate(
  config: Any,
  workdir: str,
  stages: Optional[Sequence[str]] = None,
  sample_fn=None,
  stop: Optional[signals.StopSignals] = None,
) -> list[StageResult]:
  """Trains the given stages (default: all, in cascade order) of ``config``.

  Before anything is written: the settings are validated, the workdir's
  config.json and checkpoints are compared with ``config`` (fingerprint), and
  each stage's lock is taken (a second trainer is refused).

  Args:
    config: the cascade config (see ``imagen_jax.config``).
    workdir: where checkpoints, metrics and samples go.
    stages: stage names; None trains every stage in ``config.stage_order``.
    sample_fn: ``(stage, ema_params, step) -> None`` called every
      ``config.train.sample_every`` steps (default: ``periodic.make_sample_grid_fn``).
    stop: the signal handler (``signals.StopSignals``, entered); default: one
      installed for this call.

  Returns:
    One ``StageResult`` per stage trained; training stops after a preempted stage.

  Raises:
    validate.ConfigError: a bad setting or a workdir of other settings.
    lockfile.Locked: another live trainer holds a stage.
    guard_lib.NonFiniteError, ckpt_lib.SaveError: the run could not go on.
    signals.Stopped: a signal before training started.
  """
  with contextlib.ExitStack() as stack:
    stop = stop or stack.enter_context(signals.StopSignals())
    stop.phase = "setup"
    names = list(stages or config.stage_order)
    validate.check_train_settings(config, names)
    try:  # a streamed corpus: its patterns, shard count and columns
      streaming.check_config(config.data, jax.process_count())
    except ValueError as e:
      raise validate.ConfigError(str(e)) from None
    mesh = parallel.make_mesh(config.mesh)
    rules = parallel.config_rules(config.mesh)
    for name in names:
      tc = config_lib.stage_train_config(config, name)
      validate.per_process_batch(tc.batch_size, mesh)
      try:
        step_lib.check_batch(tc.batch_size, tc.get("grad_accum", 1), mesh)
      except ValueError as e:
        raise validate.ConfigError(str(e)) from None
    fingerprint.check_workdir(workdir, config, names)
    if jax.process_index() == 0:
      for name in names:
        stack.enter_context(_stage_lock(workdir, name))
      fingerprint.write_config_once(workdir, config)
    # The fitted tokenizer's folder is where the run is, not a setting: the config
    # that checkpoints and fingerprints see keeps `text.tokenizer` as written.
    encoders = text_lib.load_encoders(_fit_tokenizer(config, workdir), mesh, rules)
    if sample_fn is None and config.train.sample_every:
      sample_fn = periodic.make_sample_grid_fn(config, workdir, encoders, mesh, rules)
    eval_fn = None
    if config.train.get("eval_every"):
      eval_fn = during_training.make_eval_fn(config, workdir, encoders, mesh, rules)
    results = []
    for name in names:
      result = train_stage(
        config, workdir, name, encoders[name], mesh, rules, sample_fn, stop, eval_fn
      )
      results.append(result)
      if result.preempted:
        break
    return results


def _fit_tokenizer(config, workdir: str):
  """The config with its fitted tokenizer (``config.text.fit_tokenizer``), fitted once.

  Process 0 fits a word-level vocabulary on the training split's captions into
  ``WORKDIR/tokenizer`` the first time; a resumed run reuses the saved one, so
  token ids never change under a checkpoint. The setting itself was checked by
  ``validate.check_train_settings``.
  """
  kind = config.text.get("fit_tokenizer")
  if not kind or config.text.get("tokenizer"):
    return config
  directory = run_lib.tokenizer_dir(workdir)
  if distributed.is_primary() and not os.path.isfile(os.path.join(directory, "tokenizer.json")):
    vocab_size = int(config.text.random.vocab_size)
    start = time.perf_counter()
    size = words.fit_word_tokenizer(
      pipeline.train_captions(config.data), directory, vocab_size=vocab_size
    )
    print(
      f"word tokenizer: {size} tokens fitted on the training captions in "
      f"{time.perf_counter() - start:.1f}s -> {directory}",
      flush=True,
    )
  distributed.barrier("tokenizer fitted")
  return run_lib.with_fitted_tokenizer(config, workdir)


def _stage_lock(workdir: str, stage_name: str):
  """The lock of one stage of a workdir (a second trainer on it is refused)."""
  directory = run_lib.stage_dir(workdir, stage_name)
  os.makedirs(directory, exist_ok=True)
  return lockfile.hold(
    os.path.join(directory, ".lock"),
    what=f"training workdir {os.path.abspath(workdir)} (stage {stage_name})",
  )


def maybe_initialize_distributed() -> None:
  """Auto-detected multi-process start-up (see ``distributed.maybe_auto_initialize``)."""
  distributed.maybe_auto_initialize()
