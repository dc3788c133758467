"""The command-line dialect of every entry point: argparse, plus config overrides.

Scripts that take a config (``train.py``, ``benchmarks.sharding``) accept
``--config FILE[:ARG]`` and any number of ``--config.a.b=VALUE`` (or
``--config.a.b VALUE``) overrides, as ml_collections' config flags do:

    parser = argparse.ArgumentParser(...)
    cli.add_config_arg(parser)
    args, rest = parser.parse_known_args(argv)
    config = cli.config_from_args(args, rest)   # UsageError on bad overrides

A value is parsed by the type of the field it replaces (bool, int, float,
str, tuple, dict); an unknown field is an error naming it.
"""

import argparse
import ast
from typing import Any, Optional, Sequence

import ml_collections

from imagen_jax import config as config_lib

PREFIX = "--config."


class UsageError(Exception):
  """Bad command-line input: the entry point prints it in one line and exits 2."""


def add_config_arg(parser: argparse.ArgumentParser, required: bool = True) -> None:
  parser.add_argument(
    "--config",
    required=required,
    help="config file, optionally FILE:ARG (e.g. configs/demo.py:tiny); "
    "override fields with --config.a.b=VALUE",
  )


def split_overrides(rest: Sequence[str]) -> list[tuple[str, str]]:
  """['--config.a.b=1', '--config.c', 'x'] → [('a.b', '1'), ('c', 'x')].

  Raises:
    UsageError: an argument that is not a config override.
  """
  out, i, rest = [], 0, list(rest)
  while i < len(rest):
    arg = rest[i]
    if not arg.startswith(PREFIX):
      raise UsageError(f"unrecognized argument {arg!r}")
    key, eq, value = arg[len(PREFIX) :].partition("=")
    if not eq:
      if i + 1 >= len(rest):
        raise UsageError(f"{arg} needs a value")
      value, i = rest[i + 1], i + 1
    out.append((key, value))
    i += 1
  return out


def _parse_value(text: str, old: Any, key: str) -> Any:
  """``text`` as the type of the value it replaces."""
  try:
    if isinstance(old, bool):
      low = text.strip().lower()
      if low not in ("true", "false", "1", "0"):
        raise ValueError(text)
      return low in ("true", "1")
    if isinstance(old, int):
      return int(text)
    if isinstance(old, float):
      return float(text)
    if isinstance(old, str):
      return text
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if old is None:
      return text
    raise UsageError(f"--config.{key}={text!r}: expected a {type(old).__name__}") from None
  if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
    return type(old)(value)
  return value


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]
) -> ml_collections.ConfigDict:
  """Sets each ``a.b.c`` field of ``config`` from its text, by the field's type.

  Raises:
    UsageError: a field that does not exist, or a value of the wrong type.
  """
  for key, text in overrides:
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      if not isinstance(node, (ml_collections.ConfigDict, dict)) or name not in node:
        raise UsageError(f"--config.{key}: the config has no field {name!r}")
      node = node[name]
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or leaf not in node:
      raise UsageError(f"--config.{key}: the config has no field {key!r}")
    old = node[leaf]
    value = _parse_value(text, old, key)
    if (
      isinstance(node, ml_collections.ConfigDict)
      and isinstance(old, ml_collections.ConfigDict)
      and isinstance(value, dict)
    ):
      value = ml_collections.ConfigDict(value)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise UsageError(f"--config.{key}={text!r}: {e}") from None
  return config


def config_from_args(
  args: argparse.Namespace,
  rest: Sequence[str],
) -> Optional[ml_collections.ConfigDict]:
  """The config named by ``args.config`` with the overrides in ``rest`` applied."""
  if not args.config:
    if rest:
      raise UsageError(f"unrecognized arguments {list(rest)} (no --config given)")
    return None
  try:
    config = config_lib.load_config(args.config)
  except (FileNotFoundError, ValueError) as e:
    raise UsageError(str(e)) from None
  return apply_overrides(config, split_overrides(rest))
