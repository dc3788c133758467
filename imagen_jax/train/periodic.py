"""The training loop's periodic actions: metrics, sample grids, evaluation, stop, checkpoints.

Each action is an object whose ``maybe(step, ...)`` acts when its period
says so (every ``every`` steps and at the last step), as in big_vision's and
clu's periodic actions. ``trainer`` calls them after every step, in order:

    log.maybe(step, metrics, step_start)       # metrics.jsonl / TensorBoard, progress bar
    grids.maybe(step, state)                   # STAGE/samples/step_N.png
    evaluate.maybe(step, state)                # eval scores into the metrics
    stopping = stop.maybe(step)                # a signal, agreed by every process
    checkpoint.maybe(step, state, examples, force=stopping)

``MetricWriter`` appends metrics.jsonl lines on every file system.
"""

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Optional

import jax
from etils import epath
from tqdm.auto import tqdm

from imagen_jax import cascade as cascade_lib
from imagen_jax import run as run_lib
from imagen_jax.stages import Stage
from imagen_jax.train import checkpoint as ckpt_lib
from imagen_jax.parallel import distributed
from imagen_jax.train import guard as guard_lib, signals

_log = logging.getLogger(__name__)

# Multi-process runs agree on a SIGTERM every this many steps.
AGREE_EVERY = 5


class MetricWriter:
  """metrics.jsonl + TensorBoard event files, written by process 0 only.

  metrics.jsonl is appended to: a local file is flushed after every line; a
  remote one (``gs://...``, whose objects cannot be appended to) is written
  through one open handle for the writer's life (its earlier lines copied in
  once, at opening) and appears whole when the writer closes: at the end of
  the stage, a stop or an error. Nothing is rewritten per line. TensorBoard
  events are written for local directories only (tensorboardX's own bucket
  writer needs cloud client libraries).
  """

  def __init__(self, directory: str):
    self.enabled = jax.process_index() == 0
    self._jsonl = self._tb = None
    self._remote = False
    if not self.enabled:
      return
    path = epath.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    path = path / "metrics.jsonl"
    if "://" in os.fspath(path):
      self._remote = True
      earlier = path.read_text() if path.exists() else ""
      self._jsonl = path.open("w")
      self._jsonl.write(earlier)
      _log.warning("remote workdir: metrics.jsonl only, no TensorBoard events")
      return
    self._jsonl = open(path, "a")  # pylint: disable=consider-using-with
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

      self._tb = SummaryWriter(directory)
    except ImportError:  # optional: metrics.jsonl always exists
      _log.warning("tensorboardX is not installed: no TensorBoard events")

  def write(self, step: int, metrics: dict) -> None:
    """Appends one line {'step': step, **metrics} (and the scalars to TensorBoard)."""
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    if not self._remote:
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    """Closes the files (a remote metrics.jsonl is written now); idempotent."""
    if self._jsonl:
      self._jsonl.close()
      self._jsonl = None
    if self._tb:
      self._tb.close()
      self._tb = None


class Periodic:
  """Due every ``every`` steps (0 or None: never) and at ``last_step``."""

  def __init__(self, every: Optional[int], last_step: Optional[int] = None):
    self.every, self.last_step = every, last_step

  def due(self, step: int) -> bool:
    return bool(self.every) and (step % self.every == 0 or step == self.last_step)


def last_good(ckpt: ckpt_lib.StageCheckpointer) -> Optional[str]:
  """The newest checkpoint's directory, or None."""
  step = ckpt.latest_step()
  return None if step is None else ckpt.step_dir(step)


