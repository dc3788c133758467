"""Finding, preparing and checking the TFDS datasets that the pipeline reads.

`shapes` and `image_captions` are this package's builders (their settings are
keyword arguments here); any other name is read as a TFDS dataset that was
prepared under `data_dir` (for example one prepared elsewhere with
TensorFlow), as `tfds.builder` finds it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from imagen_jax.data import image_captions as image_captions_lib
from imagen_jax.data import shapes_builder

_log = logging.getLogger(__name__)
FILE_FORMAT = 'array_record'
# Dataset name -> keyword arguments its config accepts.
BUILDER_KWARGS: dict[str, tuple[str, ...]] = {
    'shapes': ('resolution', 'num_train', 'num_test', 'num_holdout', 'holdout',
               'seed'),
    'image_captions': ('max_resolution',),
}
_BUILDERS = {'shapes': shapes_builder.Shapes,
             'image_captions': image_captions_lib.ImageCaptions}


def _config(name: str, kwargs: dict[str, Any]):
  """Builds the config of one of our builders from keyword arguments."""
  unknown = set(kwargs) - set(BUILDER_KWARGS[name])
  if unknown:
    raise TypeError(f'Unknown {name} settings {sorted(unknown)}; accepted: '
                    f'{list(BUILDER_KWARGS[name])}.')
  if name == 'shapes':
    return shapes_builder.shapes_config(**kwargs)
  return image_captions_lib.image_captions_config(**kwargs)


def load_builder(name: str, data_dir: str | os.PathLike,
                 **kwargs) -> tfds.core.DatasetBuilder:
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
    return cls(config=config, data_dir=data_dir, file_format=FILE_FORMAT)
  if kwargs:
    raise TypeError(f'Settings {sorted(kwargs)} only apply to '
                    f'{sorted(BUILDER_KWARGS)}, not to {name!r}.')
  require_data_dir(data_dir, name)
  return tfds.builder(name, data_dir=data_dir)


def require_data_dir(data_dir: str, name: str) -> None:
  """Raises FileNotFoundError if `data_dir` is missing or empty."""
  path = epath.Path(data_dir)  # local or remote (gs://...), as TFDS reads it
  if not path.is_dir():
    raise FileNotFoundError(
        f'Dataset directory {data_dir!r} does not exist; prepare {name!r} '
        'first, e.g. `python -m imagen_jax.data.prepare --dataset '
        f'{name.split("/")[0]} --data_dir {data_dir}`.')
  if not any(True for _ in path.iterdir()):
    raise FileNotFoundError(
        f'Dataset directory {data_dir!r} is empty; prepare {name!r} there '
        'first with `python -m imagen_jax.data.prepare`.')


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  """`builder.is_prepared()`, without TFDS' warning for a missing folder."""
  return ((builder.data_path / 'dataset_info.json').exists()
          and builder.is_prepared())


def require_prepared(builder: tfds.core.DatasetBuilder) -> None:
  """Raises FileNotFoundError naming the paths if `builder` is not prepared."""
  root = os.fspath(builder.data_dir_root)
  require_data_dir(root, builder.info.full_name)
  if not is_prepared(builder):
    raise FileNotFoundError(
        f'Dataset {builder.info.full_name!r} is not prepared: no complete '
        f'{builder.data_dir!r}. Prepare it with `python -m '
        f'imagen_jax.data.prepare --dataset {builder.name} --data_dir {root}` '
        'and the same settings (or imagen_jax.data.datasets.prepare).')


def prepare(name: str, data_dir: str | os.PathLike, *,
            src: str | os.PathLike | None = None,
            **kwargs) -> tfds.core.DatasetBuilder:
  """Prepares a dataset unless it already is, printing progress.

  Args:
    name: `shapes` or `image_captions`.
    data_dir: TFDS data directory; created when missing.
    src: the source folder of `image_captions` (its TFDS manual dir).
    **kwargs: builder settings, as in `load_builder`.

  Returns:
    The prepared builder.

  Raises:
    FileNotFoundError / ValueError: `src` missing, empty or uncaptioned.
  """
  data_dir = os.fspath(data_dir)
  if name not in _BUILDERS:
    raise ValueError(f'Can only prepare {sorted(_BUILDERS)}, not {name!r}; '
                     'prepare other TFDS datasets with the tfds CLI and read '
                     'them from their data_dir.')
  if name == 'image_captions':
    if src is None:
      raise ValueError('image_captions needs src=<folder of images>.')
    image_captions_lib.find_captioned_images(src)  # Fails early, clearly.
  elif src is not None:
    raise ValueError(f'src only applies to image_captions, not {name!r}.')
  epath.Path(data_dir).mkdir(parents=True, exist_ok=True)
  builder = load_builder(name, data_dir, **kwargs)
  if is_prepared(builder):
    print(f'{builder.info.full_name} already prepared in {builder.data_dir}')
    old_src = (builder.info.metadata or {}).get('source_dir')
    if src is not None and old_src and old_src != os.path.abspath(src):
      _log.warning('%s was prepared from %s, not from %s: delete %s (or use '
                   'another data_dir) to prepare it again.',
                   builder.info.full_name, old_src, os.path.abspath(src),
                   builder.data_dir)
    return builder
  download_config = None
  if src is not None:
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.path.abspath(os.fspath(src)))
  print(f'Preparing {builder.info.full_name} in {builder.data_dir} ...',
        flush=True)
  start = time.perf_counter()
  builder.download_and_prepare(download_config=download_config,
                               file_format=FILE_FORMAT)
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f'Prepared {builder.info.full_name} in '
        f'{time.perf_counter() - start:.1f} s: {sizes}', flush=True)
  return builder


def stored_sides(builder: tfds.core.DatasetBuilder) -> tuple[int, int] | None:
  """(smallest, largest) stored image side from the metadata, or None."""
  meta = builder.info.metadata or {}
  if 'min_side' in meta and 'max_side' in meta:
    return int(meta['min_side']), int(meta['max_side'])
  return None


def check_resolution(builder: tfds.core.DatasetBuilder,
                     resolution: int) -> None:
  """Warns when the pipeline's resolution does not match the stored images.

  Images smaller than `resolution` are upsampled (blurry); for `shapes` any
  mismatch means another config (`resolution=`) would render sharper data.

  Args:
    builder: a prepared builder.
    resolution: the side the pipeline produces (the stage's resolution).
  """
  sides = stored_sides(builder)
  if sides is None:
    return
  small, large = sides
  if builder.name == 'shapes' and small != resolution:
    _log.warning(
        'Dataset %s stores %dx%d images but the pipeline resolution is %d; '
        'they will be resized. Prepare shapes with resolution=%d to avoid '
        'it.', builder.info.full_name, small, small, resolution, resolution)
  elif small < resolution:
    _log.warning(
        'Dataset %s has images with shorter side %d (largest %d) below the '
        'pipeline resolution %d: they will be upsampled.',
        builder.info.full_name, small, large, resolution)
