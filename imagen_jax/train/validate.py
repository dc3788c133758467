"""Training settings checked up front, before any data, model or file is touched.

Every problem is a ``ConfigError`` (a ``ValueError``) with a one-line message
naming the ``config.`` field; ``train.py`` prints it as ``train.py: error: ...``
and exits 2.
"""

from typing import Any, Optional, Sequence

import jax

from imagen_jax import parallel


class ConfigError(ValueError):
  """A setting that cannot work; the message names the field and the value."""


# (field of config.train, smallest allowed value, what it means)
_MINIMA = (
  ("num_steps", 1, "the steps per stage"),
  ("batch_size", 1, "the global batch"),
  ("log_every", 1, "the steps between metric lines"),
  ("checkpoint_every", 1, "the steps between checkpoints"),
  ("keep_checkpoints", 1, "the checkpoints kept; 0 would delete the one just written"),
  ("sample_every", 0, "the steps between sample grids; 0 = none"),
  ("max_nonfinite_steps", 0, "the consecutive non-finite steps skipped before stopping"),
)


def check_train_settings(config: Any, stage_names: Optional[Sequence[str]] = None) -> None:
  """Checks ``config.train`` and the stage names.

  Args:
    config: the cascade config.
    stage_names: the stages to train (None: all of ``config.stage_order``).

  Raises:
    ConfigError: the first bad setting, in one line.
  """
  order = list(config.stage_order)
  if not order:
    raise ConfigError("config.stage_order is empty: the config has no stages")
  for name in stage_names or ():
    if name not in config.stages or name not in order:
      raise ConfigError(f"unknown stage {name!r}; the config has {order}")
  tc = config.train
  for field, minimum, meaning in _MINIMA:
    value = tc.get(field, minimum)
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"config.train.{field}={value!r} must be an integer: {meaning}")
    if value < minimum:
      raise ConfigError(f"config.train.{field}={value} must be >= {minimum}: {meaning}")
  text = config.text
  slopes = tuple(text.get("random_locality") or ())
  if slopes and not text.get("path"):
    heads = int(text.random.get("num_heads", 0))
    if len(slopes) != heads or any(float(s) < 0 for s in slopes):
      raise ConfigError(
        f"config.text.random_locality={slopes} needs {heads} slopes >= 0 "
        "(one per head of config.text.random)"
      )
  if text.get("fit_tokenizer") not in (None, "", "words"):
    raise ConfigError(
      f"config.text.fit_tokenizer={text.fit_tokenizer!r}: expected 'words' (or '' for none)"
    )
  if text.get("fit_tokenizer") and text.get("path"):
    raise ConfigError(
      "config.text.fit_tokenizer is for a randomly initialized encoder; "
      f"config.text.path={text.path!r} brings its own tokenizer"
    )
  for name in stage_names or order:
    kind = (config.stages[name].get("diffusion") or {}).get("kind")
    if text.get("precomputed") and kind == "latent":
      raise ConfigError(
        f"config.text.precomputed: the cached embeddings are the T5's; stage {name} encodes "
        "its captions with its own CLIP tower inside the step (set it to False)"
      )
  for name in order:
    scale = config.stages[name].get("steps_scale", 1.0)
    if not scale or float(scale) <= 0:
      raise ConfigError(f"config.stages.{name}.steps_scale={scale!r} must be > 0")


def per_process_batch(batch_size: int, mesh: Optional[jax.sharding.Mesh]) -> int:
  """The per-process batch; the global batch must split over the data axes.

  Raises:
    ConfigError: ``batch_size`` does not split over the data-parallel devices
      or the processes.
  """
  names, dp = parallel.batch_axes(mesh)
  if batch_size % dp:
    raise ConfigError(
      f"config.train.batch_size={batch_size} is not divisible by the "
      f"data-parallel size {dp} (mesh axes {'×'.join(names)})"
    )
  if batch_size % jax.process_count():
    raise ConfigError(
      f"config.train.batch_size={batch_size} is not divisible by the "
      f"{jax.process_count()} processes"
    )
  return batch_size // jax.process_count()
