"""FID of a trained cascade's samples against reference statistics, and its CLI.

``InceptionFeatures`` wraps the FID InceptionV3 (``inception.py``, pytorch-fid's
network and preprocessing) in a jitted, mesh-sharded ``FeatureExtractor`` and
turns images into ``metrics.FeatureStats``.

  python -m imagen_jax.eval.fid --workdir RUN --reference stats.npz \\
      --prompts_file F --num N --inception inception_fid.safetensors \\
      [--clip CLIP_DIR] [--guidance 3,1] [--steps 50,25] [--batch 64] [--seed 0]

prints (and writes to WORKDIR/eval_fid.json) the FID, optionally the CLIP
score, and what produced them. Prompts are cycled until N images.

Several processes (``--coordinator_address --num_processes --process_id``,
as train.py): each samples its share of the batches on its own devices;
process 0 gathers the images, scores them and writes the JSON. The images,
hence the statistics, are those of one process at the same --batch (a
multiple of each process's device count).
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

from imagen_jax.eval import features, inception, metrics


class InceptionFeatures:
  """Images → FID Inception pool features and their statistics."""

  def __init__(
    self,
    path: str,
    *,
    mesh=None,
    rules=None,
    batch_size: int = 64,
    resolution: int = inception.RESOLUTION,
  ):
    """Loads the weights (``inception.load_variables``) and jits the network.

    Args:
      path: the .safetensors (or .npz) weights in pytorch-fid's names.
      mesh, rules: rows split over the mesh (``features.FeatureExtractor``).
      batch_size: images per jitted call.
      resolution: the network's input side: 299 for FID numbers anyone can
        compare; smaller (>= 75) only for smoke tests.
    """
    if resolution < inception.MIN_RESOLUTION:
      raise ValueError(
        f"inception resolution must be >= {inception.MIN_RESOLUTION}, got {resolution}"
      )
    self.resolution = resolution
    variables = inception.load_variables(path)

    def fn(variables, images):
      return inception.apply(variables, images, resolution)

    self._extract = features.FeatureExtractor(
      fn, variables, mesh=mesh, rules=rules, batch_size=batch_size
    )

  def __call__(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
    """uint8 [N, R, R, 3] → float32 [N, 2048]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    return self._extract(images, progress=progress, desc="inception")

  def stats(
    self, images: np.ndarray, source: str = "", progress: bool = False
  ) -> metrics.FeatureStats:
    """FeatureStats of uint8 images [N, R, R, 3] (all of one resolution R)."""
    return self.stats_of(self(images, progress), int(images.shape[1]), source)

  def stats_of(
    self, feats: np.ndarray, image_resolution: int, source: str = ""
  ) -> metrics.FeatureStats:
    """FeatureStats of this network's features [N, 2048] of R×R images."""
    return metrics.feature_stats(
      feats,
      network=inception.NETWORK,
      network_resolution=self.resolution,
      image_resolution=image_resolution,
      source=source,
    )


def check_reference(
  path: str, inception_resolution: int, image_resolution: int, source: str
) -> metrics.FeatureStats:
  """Loads reference statistics; ValueError unless they match this network and resolution."""
  reference = metrics.FeatureStats.load(path)
  probe = metrics.FeatureStats(
    np.zeros(1),
    np.zeros((1, 1)),
    0,
    inception.NETWORK,
    inception_resolution,
    image_resolution,
    source,
  )
  probe.check_compatible(reference)
  return reference


