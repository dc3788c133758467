"""A deterministic pixel checker for the shapes demo, and its evaluation CLI.

(Over 400 lines: the pixel checker (color map, blobs, shape classes, matching) and
the evaluation that drives it are one scorer with one set of thresholds; about half
the file is the checker's docstrings.)

``score_image(image, caption)`` says whether an image shows what a shapes
caption describes (``imagen_jax.data.shapes``: colored, filled, upright circles,
squares and triangles on black, in a quadrant or the center):

1. Each pixel is matched to the palette as ``p ≈ a · color`` (``a`` is the
   coverage: antialiased edges are the color scaled towards black); pixels
   with ``a`` below ``MIN_COVERAGE`` are background, pixels far from every
   scaled palette color are unassigned.
2. Each color's pixels split into 8-connected blobs; blobs smaller than
   ``MIN_OBJECT_AREA`` of the image are noise.
3. A blob's position is the nearest ``POSITION_CENTERS`` entry to its
   coverage-weighted centroid; its shape is the nearest prototype in
   (fill ratio of the bounding box, centroid drop): circle (π/4, 0),
   square (1, 0), upright triangle (1/2, 1/6) — an upright triangle's centroid
   sits a sixth of its height below its box center.
4. The image is correct when every described object matches a distinct blob
   of the same color, shape and position, and no other blob is at least
   ``MIN_EXTRA_AREA`` of the image.

CLI (renders prompts through a trained cascade and scores them)::

  python -m imagen_jax.eval.shapes --workdir runs/demo [--num 100]
      [--split test|holdout] [--seed S] [--batch 50] [--objects 0|1|2]
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
from scipy import ndimage

from imagen_jax.data import shapes

MIN_COVERAGE = 0.25  # a pixel at least this much of a palette color is foreground
MAX_RESIDUAL = 60.0  # RGB distance from the scaled palette color to still count
MIN_OBJECT_AREA = 0.015  # blob area (fraction of the image) to count as an object
MIN_EXTRA_AREA = 0.03  # an unmatched blob this large makes the image incorrect
# (fill ratio, centroid drop) of each shape; drop = (cy - box center) / height.
PROTOTYPES = {
  "circle": (shapes.FILL_RATIOS["circle"], 0.0),
  "square": (shapes.FILL_RATIOS["square"], 0.0),
  "triangle": (shapes.FILL_RATIOS["triangle"], 1.0 / 6.0),
}
MAX_SPAN = 0.55  # a blob wider or taller than this (of the side) is two objects
DROP_WEIGHT = 2.0  # the drop's weight against the fill ratio in the distance

_COLOR_NAMES = tuple(shapes.PALETTE)
_PALETTE = np.asarray([shapes.PALETTE[c] for c in _COLOR_NAMES], np.float32)  # [K, 3]
_SPLIT_IDS = {"train": 0, "test": 1, "holdout": 2}  # as the shapes TFDS builder


@dataclasses.dataclass
class Blob:
  """One detected object."""

  color: str
  shape: str
  position: str
  area: float  # fraction of the image (coverage-weighted)
  centroid: tuple  # (x, y) fractions of the side
  fill: float  # coverage / bounding-box area
  drop: float  # (centroid y - box center y) / box height

  def describe(self) -> str:
    return f"a {self.color} {self.shape} in the {self.position}"


def color_map(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-pixel palette color index and coverage.

  Args:
    image: uint8 [H, W, 3].

  Returns:
    (index int [H, W], -1 for background or unassigned; coverage float [H, W]
    in [0, 1]).
  """
  p = image.astype(np.float32).reshape(-1, 1, 3)  # [P, 1, 3]
  a = (p * _PALETTE).sum(-1) / (_PALETTE * _PALETTE).sum(-1)  # [P, K]
  a = np.clip(a, 0.0, 1.0)
  residual = np.linalg.norm(p - a[..., None] * _PALETTE, axis=-1)  # [P, K]
  best = residual.argmin(-1)
  cov = a[np.arange(len(best)), best]
  ok = (cov >= MIN_COVERAGE) & (residual[np.arange(len(best)), best] <= MAX_RESIDUAL)
  index = np.where(ok, best, -1).reshape(image.shape[:2])
  return index, np.where(ok, cov, 0.0).reshape(image.shape[:2])


