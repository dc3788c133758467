"""Guidance sweeps: metrics per guidance scale, a JSON table and a Pareto plot.

  python -m imagen_jax.eval.sweep --workdir RUN --guidance 1,2,3,5,8 \\
      --metrics fid,clip,shapes [--stage base] [--steps 50,25] [--num 100] \\
      [--prompts_file F] [--reference stats.npz --inception W.safetensors] \\
      [--clip CLIP_DIR] [--batch 64] [--seed 0] [--out DIR]

Every guidance value samples the same prompts with the same seed through the
whole cascade; the guidance applies to ``--stage`` (default: the first), the
other stages keep their configured settings. Metrics: ``fid`` (needs
``--reference`` and ``--inception``), ``clip`` (``--clip``, a Hugging Face CLIP
folder), ``shapes`` (the shapes demo's pixel checker; prompts default to its
test captions). Writes ``sweep.json`` (one row per guidance) and ``sweep.png``:
FID against the alignment metric (CLIP score, else pixel-checker accuracy),
one point per guidance — the FID-vs-CLIP Pareto curve of the Imagen paper;
without FID, the alignment metric against guidance.
"""

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from imagen_jax.eval import fid as fid_lib
from imagen_jax.eval import metrics, plot, shapes

METRICS = ("fid", "clip", "shapes")


