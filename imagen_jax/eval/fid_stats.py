"""Reference FID statistics of a dataset split or an image folder.

  python -m imagen_jax.eval.fid_stats --dataset shapes --data_dir data --split test \\
      --resolution 64 --inception inception_fid.safetensors --out shapes_test64.npz
  python -m imagen_jax.eval.fid_stats --folder my_images/ --resolution 256 \\
      --inception inception_fid.safetensors --out mine256.npz

Images are read through ``imagen_jax.data`` (a prepared TFDS split via
``datasets.load_builder``, or PNG/JPEG/WebP files) and brought to the resolution
the samples will have with the training pipeline's ``resize_and_crop``
(shorter side, bicubic, center crop), so reference and samples differ only in
content. The .npz stores mu, sigma and what produced them (network, its input
resolution, the images' resolution, count, source); ``fid`` refuses statistics
of another network or resolution.
"""

import argparse
import json
import logging
import os
import sys
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from imagen_jax.eval import fid as fid_lib
from imagen_jax.eval import inception, metrics

CHUNK = 512  # images decoded at once (features of all are kept: 8 KB each)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def folder_images(folder: str, resolution: int, num: Optional[int] = None) -> Iterator[np.ndarray]:
  """uint8 [R, R, 3] images of a folder (recursively, sorted by path)."""
  from imagen_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder {folder} does not exist")
  paths = sorted(
    os.path.join(root, f)
    for root, _, files in os.walk(folder)
    for f in files
    if f.lower().endswith(IMAGE_EXTENSIONS)
  )
  if not paths:
    raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
  for path in paths[:num]:
    with Image.open(path) as img:
      yield pipeline.resize_and_crop(np.asarray(img.convert("RGB")), resolution)


def dataset_images(
  name: str,
  data_dir: str,
  split: str,
  resolution: int,
  num: Optional[int] = None,
  builder_kwargs: Optional[dict] = None,
) -> Iterator[np.ndarray]:
  """uint8 [R, R, 3] images of a prepared dataset split, in stored order."""
  from imagen_jax.data import datasets, pipeline  # pylint: disable=g-import-not-at-top

  builder = datasets.load_builder(name, data_dir, **(builder_kwargs or {}))
  datasets.require_prepared(builder)
  source = builder.as_data_source(split=split)
  for i in range(min(len(source), num) if num else len(source)):
    yield pipeline.resize_and_crop(pipeline.decode_image(source[i]["image"]), resolution)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m imagen_jax.eval.fid_stats", description="Reference FID statistics (.npz)."
  )
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--dataset", help="a dataset name (shapes, image_captions, a TFDS name)")
  src.add_argument("--folder", help="a folder of images")
  p.add_argument("--data_dir", default="data", help="TFDS data directory (--dataset)")
  p.add_argument("--split", default="test", help="split (--dataset), e.g. test, train[:10%%]")
  p.add_argument(
    "--builder_kwargs",
    default="{}",
    help="JSON settings of the prepared dataset (--dataset shapes or "
    "image_captions), as config.data.builder_kwargs, e.g. "
    '\'{"resolution": 32, "num_train": 64}\'',
  )
  p.add_argument(
    "--resolution",
    type=int,
    required=True,
    help="the side of the samples these statistics will be compared with",
  )
  p.add_argument("--num", type=int, help="at most this many images (default: all)")
  p.add_argument("--inception", required=True, help="FID InceptionV3 weights (.safetensors)")
  p.add_argument(
    "--inception_resolution",
    type=int,
    default=inception.RESOLUTION,
    help="the network's input side; 299 for comparable FID",
  )
  p.add_argument("--batch", type=int, default=64, help="images per jitted call")
  p.add_argument("--out", required=True, help="the .npz to write")
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The CLI; exit 2 on bad input (one line on stderr)."""
  from imagen_jax import parallel  # pylint: disable=g-import-not-at-top

  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.ERROR)
  try:
    if args.resolution < 1 or (args.num is not None and args.num < metrics.MIN_SAMPLES):
      raise ValueError(f"--resolution must be >= 1 and --num >= {metrics.MIN_SAMPLES}")
    mesh = parallel.make_mesh(None) if _device_count() > 1 else None
    extractor = fid_lib.InceptionFeatures(
      args.inception, mesh=mesh, batch_size=args.batch, resolution=args.inception_resolution
    )
    if args.folder:
      images = folder_images(args.folder, args.resolution, args.num)
      source = f"folder {os.path.abspath(args.folder)}"
    else:
      try:
        kwargs = json.loads(args.builder_kwargs)
      except json.JSONDecodeError as e:
        raise ValueError(f"--builder_kwargs is not JSON: {e}") from None
      images = dataset_images(
        args.dataset, args.data_dir, args.split, args.resolution, args.num, kwargs
      )
      source = f"dataset {args.dataset} split {args.split}"
    feats = [
      extractor(np.stack(chunk))
      for chunk in tqdm(
        _chunks(images, CHUNK), desc=f"inception ({CHUNK} images a chunk)", unit="chunk"
      )
    ]
    stats = extractor.stats_of(np.concatenate(feats), args.resolution, source)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  stats.save(args.out)
  print(
    f"wrote {args.out}: {stats.count} images at {args.resolution}px, "
    f"{inception.NETWORK} at {args.inception_resolution}px ({source})"
  )
  return 0


def _chunks(items: Iterator, size: int) -> Iterator[list]:
  chunk = []
  for item in items:
    chunk.append(item)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def _device_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top

  return jax.device_count()


if __name__ == "__main__":
  sys.exit(main())