def _soft_extent(cov: np.ndarray, axis: int) -> tuple[float, float, float]:
  """(start, end, length) along an axis from the coverage profile (sub-pixel)."""
  profile = cov.max(axis=axis)  # per row or column, in [0, 1]
  idx = np.nonzero(profile > 0)[0]
  first, last = idx[0], idx[-1]
  start = first + 1.0 - profile[first]  # partial first and last lines
  end = last + profile[last]
  return start, end, max(end - start, 1e-6)


def classify_shape(fill: float, drop: float) -> str:
  """The nearest shape prototype in (fill ratio, weighted centroid drop)."""
  dist = {name: np.hypot(fill - f, DROP_WEIGHT * (drop - d)) for name, (f, d) in PROTOTYPES.items()}
  return min(dist, key=dist.get)


def _measure(cov: np.ndarray, color: str, side: int) -> Blob:
  """A Blob from one component's coverage map cov [H, W] (zeros elsewhere)."""
  area = float(cov.sum())
  ys, xs = np.indices(cov.shape)
  cx = float((cov * (xs + 0.5)).sum() / area)
  cy = float((cov * (ys + 0.5)).sum() / area)
  x0, x1, w = _soft_extent(cov, 0)
  y0, y1, h = _soft_extent(cov, 1)
  fill = area / (w * h)
  drop = (cy - (y0 + y1) / 2.0) / h
  fx, fy = cx / side, cy / side
  position = min(
    shapes.POSITION_CENTERS,
    key=lambda k: np.hypot(fx - shapes.POSITION_CENTERS[k][0], fy - shapes.POSITION_CENTERS[k][1]),
  )
  return Blob(
    color=color,
    shape=classify_shape(fill, drop),
    position=position,
    area=area / side**2,
    centroid=(round(fx, 4), round(fy, 4)),
    fill=round(fill, 4),
    drop=round(drop, 4),
  )


def _label(mask: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, int]:
  """Connected blobs of one color: labels int [H, W] (0 = none) and their count.

  Blobs are the 4-connected cores (coverage >= 0.5); each weaker edge pixel
  joins the nearest core. Two same-colored objects whose antialiased edges
  touch stay apart this way.
  """
  core = mask & (cov >= 0.5)
  labels, n = ndimage.label(core)
  if n == 0:
    return labels, 0
  _, (iy, ix) = ndimage.distance_transform_edt(~core, return_indices=True)
  labels = np.where(mask, labels[iy, ix], 0)
  return _split_wide(labels, n)


def _split_wide(labels: np.ndarray, n: int) -> tuple[np.ndarray, int]:
  """Cuts blobs wider or taller than one object can be at the image's midlines.

  Two same-colored objects of adjacent quadrants may touch (the largest object
  plus the largest jitter reaches the midline); one object spans at most
  MAX_SIZE of the side, so a blob over MAX_SPAN is cut in halves.
  """
  side = labels.shape[0]
  half = side // 2
  out, count = np.zeros_like(labels), 0
  for j in range(1, n + 1):
    parts = [labels == j]
    for axis in (0, 1):
      new = []
      for m in parts:
        idx = np.nonzero(m.any(axis=1 - axis))[0]
        if len(idx) and idx[-1] - idx[0] + 1 > MAX_SPAN * side:
          low = np.zeros_like(m)
          low[(slice(None, half),) if axis == 0 else (slice(None), slice(None, half))] = True
          new += [m & low, m & ~low]
        else:
          new.append(m)
      parts = new
    for m in parts:
      if m.any():
        count += 1
        out[m] = count
  return out, count