def parse_list(text: str, kind, what: str) -> list:
  """'1,2,3' → [1.0, 2.0, 3.0]; a one-line ValueError naming the flag."""
  try:
    values = [kind(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None
  if not values:
    raise ValueError(f"{what} is empty")
  return values


def check_metrics(
  names: Sequence[str],
  reference: Optional[str],
  inception_path: Optional[str],
  clip_path: Optional[str],
) -> None:
  """ValueError (one line) for unknown metrics or a metric without its files."""
  unknown = sorted(set(names) - set(METRICS))
  if unknown or not names:
    raise ValueError(f"unknown metrics {unknown or list(names)}; choose from {list(METRICS)}")
  if "fid" in names and (not reference or not inception_path):
    raise ValueError("metric fid needs --reference (stats .npz) and --inception (weights)")
  if "clip" in names and not clip_path:
    raise ValueError("metric clip needs --clip (a Hugging Face CLIP folder)")


class Evaluator:
  """The metric networks of a sweep, loaded once; scores one batch of images."""

  def __init__(
    self,
    names: Sequence[str],
    *,
    mesh=None,
    rules=None,
    batch_size: int = 64,
    reference: Optional[str] = None,
    inception_path: Optional[str] = None,
    inception_resolution: int = 299,
    clip_path: Optional[str] = None,
    holdout: Sequence[str] = (),
  ):
    """Loads the networks the metrics need (``check_metrics`` first: it is cheap)."""
    check_metrics(names, reference, inception_path, clip_path)
    self.names, self.holdout = tuple(names), tuple(holdout)
    self.reference = self.inception = self.clip = None
    if "fid" in names:
      self.reference = metrics.FeatureStats.load(reference)
      self.inception = fid_lib.InceptionFeatures(
        inception_path,
        mesh=mesh,
        rules=rules,
        batch_size=batch_size,
        resolution=inception_resolution,
      )
    if "clip" in names:
      from imagen_jax.eval import clip as clip_lib  # pylint: disable=g-import-not-at-top

      self.clip = clip_lib.CLIPScorer(clip_path, mesh=mesh, rules=rules, batch_size=batch_size)

  def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> dict[str, Any]:
    """{'fid', 'clip_score', 'shapes_accuracy', 'shapes'} for the configured metrics."""
    row = fid_lib.evaluate_images(
      images, prompts, inception_fn=self.inception, reference=self.reference, clip_scorer=self.clip
    )
    if "clip_score" in row:
      row["clip_score"] = row["clip_score"]["mean"]
    if "shapes" in self.names:
      results = [shapes.score_image(image, p) for image, p in zip(images, prompts)]
      row["shapes"] = shapes.summarize(prompts, results, self.holdout)
      row["shapes_accuracy"] = row["shapes"]["accuracy"]
    return row


def axes_of(rows: Sequence[dict]) -> tuple[str, str]:
  """(x key, y key) of the plot: FID vs alignment, else alignment vs guidance."""
  align = next((k for k in ("clip_score", "shapes_accuracy") if k in rows[0]), None)
  if "fid" in rows[0]:
    return align or "guidance", "fid"
  return "guidance", align


_LABELS = {
  "fid": "FID (lower is better)",
  "clip_score": "CLIP score (100 · cosine)",
  "shapes_accuracy": "pixel-checker accuracy",
  "guidance": "guidance scale",
}


def write_outputs(rows: list[dict], settings: dict, out_dir: str) -> tuple[str, str]:
  """sweep.json and sweep.png under out_dir; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  path_json, path_png = os.path.join(out_dir, "sweep.json"), os.path.join(out_dir, "sweep.png")
  with open(path_json, "w") as f:
    json.dump({"settings": settings, "rows": rows}, f, indent=1, default=float)
  x, y = axes_of(rows)
  points = [
    (r[x], r[y], f"w={r['guidance']:g}")
    for r in rows
    if r.get(x) is not None and r.get(y) is not None
  ]
  if points:
    xs, ys, labels = zip(*points)
    plot.line_plot(
      xs,
      ys,
      labels,
      path_png,
      x_label=_LABELS[x],
      y_label=_LABELS[y],
      title=f"guidance sweep of {settings['stage']} ({settings['num']} images, "
      f"{os.path.basename(os.path.normpath(settings['workdir']))})",
      note="one point per guidance scale w",
    )
  return path_json, path_png


def sweep(
  cascade: Any,
  evaluator: Evaluator,
  prompts: Sequence[str],
  guidance: Sequence[float],
  rng: Any,
  *,
  stage: str,
  steps: Any = None,
  batch_size: Optional[int] = None,
  progress: bool = True,
) -> list[dict]:
  """One metrics row per guidance value (same prompts and key for each)."""
  rows = []
  for g in tqdm(guidance, desc="guidance sweep", unit="setting", disable=not progress):
    start = time.perf_counter()
    out = cascade.sample(
      list(prompts), rng, steps=steps, guidance={stage: g}, batch_size=batch_size, progress=progress
    )
    sample_s = time.perf_counter() - start
    row = {"guidance": float(g), **evaluator(out.final, prompts)}
    row.update(sample_s=round(sample_s, 2), eval_s=round(time.perf_counter() - start - sample_s, 2))
    rows.append(row)
  return rows


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m imagen_jax.eval.sweep",
    description="Metrics per guidance scale, JSON + Pareto plot.",
  )
  fid_lib.add_sampling_flags(p)
  p.add_argument("--guidance", required=True, help="guidance scales to sweep, e.g. 1,2,3,5,8")
  p.add_argument("--stage", help="the stage whose guidance is swept (default: the first)")
  p.add_argument("--metrics", default="shapes", help="comma-separated: fid, clip, shapes")
  p.add_argument("--num", type=int, default=100, help="images per guidance value")
  p.add_argument(
    "--prompts_file",
    help="prompts, cycled to --num (default with shapes: the shapes test captions)",
  )
  p.add_argument("--reference", help="FID reference statistics (imagen_jax.eval.fid_stats)")
  p.add_argument("--out", help="output directory (default: WORKDIR/sweep)")
  return p.parse_args(argv)


def _prompts(args, names, config) -> tuple[list[str], tuple]:
  holdout, data_seed = shapes.data_settings(config)
  if args.prompts_file:
    return fid_lib.cycle(fid_lib.read_prompts(args.prompts_file), args.num), holdout
  if "shapes" not in names:
    raise ValueError("--prompts_file is required unless --metrics includes shapes")
  return shapes.split_captions("test", args.num, holdout, data_seed), holdout


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The CLI; exit 2 on bad input (one line on stderr)."""
  import jax  # pylint: disable=g-import-not-at-top
  from imagen_jax import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax import run as run_lib  # pylint: disable=g-import-not-at-top

  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.ERROR)
  try:  # Everything that can be refused is refused before loading any weights.
    guidance = parse_list(args.guidance, float, "--guidance")
    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if args.num < metrics.MIN_SAMPLES or args.batch < 1:
      raise ValueError(f"--num must be >= {metrics.MIN_SAMPLES} and --batch >= 1")
    check_metrics(names, args.reference, args.inception, args.clip)
    config = run_lib.read_config(args.workdir)
    stage = args.stage or config.stage_order[0]
    if stage not in config.stage_order:
      raise ValueError(f"--stage {stage!r} is not one of {list(config.stage_order)}")
    steps = fid_lib.per_stage_arg(args.steps, int)
    cascade_lib.per_stage(steps, config.stage_order, "steps")
    if "fid" in names:
      fid_lib.check_reference(
        args.reference,
        args.inception_resolution,
        config.stages[config.stage_order[-1]].resolution,
        args.workdir,
      )
    prompts, holdout = _prompts(args, names, config)
    cascade = cascade_lib.Cascade.from_workdir(args.workdir)
    evaluator = Evaluator(
      names,
      mesh=cascade.mesh,
      rules=cascade.rules,
      batch_size=args.batch,
      reference=args.reference,
      inception_path=args.inception,
      inception_resolution=args.inception_resolution,
      clip_path=args.clip,
      holdout=holdout,
    )
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  rows = sweep(
    cascade,
    evaluator,
    prompts,
    guidance,
    jax.random.key(args.seed),
    stage=stage,
    steps=steps,
    batch_size=args.batch,
  )
  settings = dict(
    workdir=args.workdir,
    stage=stage,
    metrics=names,
    num=len(prompts),
    seed=args.seed,
    steps=args.steps,
    reference=args.reference,
    inception_resolution=args.inception_resolution if "fid" in names else None,
    checkpoint_steps=cascade.checkpoint_steps,
  )
  path_json, path_png = write_outputs(
    rows, settings, args.out or os.path.join(args.workdir, "sweep")
  )
  table = [
    {k: r[k] for k in ("guidance", "fid", "clip_score", "shapes_accuracy") if k in r} for r in rows
  ]
  print(json.dumps(table, indent=1, default=float))
  print(f"wrote {path_json} and {path_png}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
