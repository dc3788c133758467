"""Metrics during training: ``make_eval_fn`` for the trainer's ``train.eval_every``.

Every ``config.train.eval_every`` steps the trainer calls
``eval_fn(stage, ema_params, step)``: it samples a fixed prompt set through the
cascade up to the stage being trained (earlier stages from their checkpoints,
this one from the given EMA params; the trainer's sample grids do the same)
with a fixed key, and returns the configured metrics as floats for
``metrics.jsonl`` / TensorBoard:

  config.train.eval_metrics   ('shapes',) | ('clip',) | ('fid',) or several
  config.train.eval_prompts   the prompts; () = the shapes test captions
  config.train.eval_num       how many (prompts cycled; shapes captions drawn)
  config.train.eval_clip      a Hugging Face CLIP folder (metric 'clip')
  config.train.eval_inception FID InceptionV3 weights (metric 'fid')
  config.train.eval_reference FID reference statistics (metric 'fid'); a
                              stage whose resolution differs gets no FID
                              (one warning), the statistics being refused

Keys returned: ``eval/shapes_accuracy`` (and ``_single_object``,
``_two_object`` where present), ``eval/clip_score``, ``eval/fid``,
``eval/seconds``.
"""

import logging
import time
from typing import Any, Callable

import jax

from imagen_jax import cascade as cascade_lib
from imagen_jax.eval import fid as fid_lib
from imagen_jax.eval import metrics, shapes
from imagen_jax.stages import Stage

_log = logging.getLogger(__name__)


def eval_prompts(config: Any) -> list[str]:
  """The fixed prompts: train.eval_prompts cycled to eval_num, else shapes test captions."""
  tc = config.train
  num = int(tc.get("eval_num", 64))
  if tc.get("eval_prompts"):
    return fid_lib.cycle(list(tc.eval_prompts), num)
  holdout, data_seed = shapes.data_settings(config)
  return shapes.split_captions("test", num, holdout, data_seed)


def _shapes_metrics(images, prompts, holdout) -> dict[str, float]:
  results = [shapes.score_image(image, p) for image, p in zip(images, prompts)]
  summary = shapes.summarize(prompts, results, holdout)
  out = {"eval/shapes_accuracy": summary["accuracy"]}
  for group in ("single_object", "two_object"):
    if summary[group]["accuracy"] is not None:
      out[f"eval/shapes_{group}"] = summary[group]["accuracy"]
  return out


def make_eval_fn(
  config: Any, workdir: str, text_encoder: Any, mesh=None, rules=None
) -> Callable[[Stage, Any, int], dict[str, float]]:
  """An ``eval_fn(stage, ema_params, step) -> {name: float}`` (see the module doc).

  The metric networks load once, on the first call; each stage's cascade is
  built once and gets the new EMA params on every call (no recompilation).
  Other processes than 0 return {} at once.

  Raises:
    ValueError: an unknown metric, or one whose files are not configured.
  """
  tc = config.train
  names = tuple(tc.get("eval_metrics", ("shapes",)))
  unknown = sorted(set(names) - {"shapes", "clip", "fid"})
  if unknown:
    raise ValueError(f"config.train.eval_metrics has unknown metrics {unknown}")
  if "clip" in names and not tc.get("eval_clip"):
    raise ValueError("eval metric 'clip' needs config.train.eval_clip (a CLIP folder)")
  if "fid" in names and not (tc.get("eval_inception") and tc.get("eval_reference")):
    raise ValueError("eval metric 'fid' needs config.train.eval_inception and eval_reference")
  prompts = eval_prompts(config)
  holdout, _ = shapes.data_settings(config)
  cascades, nets, warned = {}, {}, set()
  batch = int(tc.get("eval_batch_size", 0)) or None

  def networks():
    if not nets:
      if "fid" in names:
        nets["reference"] = metrics.FeatureStats.load(tc.eval_reference)
        nets["inception"] = fid_lib.InceptionFeatures(
          tc.eval_inception, mesh=mesh, rules=rules, batch_size=batch or len(prompts)
        )
      if "clip" in names:
        from imagen_jax.eval import clip as clip_lib  # pylint: disable=g-import-not-at-top

        nets["clip"] = clip_lib.CLIPScorer(
          tc.eval_clip, mesh=mesh, rules=rules, batch_size=batch or len(prompts)
        )
    return nets

  def eval_fn(stage: Stage, ema_params: Any, step: int) -> dict[str, float]:
    if jax.process_index() != 0 or not names:
      return {}
    start = time.perf_counter()
    if stage.name not in cascades:
      cascades[stage.name] = cascade_lib.sub_cascade(
        config, workdir, stage, ema_params, text_encoder, mesh, rules
      )
    cascade = cascades[stage.name]
    if cascade is None:
      return {}
    cascade.set_params(stage.name, ema_params)
    images = cascade.sample(
      prompts, jax.random.PRNGKey(tc.seed), batch_size=batch, progress=False
    ).final
    out: dict[str, float] = {}
    if "shapes" in names:
      out.update(_shapes_metrics(images, prompts, holdout))
    n = networks()
    if "clip" in names:
      out["eval/clip_score"] = float(n["clip"].scores(images, prompts).mean())
    if "fid" in names:
      stats = n["inception"].stats(images, source=f"{workdir} {stage.name} step {step}")
      try:
        out["eval/fid"] = metrics.fid(stats, n["reference"])
      except ValueError as e:
        if stage.name not in warned:
          warned.add(stage.name)
          _log.warning("no FID for stage %s: %s", stage.name, e)
    out["eval/seconds"] = time.perf_counter() - start
    return out

  return eval_fn