def find_objects(image: np.ndarray, min_area: float = MIN_OBJECT_AREA) -> list[Blob]:
  """Detects the colored objects of an image, largest first.

  Args:
    image: uint8 [R, R, 3].
    min_area: smallest blob kept, as a fraction of the image area.

  Returns:
    The blobs at least `min_area` large.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1]:
    raise ValueError(f"expected a square RGB image [R, R, 3], got {image.shape}")
  side = image.shape[0]
  index, cov = color_map(image)
  blobs = []
  for k, color in enumerate(_COLOR_NAMES):
    labels, n = _label(index == k, cov)
    for j in range(1, n + 1):
      c = np.where(labels == j, cov, 0.0)
      if c.sum() >= min_area * side**2:
        blobs.append(_measure(c, color, side))
  return sorted(blobs, key=lambda b: -b.area)


def _match(expected: shapes.ShapeObject, blobs: list, used: set) -> tuple[Optional[int], str]:
  """The best unused blob for an expected object and the verdict ('ok' or why not)."""
  same_color = [i for i, b in enumerate(blobs) if b.color == expected.color and i not in used]
  if not same_color:
    return None, f"no {expected.color} object"

  def rank(i):
    b = blobs[i]
    return (b.position != expected.position, b.shape != expected.shape, -b.area)

  i = min(same_color, key=rank)
  b = blobs[i]
  if b.position != expected.position:
    return i, f"{expected.color} object in the {b.position}, not the {expected.position}"
  if b.shape != expected.shape:
    return i, f"{expected.color} {b.shape}, not a {expected.shape}"
  return i, "ok"


def score_image(image: np.ndarray, caption: str) -> dict[str, Any]:
  """Scores one image against its shapes caption.

  Args:
    image: uint8 [R, R, 3].
    caption: a caption of the shapes grammar (``shapes.parse_caption``).

  Returns:
    {'correct': bool, 'num_objects': int, 'objects': [per described object:
    {'expected', 'verdict', 'found'}], 'extra': [descriptions of unmatched
    blobs >= MIN_EXTRA_AREA], 'detected': [every blob as a dict]}. A caption
    outside the grammar or vocabulary cannot be scored: {'correct': None,
    'num_objects': None, 'unscorable': the reason}, never a failure.
  """
  try:
    expected = shapes.parse_caption(caption)
  except ValueError as e:
    return {"correct": None, "num_objects": None, "unscorable": str(e)}
  blobs = find_objects(image)
  used, objects = set(), []
  for obj in expected:
    i, verdict = _match(obj, blobs, used)
    if i is not None:
      used.add(i)
    objects.append(
      {
        "expected": obj.phrase(),
        "verdict": verdict,
        "found": None if i is None else blobs[i].describe(),
      }
    )
  extra = [b.describe() for i, b in enumerate(blobs) if i not in used and b.area >= MIN_EXTRA_AREA]
  correct = all(o["verdict"] == "ok" for o in objects) and not extra
  return {
    "correct": bool(correct),
    "num_objects": len(expected),
    "objects": objects,
    "extra": extra,
    "detected": [dataclasses.asdict(b) for b in blobs],
  }


# ----------------------------------------------------------------------------
# Evaluating a trained cascade.

DEFAULT_HOLDOUT = ("green triangle",)  # as the shapes builder's default


def data_settings(config: Any) -> tuple[tuple, int]:
  """(held-out compositions, data seed) of a run's ``config.data`` (shapes builder)."""
  data = config.get("data") or {}
  kwargs = dict(data.get("builder_kwargs") or {})
  holdout = kwargs.get("holdout", data.get("holdout", DEFAULT_HOLDOUT))
  seed = kwargs.get("seed", data.get("seed", 0))
  return shapes.parse_compositions(holdout or ()), int(seed or 0)


