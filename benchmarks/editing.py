"""Samplers and inpainting on a trained shapes demo, scored by the pixel checker.

  python -m benchmarks.editing --workdir runs/demo \
      [--samplers ddim:10,25,50,dpmpp_2m:5,10,25,euler:10,25,heun:5,10] [--num 100]
      [--inpaint 60] [--json F]

Samplers: the base stage runs each sampler at each step count (the SR stage
keeps its config's settings); every row scores the same test-split captions
(half single-, half two-object) with ``imagen_jax.eval.shapes``. "UNet calls"
counts the base stage's forward passes per image (guided passes count the
doubled batch once; Heun calls the model twice per step but the last).

Inpainting: for each case a two-object scene is drawn with only its first
object, the quadrant of the second is masked, and the prompt names both. A
case succeeds when the checker finds both objects (color, shape, position)
and every pixel outside the mask is unchanged.
"""

import argparse
import json
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np

from benchmarks.common import cpu_model, markdown_table
from imagen_jax.cascade import Cascade
from imagen_jax.data import shapes
from imagen_jax.eval import shapes as eval_shapes


def parse_samplers(text: str) -> list[tuple[str, int]]:
  """'ddim:10,25,heun:5' → [('ddim', 10), ('ddim', 25), ('heun', 5)]."""
  rows, name = [], None
  for item in text.split(","):
    if ":" in item:
      name, item = item.split(":", 1)
    if name is None:
      raise ValueError(f"--samplers {text!r}: start with NAME:STEPS")
    rows.append((name.strip(), int(item)))
  return rows


def unet_calls(sampler: str, steps: int) -> int:
  return 2 * steps - 1 if sampler == "heun" else steps


def sampler_rows(cascade: Cascade, pairs, num: int, seed: int, batch: int) -> list[dict]:
  holdout, data_seed = eval_shapes.data_settings(cascade.config)
  half = num // 2
  captions = eval_shapes.split_captions(
    "test", half, holdout, data_seed, 1
  ) + eval_shapes.split_captions("test", num - half, holdout, data_seed, 2)
  base, rows = cascade.stage_names[0], []
  for sampler, steps in pairs:
    start = time.perf_counter()
    summary, _, _ = eval_shapes.evaluate(
      cascade,
      captions,
      jax.random.key(seed),
      batch_size=batch,
      steps={base: steps},
      sampler={base: sampler},
      progress=False,
    )
    rows.append(
      dict(
        sampler=sampler,
        steps=steps,
        unet_calls=unet_calls(sampler, steps),
        single=summary["single_object"]["accuracy"],
        two=summary["two_object"]["accuracy"],
        all=summary["accuracy"],
        seconds=round(time.perf_counter() - start, 1),
      )
    )
    print(rows[-1], flush=True)
  return rows


def _quadrant_mask(position: str, size: int) -> np.ndarray:
  fx, fy = shapes.POSITION_CENTERS[position]
  mask = np.zeros((size, size), np.uint8)
  x0, y0 = int(fx >= 0.5) * size // 2, int(fy >= 0.5) * size // 2
  mask[y0 : y0 + size // 2, x0 : x0 + size // 2] = 255
  return mask


def inpaint_rows(cascade: Cascade, cases: int, seed: int) -> dict:
  size = cascade.stages[cascade.stage_names[-1]].resolution
  rng = np.random.default_rng(seed)
  ok_both = ok_pixels = 0
  for i in range(cases):
    first, second = shapes.sample_objects(rng, 2)
    image = shapes.render([first], size, rng)
    mask = _quadrant_mask(second.position, size)
    caption = shapes.make_caption([first, second])
    out = cascade.sample(
      [caption], jax.random.key(seed + i), init_image=image, mask=mask, progress=False
    )
    final = out.final[0]
    kept = bool((final[mask == 0] == image[mask == 0]).all())
    found = bool(eval_shapes.score_image(final, caption)["correct"])
    ok_pixels += kept
    ok_both += found and kept
  return dict(
    cases=cases, both_objects_and_pixels_kept=ok_both / cases, pixels_kept=ok_pixels / cases
  )


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a trained shapes demo run")
  p.add_argument("--samplers", default="ddim:10,25,50,dpmpp_2m:5,10,25,euler:10,25,heun:5,10")
  p.add_argument("--num", type=int, default=100, help="captions per sampler row")
  p.add_argument("--inpaint", type=int, default=60, help="inpainting cases (0: none)")
  p.add_argument("--batch", type=int, default=50)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", help="write the rows here")
  args = p.parse_args(argv)
  try:
    pairs = parse_samplers(args.samplers) if args.samplers else []
    cascade = Cascade.from_workdir(args.workdir)
    cascade.settings(sampler={cascade.stage_names[0]: s for s, _ in pairs[:1]} or None)
  except (ValueError, FileNotFoundError) as e:
    print(f"benchmarks.editing: error: {e}", file=sys.stderr)
    return 2
  meta = dict(
    machine=cpu_model(),
    devices=jax.device_count(),
    date=time.strftime("%Y-%m-%d"),
    workdir=args.workdir,
    checkpoint_steps=cascade.checkpoint_steps,
  )
  rows = sampler_rows(cascade, pairs, args.num, args.seed, args.batch) if pairs else []
  inpaint = inpaint_rows(cascade, args.inpaint, args.seed) if args.inpaint else None
  if rows:
    head = list(rows[0])
    print(markdown_table(head, [[str(r[k]) for k in head] for r in rows]))
  if inpaint:
    print(json.dumps(inpaint))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(meta=meta, samplers=rows, inpaint=inpaint), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
