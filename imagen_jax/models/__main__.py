"""Prints the parameter table of each stage's UNet in a config.

  python -m imagen_jax.models --config configs/base64.py [--stage NAME]

Shapes come from ``jax.eval_shape``: nothing is allocated, so a 2B-parameter
model prints instantly. The last line is ``total params: N``.
"""

import argparse
import collections
import re

from imagen_jax import config as config_lib
from imagen_jax.models import UNet, UNetConfig, count_params, init_abstract


def _group(name: str) -> str:
  """'down2_1_attn' → 'down2 attention'; 'up0_upsample' → 'up0 resample'."""
  m = re.match(r"(down\d+|up\d+|mid)_(?:\d+_)?(res\d*|attn|downsample|upsample)$", name)
  if not m:
    return name
  kind = {"attn": "attention", "downsample": "resample", "upsample": "resample"}
  return f"{m.group(1)} {kind.get(m.group(2), 'resblocks')}"


def _order(group: str) -> tuple:
  """Network order: stem and embeddings, down levels, middle, up levels, head."""
  m = re.match(r"(down|mid|up)(\d*)", group)
  if not m:
    return (4 if group in ("norm_out", "conv_out") else 0, group)
  level = int(m.group(2) or 0)
  return (
    {"down": 1, "mid": 2, "up": 3}[m.group(1)],
    -level if m.group(1) == "up" else level,
    group,
  )


def param_table(params) -> list[tuple[str, int]]:
  """(module group, parameter count) rows in network order."""
  rows = collections.Counter()
  for name, sub in params.items():
    rows[_group(name)] += count_params(sub)
  return sorted(rows.items(), key=lambda row: _order(row[0]))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="configs/*.py file")
  parser.add_argument("--stage", default=None, help="one stage (default: all)")
  args = parser.parse_args(argv)
  config = config_lib.load_config(args.config)
  names = [args.stage] if args.stage else list(config.stage_order)
  unknown = [n for n in names if n not in config.stages]
  if unknown:
    parser.error(f"unknown stage {unknown[0]!r}; the config has {list(config.stage_order)}")
  total = 0
  for name in names:
    stage = config.stages[name]
    model = UNet(UNetConfig.from_config(stage.model))
    params = init_abstract(model, resolution=stage.resolution, text_len=config.text.max_length)
    rows = param_table(params)
    n = sum(c for _, c in rows)
    total += n
    width = max(len(r) for r, _ in rows) + 2
    print(
      f"stage {name}: {stage.resolution}×{stage.resolution}"
      + (
        f" (from {stage.lowres_resolution}×{stage.lowres_resolution})"
        if stage.lowres_resolution
        else ""
      )
    )
    for group, count in rows:
      print(f"  {group:<{width}}{count:>15,}")
    print(f"  {'stage total':<{width}}{n:>15,}")
  print(f"total params: {total}")


if __name__ == "__main__":
  main()