def split_captions(
  split: str,
  num: int,
  holdout: Sequence[str],
  data_seed: int = 0,
  num_objects: Optional[int] = None,
) -> list:
  """The first `num` captions of a shapes split, as the TFDS builder draws them.

  Args:
    split: 'test' (no held-out composition) or 'holdout' (at least one).
    num: how many captions.
    holdout: the held-out compositions.
    data_seed: the builder's seed (example i is drawn from (seed, split id, i)).
    num_objects: None draws 1 or 2 objects as the dataset does (then the
      captions are exactly the prepared split's); 1 or 2 fixes it.

  Returns:
    `num` captions.
  """
  if split not in ("test", "holdout"):
    raise ValueError(f"split must be 'test' or 'holdout', got {split!r}")
  if split == "holdout" and not holdout:
    raise ValueError("split 'holdout' needs held-out compositions, the run's data has none")
  return [
    shapes.sample_scene(
      (data_seed, _SPLIT_IDS[split], i),
      8,
      holdout=holdout,
      want_holdout=split == "holdout",
      num_objects=num_objects,
    )[1]
    for i in range(num)
  ]


def summarize(captions: Sequence[str], results: Sequence[dict], holdout: Sequence[str]) -> dict:
  """Accuracy overall, for one- and two-object prompts and held-out compositions.

  Returns:
    {'accuracy', 'count', 'single_object': {'accuracy', 'count'}, 'two_object':
    {...}, 'holdout': {...}, 'unscorable': {'count', 'captions' (the first 20)}};
    an accuracy is None where its count is 0. Unscorable captions (outside the
    shapes grammar) count in no accuracy.
  """
  groups = {"single_object": [], "two_object": [], "holdout": []}
  unscorable = [c for c, r in zip(captions, results) if r["correct"] is None]
  pairs = [(c, r) for c, r in zip(captions, results) if r["correct"] is not None]
  captions, results = [c for c, _ in pairs], [r for _, r in pairs]
  for caption, r in zip(captions, results):
    groups["single_object" if r["num_objects"] == 1 else "two_object"].append(r["correct"])
    if shapes.has_composition(shapes.parse_caption(caption), holdout):
      groups["holdout"].append(r["correct"])

  def acc(values):
    return {"accuracy": round(float(np.mean(values)), 4) if values else None, "count": len(values)}

  summary = acc([r["correct"] for r in results])
  summary.update({k: acc(v) for k, v in groups.items()})
  summary["unscorable"] = {"count": len(unscorable), "captions": unscorable[:20]}
  return summary


def evaluate(
  cascade: Any,
  captions: Sequence[str],
  rng: Any,
  *,
  batch_size: int = 50,
  steps: Any = None,
  guidance: Any = None,
  sampler: Any = None,
  holdout: Sequence[str] = (),
  progress: bool = True,
) -> tuple[dict, list, np.ndarray]:
  """Renders captions through a cascade and scores the final images.

  Args:
    cascade: an ``imagen_jax.cascade.Cascade``.
    captions: shapes captions.
    rng: PRNG key for sampling.
    batch_size: images per jitted sampler call (one compile per stage).
    steps, guidance, sampler: per-stage overrides (``Cascade.sample``).
    holdout: held-out compositions, for the 'holdout' group.
    progress: tqdm bars.

  Returns:
    (summary (see ``summarize``) plus per-stage timings, per-image results,
    final images uint8 [N, R, R, 3]).
  """
  out = cascade.sample(
    list(captions),
    rng,
    steps=steps,
    guidance=guidance,
    sampler=sampler,
    batch_size=batch_size,
    progress=progress,
  )
  results = [score_image(image, c) for image, c in zip(out.final, captions)]
  for r, c in zip(results, captions):
    r["caption"] = c
  summary = summarize(captions, results, holdout)
  summary["timings"] = {n: dataclasses.asdict(t) for n, t in out.timings.items()}
  summary["settings"] = {n: dataclasses.asdict(s) for n, s in out.settings.items()}
  return summary, results, out.final


