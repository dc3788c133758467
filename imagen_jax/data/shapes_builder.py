"""TFDS builder `shapes`: captioned synthetic shapes at any resolution.

Prepares and reads without TensorFlow: images are PNG bytes that PIL encodes,
stored in a `tfds.features.Tensor(shape=(), dtype=np.object_)`, captions are
`tfds.features.Text()`, and the files are ArrayRecord.

Splits:
  train, test: scenes with no held-out composition.
  holdout: scenes where at least one object is a held-out composition (by
    default every green triangle), to measure compositional generalization.

Configs are named `res{R}` for the predefined resolutions with default sizes,
and `res{R}_{hash}` for any other combination (see `shapes_config`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from imagen_jax.data import shapes

DEFAULT_HOLDOUT: tuple[str, ...] = ("green triangle",)
DEFAULT_NUM_TRAIN = 20_000
DEFAULT_NUM_TEST = 500
DEFAULT_NUM_HOLDOUT = 500
PREDEFINED_RESOLUTIONS: tuple[int, ...] = (32, 64, 128, 256, 1024)
# Fixed split ids: each example's seed is (config seed, split id, index).
_SPLIT_IDS = {"train": 0, "test": 1, "holdout": 2}


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Builder config of `shapes`.

  Attributes:
    resolution: image side in pixels.
    num_train: examples in the train split.
    num_test: examples in the test split.
    num_holdout: examples in the holdout split.
    holdout: held-out `'{color} {shape}'` compositions.
    seed: base seed; example i of a split is rendered from (seed, split, i).
    two_object_share: fraction of the train split's scenes with two objects
      (test and holdout stay half and half).
  """

  resolution: int = 64
  num_train: int = DEFAULT_NUM_TRAIN
  num_test: int = DEFAULT_NUM_TEST
  num_holdout: int = DEFAULT_NUM_HOLDOUT
  holdout: tuple[str, ...] = DEFAULT_HOLDOUT
  seed: int = 0
  two_object_share: float = 0.5


def num_objects(split: str, index: int, two_object_share: float = 0.5) -> int:
  """Objects in example `index` of a split: test and holdout alternate 1, 2; the
  train split has two in exactly `two_object_share` of every run of examples."""
  if split != "train":
    return 1 + index % 2
  s = float(two_object_share)
  return 2 if int((index + 1) * s) > int(index * s) else 1


def _is_default(resolution, num_train, num_test, num_holdout, holdout, seed):
  return resolution in PREDEFINED_RESOLUTIONS and (
    num_train,
    num_test,
    num_holdout,
    tuple(holdout),
    seed,
  ) == (DEFAULT_NUM_TRAIN, DEFAULT_NUM_TEST, DEFAULT_NUM_HOLDOUT, DEFAULT_HOLDOUT, 0)


def shapes_config(
  resolution: int = 64,
  num_train: int = DEFAULT_NUM_TRAIN,
  num_test: int = DEFAULT_NUM_TEST,
  num_holdout: int = DEFAULT_NUM_HOLDOUT,
  holdout: Sequence[str] = DEFAULT_HOLDOUT,
  seed: int = 0,
  two_object_share: float = 0.5,
) -> ShapesConfig:
  """Returns the config for these settings, with a name unique to them.

  Args:
    resolution: image side in pixels (>= 8).
    num_train: examples in train.
    num_test: examples in test.
    num_holdout: examples in holdout (0 when `holdout` is empty).
    holdout: held-out compositions such as `'green triangle'`.
    seed: base seed of the renderer.

  Returns:
    A `ShapesConfig` named `res{R}` (predefined) or `res{R}_{8 hex digits}`.
  """
  holdout = shapes.parse_compositions(holdout)
  if resolution < 8:
    raise ValueError(f"shapes resolution must be >= 8, got {resolution}.")
  if min(num_train, num_test, num_holdout) < 0:
    raise ValueError(
      "Split sizes must be >= 0, got num_train="
      f"{num_train} num_test={num_test} "
      f"num_holdout={num_holdout}."
    )
  if not 0.0 <= float(two_object_share) <= 1.0:
    raise ValueError(f"two_object_share must be in [0, 1], got {two_object_share}.")
  two_object_share = float(two_object_share)
  if not holdout:
    num_holdout = 0
  name = f"res{resolution}"
  if not _is_default(resolution, num_train, num_test, num_holdout, holdout, seed) or (
    two_object_share != 0.5
  ):
    key = [num_train, num_test, num_holdout, sorted(holdout), seed]
    if two_object_share != 0.5:  # names of half-and-half configs stay as they were
      key.append(two_object_share)
    name += "_" + hashlib.sha1(json.dumps(key).encode()).hexdigest()[:8]
  return ShapesConfig(
    name=name,
    description=(
      f"{resolution}x{resolution} shapes; train={num_train} "
      f"test={num_test} holdout={num_holdout} held out: "
      f"{list(holdout)}; seed={seed}; two-object share of train {two_object_share}"
    ),
    resolution=resolution,
    num_train=num_train,
    num_test=num_test,
    num_holdout=num_holdout,
    holdout=holdout,
    seed=seed,
    two_object_share=two_object_share,
  )


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Captioned synthetic shapes (see `imagen_jax.data.shapes`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [shapes_config(r) for r in PREDEFINED_RESOLUTIONS]
  DEFAULT_CONFIG_NAME = "res64"

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          # PNG bytes, uint8 [R, R, 3] once decoded.
          "image": tfds.features.Tensor(shape=(), dtype=np.object_),
          "caption": tfds.features.Text(),
        }
      ),
      metadata=tfds.core.MetadataDict(
        resolution=cfg.resolution,
        holdout=list(cfg.holdout),
        seed=cfg.seed,
        min_side=cfg.resolution,
        max_side=cfg.resolution,
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: every example is rendered.
    cfg = self.builder_config
    sizes = {"train": cfg.num_train, "test": cfg.num_test}
    if cfg.holdout:
      sizes["holdout"] = cfg.num_holdout
    return {split: self._generate_examples(split, n) for split, n in sizes.items()}

  def _generate_examples(self, split: str, num_examples: int):
    """Yields `(index, {'image': PNG bytes, 'caption': str})`.

    In test and holdout, odd indices hold two objects: exactly half of the
    scenes; train has `two_object_share` of them (`num_objects`; TFDS and the
    pipeline shuffle the order).
    """
    cfg = self.builder_config
    for i in range(num_examples):
      image, caption, _ = shapes.sample_scene(
        (cfg.seed, _SPLIT_IDS[split], i),
        cfg.resolution,
        holdout=cfg.holdout,
        want_holdout=split == "holdout",
        num_objects=num_objects(split, i, cfg.two_object_share),
      )
      yield i, {"image": shapes.encode_png(image), "caption": caption}
