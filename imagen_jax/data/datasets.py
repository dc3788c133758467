"""Finding, preparing and checking the TFDS datasets that the pipeline reads.

`shapes` and `image_captions` are this package's builders (their settings are
keyword arguments here); any other name is read as a TFDS dataset that was
prepared under `data_dir` (for example one prepared elsewhere with
TensorFlow), as `tfds.builder` finds it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Mapping

import tensorflow_datasets as tfds
from etils import epath

from imagen_jax import lockfile
from imagen_jax.data import captions as captions_lib
from imagen_jax.data import image_captions as image_captions_lib
from imagen_jax.data import shapes_builder, streaming

_log = logging.getLogger(__name__)


def _custom_config_filter(record: logging.LogRecord) -> bool:
  return not str(record.msg).startswith("Using custom data configuration")


FILE_FORMAT = "array_record"
# Dataset name -> keyword arguments its config accepts.
BUILDER_KWARGS: dict[str, tuple[str, ...]] = {
  "shapes": (
    "resolution",
    "num_train",
    "num_test",
    "num_holdout",
    "holdout",
    "seed",
    "two_object_share",
  ),
  "image_captions": ("max_resolution",),
}
_BUILDERS = {"shapes": shapes_builder.Shapes, "image_captions": image_captions_lib.ImageCaptions}


def _config(name: str, kwargs: dict[str, Any]):
  """Builds the config of one of our builders from keyword arguments."""
  unknown = set(kwargs) - set(BUILDER_KWARGS[name])
  if unknown:
    raise TypeError(
      f"Unknown {name} settings {sorted(unknown)}; accepted: {list(BUILDER_KWARGS[name])}."
    )
  if name == "shapes":
    return shapes_builder.shapes_config(**kwargs)
  return image_captions_lib.image_captions_config(**kwargs)


def load_builder(name: str, data_dir: str | os.PathLike, **kwargs) -> tfds.core.DatasetBuilder:
  """Returns the builder of a dataset under `data_dir` (prepared or not).

  Args:
    name: `shapes`, `image_captions`, or any TFDS name (`name[/config]`).
    data_dir: TFDS data directory.
    **kwargs: settings of `shapes` (resolution, num_train, num_test,
      num_holdout, holdout, seed) or `image_captions` (max_resolution).

  Returns:
    The builder, writing ArrayRecord files.
  """
  data_dir = os.fspath(data_dir)
  if name in _BUILDERS:
    cls = _BUILDERS[name]
    config = _config(name, kwargs)
    if config.name in cls.builder_configs:  # TFDS wants predefined by name.
      config = config.name
    # Configs named by their settings are ours by design: drop TFDS's warning that
    # a config is not predefined (on the absl logger, this call only).
    absl_log = logging.getLogger("absl")
    absl_log.addFilter(_custom_config_filter)
    try:
      return cls(config=config, data_dir=data_dir, file_format=FILE_FORMAT)
    finally:
      absl_log.removeFilter(_custom_config_filter)
  if kwargs:
    raise TypeError(
      f"Settings {sorted(kwargs)} only apply to {sorted(BUILDER_KWARGS)}, not to {name!r}."
    )
  require_data_dir(data_dir, name)
  return tfds.builder(name, data_dir=data_dir)


def require_data_dir(data_dir: str, name: str) -> None:
  """Raises FileNotFoundError if `data_dir` is missing or empty."""
  path = epath.Path(data_dir)  # local or remote (gs://...), as TFDS reads it
  if not path.is_dir():
    raise FileNotFoundError(
      f"Dataset directory {data_dir!r} does not exist; prepare {name!r} "
      "first, e.g. `python -m imagen_jax.data.prepare --dataset "
      f"{name.split('/')[0]} --data_dir {data_dir}`."
    )
  if not any(True for _ in path.iterdir()):
    raise FileNotFoundError(
      f"Dataset directory {data_dir!r} is empty; prepare {name!r} there "
      "first with `python -m imagen_jax.data.prepare`."
    )


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  """`builder.is_prepared()`, without TFDS' warning for a missing folder."""
  return (builder.data_path / "dataset_info.json").exists() and builder.is_prepared()