def read_prompts(path: str) -> list[str]:
  """Non-empty stripped lines of a text file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompts file {path} does not exist")
  with open(path) as f:
    prompts = [line.strip() for line in f if line.strip()]
  if not prompts:
    raise ValueError(f"prompts file {path} has no prompts")
  return prompts


def cycle(prompts: Sequence[str], num: int) -> list[str]:
  """The first `num` prompts of the list repeated."""
  return [prompts[i % len(prompts)] for i in range(num)]


def per_stage_arg(text: Optional[str], kind) -> Optional[list]:
  """'3,1' → [3.0, 1.0] ('off'/'none' kept for guidance); None stays None."""
  if text is None:
    return None
  out = []
  for v in (s.strip() for s in text.split(",")):
    if kind is float and v.lower() in ("off", "none"):
      out.append(v)
      continue
    try:
      out.append(kind(v))
    except ValueError:
      raise ValueError(f"{v!r} is not a{'n integer' if kind is int else ' number'}") from None
  return out


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
  """Flags shared by the evaluation CLIs (sampling and feature networks)."""
  p.add_argument("--workdir", required=True, help="a trained run (train.py --workdir)")
  p.add_argument("--steps", help="steps per stage, e.g. 50,25 (default: the config's)")
  p.add_argument("--batch", type=int, default=64, help="images per jitted call")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--inception", help="FID InceptionV3 weights (.safetensors, pytorch-fid names)")
  p.add_argument(
    "--inception_resolution",
    type=int,
    default=inception.RESOLUTION,
    help="the network's input side; 299 for comparable FID, smaller only for smoke tests",
  )
  p.add_argument("--clip", help="a local Hugging Face CLIP folder, for the CLIP score")


def evaluate_images(
  images: np.ndarray,
  prompts: Sequence[str],
  *,
  inception_fn: Optional[InceptionFeatures] = None,
  reference: Optional[metrics.FeatureStats] = None,
  clip_scorer: Any = None,
  source: str = "",
) -> dict:
  """FID (when inception_fn and reference) and CLIP score (when clip_scorer) of images.

  Returns:
    {'fid': float, 'num': N} and/or {'clip_score': {'mean', 'std', 'count'}}.
  """
  out: dict = {"num": int(len(images))}
  if inception_fn is not None and reference is not None:
    stats = inception_fn.stats(images, source=source)
    out["fid"] = metrics.fid(stats, reference)
  if clip_scorer is not None:
    out["clip_score"] = metrics.summary(clip_scorer.scores(images, prompts))
  return out


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m imagen_jax.eval.fid", description="FID (and CLIP score) of a trained cascade."
  )
  add_sampling_flags(p)
  p.add_argument("--reference", required=True, help="statistics from imagen_jax.eval.fid_stats")
  p.add_argument("--prompts_file", required=True, help="one prompt a line, cycled to --num")
  p.add_argument("--num", type=int, default=10_000, help="images to sample")
  p.add_argument("--guidance", help="guidance per stage, e.g. 3,1 (default: the config's)")
  p.add_argument("--out", help="JSON path (default: WORKDIR/eval_fid.json)")
  from imagen_jax.parallel import distributed  # pylint: disable=g-import-not-at-top

  distributed.add_flags(p)
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The CLI; exit 2 on bad input (one line on stderr)."""
  import jax  # pylint: disable=g-import-not-at-top
  from imagen_jax import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.eval import clip as clip_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.parallel import distributed  # pylint: disable=g-import-not-at-top

  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.ERROR)
  try:  # Everything that can be refused is refused before loading any weights.
    distributed.initialize_from_args(args)
    if args.num < metrics.MIN_SAMPLES or args.batch < 1:
      raise ValueError(f"--num must be >= {metrics.MIN_SAMPLES} and --batch >= 1")
    if not args.inception:
      raise ValueError("--inception is required: the FID InceptionV3 weights (.safetensors)")
    config = run_lib.read_config(args.workdir)
    steps = per_stage_arg(args.steps, int)
    guidance = per_stage_arg(args.guidance, float)
    cascade_lib.per_stage(steps, config.stage_order, "steps")
    cascade_lib.per_stage(guidance, config.stage_order, "guidance")
    reference = check_reference(
      args.reference,
      args.inception_resolution,
      config.stages[config.stage_order[-1]].resolution,
      args.workdir,
    )
    prompts = cycle(read_prompts(args.prompts_file), args.num)
    cascade = cascade_lib.Cascade.from_workdir(args.workdir)
    inception_fn = InceptionFeatures(
      args.inception,
      mesh=cascade.mesh,
      rules=cascade.rules,
      batch_size=args.batch,
      resolution=args.inception_resolution,
    )
    scorer = (
      clip_lib.CLIPScorer(args.clip, mesh=cascade.mesh, rules=cascade.rules, batch_size=args.batch)
      if args.clip
      else None
    )
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  start = time.perf_counter()
  out = cascade.sample(
    prompts, jax.random.key(args.seed), steps=steps, guidance=guidance, batch_size=args.batch
  )
  if not distributed.is_primary():
    return 0  # every process sampled its share; process 0 scores them all
  result = evaluate_images(
    out.final,
    prompts,
    inception_fn=inception_fn,
    reference=reference,
    clip_scorer=scorer,
    source=args.workdir,
  )
  result.update(
    reference=args.reference,
    reference_source=reference.source,
    reference_count=reference.count,
    network=inception.NETWORK,
    inception_resolution=args.inception_resolution,
    image_resolution=int(out.final.shape[1]),
    seed=args.seed,
    settings={n: dataclasses.asdict(s) for n, s in out.settings.items()},
    checkpoint_steps=cascade.checkpoint_steps,
    wall_s=round(time.perf_counter() - start, 2),
  )
  path = args.out or os.path.join(args.workdir, "eval_fid.json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1, default=float)
  print(json.dumps(result, indent=1, default=float))
  print(f"wrote {path}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