class LogMetrics(Periodic):
  """Every ``log_every`` steps: the step's metrics, images/s since the last line, skips.

  ``maybe`` reads the non-finite guard (raising ``NonFiniteError`` after too
  many skipped steps) and returns the metrics written (None between lines).
  """

  def __init__(
    self, writer, guard, ckpt, bar, batch_size: int, every: int, last_step: int, extra=None
  ):
    super().__init__(every, last_step)
    self.writer, self.guard, self.ckpt, self.bar = writer, guard, ckpt, bar
    self.batch_size = batch_size
    self.extra = extra or dict  # () -> more metrics (the input pipeline's skip counts)
    self.restart_window()

  def restart_window(self) -> None:
    """Starts a new images/s window (after work that is not training, e.g. evaluation)."""
    self._window_start, self._window_images = time.perf_counter(), 0

  def maybe(self, step: int, metrics: dict, step_start: float) -> Optional[dict]:
    self._window_images += self.batch_size
    self.bar.update(1)
    if not self.due(step):
      return None
    skipped = self.guard.check(last_good(self.ckpt))
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    metrics.update(
      images_per_sec=self._window_images / (now - self._window_start),
      step_time=now - step_start,
      nonfinite_steps=skipped,
      **self.extra(),
    )
    self.restart_window()
    self.writer.write(step, metrics)
    self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")
    return metrics


class SampleGrids(Periodic):
  """Every ``sample_every`` steps: ``sample_fn(stage, ema_params, step)`` (the grids)."""

  def __init__(self, sample_fn: Optional[Callable], stage, every: Optional[int], last_step: int):
    super().__init__(every if sample_fn is not None else 0, last_step)
    self.sample_fn, self.stage = sample_fn, stage

  def maybe(self, step: int, state: Any) -> None:
    if self.due(step):
      self.sample_fn(self.stage, state.ema_params, step)


class Evaluate(Periodic):
  """Every ``eval_every`` steps: ``eval_fn(stage, ema_params, step)``'s scores into the metrics.

  ``on_done`` runs after it (the log restarts its images/s window: evaluation
  time is not training time).
  """

  def __init__(self, eval_fn, stage, writer, on_done, every: Optional[int], last_step: int):
    super().__init__(every if eval_fn is not None else 0, last_step)
    self.eval_fn, self.stage, self.writer, self.on_done = eval_fn, stage, writer, on_done

  def maybe(self, step: int, state: Any) -> None:
    if not self.due(step):
      return
    scores = self.eval_fn(self.stage, state.ema_params, step)
    if scores:
      self.writer.write(step, scores)
    self.on_done()


class StopAgreement(Periodic):
  """Whether to stop after this step: a signal that reached any process.

  Alone: read every step. With several processes every ``AGREE_EVERY`` steps
  (the agreement is a collective that waits for the step), so all of them save
  and stop on the same step. Called after the (slow) grids and evaluation: a
  signal that arrived during them is still followed by a checkpoint.
  """

  def __init__(self, stop: signals.StopSignals):
    super().__init__(1 if jax.process_count() == 1 else AGREE_EVERY)
    self.stop = stop

  def maybe(self, step: int) -> bool:
    return self.due(step) and distributed.any_process(self.stop.requested)


class Checkpoint(Periodic):
  """Every ``checkpoint_every`` steps, at the last step and on a stop: a checked save."""

  def __init__(
    self, ckpt, guard, stop, meta: dict, batch_size: int, every: int, last_step: int, fields=None
  ):
    super().__init__(every, last_step)
    self.ckpt, self.guard, self.stop = ckpt, guard, stop
    self.meta, self.batch_size = meta, batch_size
    # examples -> more fields of the data item (a streamed corpus's per-process positions)
    self.fields = fields or (lambda examples: {})

  def maybe(self, step: int, state: Any, examples: int, force: bool = False) -> None:
    if self.due(step) or force:
      data_state = {"examples": examples, "batch_size": self.batch_size}
      data_state |= self.fields(examples)
      self.save(step, state, data_state, stopping=force)

  def save(self, step: int, state: Any, data_state: dict, stopping: bool) -> None:
    """Saves ``state`` unless it is in a run of skipped steps; never a non-finite one.

    Raises:
      NonFiniteError: too many skipped steps, or non-finite params (not saved).
      SaveError: the save (or the previous one) failed.
    """
    guard, ckpt = self.guard, self.ckpt
    guard.check(last_good(ckpt))
    if guard.streak and not stopping:
      _log.warning(
        "stage %s: no checkpoint at step %d: its last %d steps were skipped (non-finite)",
        guard.stage_name,
        step,
        guard.streak,
      )
      return
    if not guard_lib.all_finite((state.params, state.ema_params)):
      raise guard_lib.NonFiniteError(
        f"stage {guard.stage_name}: non-finite parameters at step {step}; not saved; last "
        f"good checkpoint: {last_good(ckpt) or 'none'}"
      )
    if stopping and jax.process_index() == 0:
      print(
        f"stage {guard.stage_name}: {self.stop.signal_name}: saving checkpoint step {step}, "
        "then stopping",
        flush=True,
      )
    ckpt.save(step, state, data_state, dict(self.meta, step=step), force=True)