def require_prepared(builder: tfds.core.DatasetBuilder) -> None:
  """Raises FileNotFoundError naming the paths if `builder` is not prepared."""
  root = os.fspath(builder.data_dir_root)
  require_data_dir(root, builder.info.full_name)
  if not is_prepared(builder):
    raise FileNotFoundError(
      f"Dataset {builder.info.full_name!r} is not prepared: no complete "
      f"{builder.data_dir!r}. Prepare it with `python -m "
      f"imagen_jax.data.prepare --dataset {builder.name} --data_dir {root}` "
      "and the same settings (or imagen_jax.data.datasets.prepare)."
    )


def prepare(
  name: str,
  data_dir: str | os.PathLike,
  *,
  src: str | os.PathLike | None = None,
  wait: float | None = None,
  **kwargs,
) -> tfds.core.DatasetBuilder:
  """Prepares a dataset unless it already is, printing progress.

  Preparation holds a lock file per dataset folder
  (`{data_dir}/{name}/{config}.lock`, see `imagen_jax.lockfile`): a second
  preparation of the same dataset waits for the first, then finds it
  prepared. An `image_captions` dataset whose source folder changed since it
  was prepared (file names, sizes or mtimes) is prepared again.

  Args:
    name: `shapes` or `image_captions`.
    data_dir: TFDS data directory; created when missing.
    src: the source folder of `image_captions` (its TFDS manual dir).
    wait: seconds to wait for another process preparing the same dataset
      (None: as long as it lives; 0: raise `lockfile.Locked` at once).
    **kwargs: builder settings, as in `load_builder`.

  Returns:
    The prepared builder.

  Raises:
    FileNotFoundError / ValueError: `src` missing, empty or uncaptioned.
    lockfile.Locked: another live process prepares it (after `wait` s).
  """
  data_dir = os.fspath(data_dir)
  if name not in _BUILDERS:
    raise ValueError(
      f"Can only prepare {sorted(_BUILDERS)}, not {name!r}; "
      "prepare other TFDS datasets with the tfds CLI and read "
      "them from their data_dir."
    )
  if name == "image_captions":
    if src is None:
      raise ValueError("image_captions needs src=<folder of images>.")
    captions_lib.find_captioned_images(src)  # Fails early, clearly.
  elif src is not None:
    raise ValueError(f"src only applies to image_captions, not {name!r}.")
  config_name = _config(name, kwargs).name
  epath.Path(data_dir, name).mkdir(parents=True, exist_ok=True)
  lock = os.path.join(data_dir, name, f"{config_name}.lock")
  with lockfile.hold(lock, what=f"preparation of {name}/{config_name} in {data_dir}", wait=wait):
    builder = load_builder(name, data_dir, **kwargs)
    if not is_prepared(builder):
      return _download_and_prepare(builder, src)
    changed = None if src is None else _source_changed(builder, src)
    if changed is None:
      print(f"{builder.info.full_name} already prepared in {builder.data_dir}")
      return builder
    _log.warning("%s: %s; preparing it again.", builder.info.full_name, changed)
    return _prepare_again(builder, src, name, data_dir, kwargs)


def _source_changed(builder: tfds.core.DatasetBuilder, src: str | os.PathLike) -> str | None:
  """Why the source of a prepared image_captions differs now, or None."""
  meta = builder.info.metadata or {}
  old = meta.get("source_fingerprint")
  new, num_files = captions_lib.fingerprint(src)
  if old == new:
    return None
  if old is None:
    return f"it was prepared from {meta.get('source_dir')} without a source fingerprint"
  return (
    f"its source folder {os.path.abspath(src)} changed since it was "
    f"prepared from {meta.get('source_dir')} (file names, sizes or "
    f"mtimes; {meta.get('source_files')} files then, {num_files} now)"
  )


def _prepare_again(builder, src, name, data_dir, kwargs):
  """Prepares anew, keeping the old files aside until it succeeded."""
  old = os.fspath(builder.data_dir)
  aside = os.path.join(os.path.dirname(old), f".{os.path.basename(old)}.old")
  if os.path.exists(aside):  # Left by a run that died here.
    shutil.rmtree(aside)
  os.rename(old, aside)
  try:
    fresh = _download_and_prepare(load_builder(name, data_dir, **kwargs), src)
  except BaseException:
    if not os.path.exists(old):
      os.rename(aside, old)
    raise
  shutil.rmtree(aside)
  return fresh