def read_prompts(path: str) -> list:
  """The non-empty lines of a prompts file (a ValueError when there are none)."""
  with open(path, encoding="utf-8-sig") as f:
    prompts = [line.strip() for line in f if line.strip()]
  if not prompts:
    raise ValueError(f"{path} holds no prompts")
  return prompts


def _per_stage_arg(text: Optional[str], kind) -> Optional[list]:
  if text is None:
    return None
  return [
    v if kind is float and v.lower() in ("off", "none") else kind(v)
    for v in (s.strip() for s in text.split(","))
  ]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m imagen_jax.eval.shapes", description="Scores a trained shapes cascade."
  )
  p.add_argument("--workdir", required=True)
  p.add_argument("--num", type=int, default=100, help="prompts to evaluate")
  p.add_argument("--split", choices=("test", "holdout"), default="test")
  p.add_argument(
    "--prompts_file",
    help="score these captions (one per line) instead of the split's; lines outside "
    "the shapes grammar are reported as unscorable",
  )
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--batch", type=int, default=50, help="images per sampler call")
  p.add_argument(
    "--objects",
    type=int,
    choices=(0, 1, 2),
    default=0,
    help="objects per prompt: 0 = as the split (1 or 2), else fixed",
  )
  p.add_argument("--steps", help="steps per stage, e.g. 32,16 (default: the config's)")
  p.add_argument("--guidance", help="guidance per stage, e.g. 3,1 (default: the config's)")
  p.add_argument("--sampler", help="sampler per stage, e.g. dpmpp_2m,ddim (default: the config's)")
  p.add_argument("--out", help="directory for the JSON and grid (default: WORKDIR)")
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The CLI; prints the summary JSON, writes it and a pass/fail grid. Exit 2 on bad input."""
  import jax  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from imagen_jax import cascade as cascade_lib  # pylint: disable=g-import-not-at-top

  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices
  try:
    if args.num < 1 or args.batch < 1:
      raise ValueError("--num and --batch must be >= 1")
    steps, guidance = _per_stage_arg(args.steps, int), _per_stage_arg(args.guidance, float)
    sampler = _per_stage_arg(args.sampler, str)
    cascade = cascade_lib.Cascade.from_workdir(args.workdir)
    cascade.settings(steps, guidance, sampler)  # Validates the per-stage lists.
    holdout, data_seed = data_settings(cascade.config)
    if args.prompts_file:
      captions = read_prompts(args.prompts_file)[: args.num]
    else:
      captions = split_captions(args.split, args.num, holdout, data_seed, args.objects or None)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  start = time.perf_counter()
  summary, results, images = evaluate(
    cascade,
    captions,
    jax.random.key(args.seed),
    batch_size=args.batch,
    steps=steps,
    guidance=guidance,
    sampler=sampler,
    holdout=holdout,
  )
  summary.update(
    split=args.split,
    seed=args.seed,
    wall_s=round(time.perf_counter() - start, 2),
    checkpoint_steps=cascade.checkpoint_steps,
  )
  out_dir = args.out or args.workdir
  os.makedirs(out_dir, exist_ok=True)
  name = "prompts" if args.prompts_file else args.split
  base = os.path.join(out_dir, f"eval_shapes_{name}")
  with open(base + ".json", "w") as f:
    json.dump({"summary": summary, "results": results}, f, indent=1, default=float)
  borders = [
    (128, 128, 128) if r["correct"] is None else (40, 200, 40) if r["correct"] else (220, 40, 40)
    for r in results
  ]
  Image.fromarray(cascade_lib.make_grid(images, borders=borders)).save(base + ".png")
  print(json.dumps(summary, indent=1, default=float))
  print(
    f"wrote {base}.json and {base}.png (green border: correct, red: incorrect, grey: unscorable)",
    file=sys.stderr,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