@dataclasses.dataclass
class Actions:
  """What the loop calls after each step (``periodic``), and what they share."""

  writer: MetricWriter
  guard: guard_lib.NonFiniteGuard
  bar: Any  # tqdm
  log: LogMetrics
  grids: SampleGrids
  evaluate: Evaluate
  stop: StopAgreement
  checkpoint: Checkpoint


def make_actions(
  workdir,
  stage,
  tc,
  ckpt,
  meta,
  stop,
  sample_fn,
  eval_fn,
  step,
  input_metrics: Optional[Callable[[], dict]] = None,
  data_fields: Optional[Callable[[int], dict]] = None,
) -> Actions:
  """The stage's metrics writer, non-finite guard, progress bar and periodic actions.

  ``input_metrics()`` adds to every metrics line; ``data_fields(examples)`` adds to
  every checkpoint's data item (both gather across processes: every process calls
  them at the same steps).
  """
  writer = MetricWriter(run_lib.stage_dir(workdir, stage.name))
  guard = guard_lib.NonFiniteGuard(stage.name, tc.get("max_nonfinite_steps", 10))
  bar = tqdm(
    total=tc.num_steps,
    initial=step,
    desc=f"train {stage.name}",
    unit="step",
    disable=jax.process_index() != 0,
  )
  end = tc.num_steps
  log = LogMetrics(writer, guard, ckpt, bar, tc.batch_size, tc.log_every, end, input_metrics)
  return Actions(
    writer=writer,
    guard=guard,
    bar=bar,
    log=log,
    grids=SampleGrids(sample_fn, stage, tc.sample_every, end),
    evaluate=Evaluate(eval_fn, stage, writer, log.restart_window, tc.get("eval_every"), end),
    stop=StopAgreement(stop),
    checkpoint=Checkpoint(
      ckpt, guard, stop, meta, tc.batch_size, tc.checkpoint_every, end, data_fields
    ),
  )


def make_sample_grid_fn(config: Any, workdir: str, text_encoder: Any, mesh=None, rules=None):
  """A ``sample_fn(stage, ema_params, step)`` writing STAGE/samples/step_N.png.

  ``text_encoder``: one ``TextEncoder`` for every stage, or stage name → its encoder.

  It samples ``config.train.sample_prompts`` through the cascade up to the
  stage being trained: earlier stages from their checkpoints, this one from the
  given EMA params. A stage whose earlier stages have no checkpoint yet gets
  no grids (one warning).
  """
  cascades = {}

  def sample_fn(stage: Stage, ema_params: Any, step: int) -> None:
    prompts = list(config.train.sample_prompts)
    if not prompts or jax.process_index() != 0:
      return
    if jax.process_count() > 1:
      # The cascade samples in one process; the EMA params span all of them.
      _log.warning(
        "no sample grids in a %d-process run (sample after training with sample.py)",
        jax.process_count(),
      )
      return
    if stage.name not in cascades:
      cascades[stage.name] = cascade_lib.sub_cascade(
        config, workdir, stage, ema_params, text_encoder, mesh, rules
      )
    cascade = cascades[stage.name]
    if cascade is None:
      return
    cascade.set_params(stage.name, ema_params)
    out = cascade.sample(prompts, jax.random.PRNGKey(config.train.seed), progress=False)
    directory = epath.Path(run_lib.stage_dir(workdir, stage.name)) / "samples"
    directory.mkdir(parents=True, exist_ok=True)
    run_lib.write_png(directory / f"step_{step:07d}.png", cascade_lib.make_grid(out.final))

  return sample_fn