def _download_and_prepare(builder, src):
  download_config = None
  if src is not None:
    download_config = tfds.download.DownloadConfig(manual_dir=os.path.abspath(os.fspath(src)))
  print(f"Preparing {builder.info.full_name} in {builder.data_dir} ...", flush=True)
  start = time.perf_counter()
  builder.download_and_prepare(download_config=download_config, file_format=FILE_FORMAT)
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(
    f"Prepared {builder.info.full_name} in {time.perf_counter() - start:.1f} s: {sizes}", flush=True
  )
  return builder


def builder_settings(data: Mapping[str, Any]) -> dict[str, Any]:
  """The checked builder settings of a config's `data` group.

  `data.builder_kwargs` holds the settings of the builder `data.name`; any
  other setting (e.g. the demo's shapes settings left in place when
  switching to image_captions) is an error naming the config field.

  Args:
    data: the `config.data` group (name, builder_kwargs, src, prepare, ...).

  Returns:
    Keyword arguments for `load_builder` / `prepare`.

  Raises:
    ValueError: one line naming the offending `config.data` field.
  """
  name, kwargs = data["name"], dict(data.get("builder_kwargs") or {})
  accepted = BUILDER_KWARGS.get(name, ())
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    owners = sorted(
      n for n, keys in BUILDER_KWARGS.items() if n != name and set(unknown) <= set(keys)
    )
    whose = f" (settings of {owners[0]})" if owners else ""
    raise ValueError(
      f"config.data.builder_kwargs.{unknown[0]}: config.data.name={name!r} "
      f"does not accept {unknown}{whose}; it accepts {list(accepted)}. Use "
      f"a config written for {name} (for your own images: "
      "configs/own_data.py)."
    )
  src = data.get("src") or ""
  if name == "image_captions" and data.get("prepare", True) and not src:
    raise ValueError(
      "config.data.src is empty: image_captions prepares a "
      "folder of captioned images, e.g. "
      "--config.data.src=my_images/."
    )
  if src and name != "image_captions":
    raise ValueError(
      f"config.data.src={src!r} only applies to image_captions, not to config.data.name={name!r}."
    )
  return kwargs


def prepare_from_config(data: Mapping[str, Any]) -> dict[str, Any]:
  """Checks `config.data` and prepares its dataset if asked and needed.

  Args:
    data: the `config.data` group.

  Returns:
    The builder settings (`builder_settings(data)`).
  """
  if streaming.is_streaming(data):
    return {}  # a streamed corpus (imagen_jax.data.streaming): nothing to prepare
  kwargs = builder_settings(data)
  if data.get("prepare", True) and data["name"] in _BUILDERS:
    if data["name"] == "image_captions":
      prepare(data["name"], data["data_dir"], src=data["src"], **kwargs)
    else:
      prepare(data["name"], data["data_dir"], **kwargs)
  return kwargs


def stored_sides(builder: tfds.core.DatasetBuilder) -> tuple[int, int] | None:
  """(smallest, largest) stored image side from the metadata, or None."""
  meta = builder.info.metadata or {}
  if "min_side" in meta and "max_side" in meta:
    return int(meta["min_side"]), int(meta["max_side"])
  return None


def check_resolution(
  builder: tfds.core.DatasetBuilder, resolution: int, downscale: bool = False
) -> None:
  """Warns when the pipeline's resolution does not match the stored images.

  Images smaller than `resolution` are upsampled (blurry); for `shapes` any
  mismatch means another config (`resolution=`) would render sharper data.

  Args:
    builder: a prepared builder.
    resolution: the side the pipeline produces (the stage's resolution).
    downscale: stored sides that are an integer multiple of `resolution` are
      intended (`config.data.downscale`: a cascade's lower stages read its top
      stage's data): no warning for them.
  """
  sides = stored_sides(builder)
  if sides is None:
    return
  small, large = sides
  if downscale and small > resolution and small % resolution == 0:
    return
  if builder.name == "shapes" and small != resolution:
    _log.warning(
      "Dataset %s stores %dx%d images but the pipeline resolution is %d; "
      "they will be resized. Prepare shapes with resolution=%d to avoid "
      "it (or set config.data.downscale=True when the stage reads a larger "
      "stage's data on purpose).",
      builder.info.full_name,
      small,
      small,
      resolution,
      resolution,
    )
  elif small < resolution:
    _log.warning(
      "Dataset %s has images with shorter side %d (largest %d) below the "
      "pipeline resolution %d: they will be upsampled.",
      builder.info.full_name,
      small,
      large,
      resolution,
    )
