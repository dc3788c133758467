"""The demo's first screen: no warnings that our own defaults cause.

The demo's base stage (32 px) reads the 64 px shapes data on purpose
(``config.data.downscale``); its tokenizer comes from transformers, which must not
advise installing PyTorch; its shapes configs are not TFDS-predefined by design.
"""

import importlib.util
import logging
import os
import subprocess
import sys
import types

import pytest

from imagen_jax import config as config_lib
from imagen_jax.data import datasets, shapes_builder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _builder(side: int):
  """A prepared shapes builder's face: the stored sides in its metadata."""
  info = types.SimpleNamespace(
    metadata={"min_side": side, "max_side": side}, full_name=f"shapes/res{side}/1.0.0"
  )
  return types.SimpleNamespace(name="shapes", info=info)


@pytest.mark.parametrize(
  "side, resolution, downscale, warns",
  [
    (64, 32, False, True),  # an accidental mismatch: warned
    (64, 32, True, False),  # the demo: asked for in the config
    (64, 16, True, False),  # any integer factor
    (48, 32, True, True),  # not an integer factor: warned
    (32, 64, True, True),  # upsampling: warned
    (32, 32, False, False),
  ],
)
def test_check_resolution_warns_only_for_accidents(side, resolution, downscale, warns, caplog):
  with caplog.at_level(logging.WARNING, logger="imagen_jax.data.datasets"):
    datasets.check_resolution(_builder(side), resolution, downscale)
  assert bool([r for r in caplog.records if "stores" in r.getMessage()]) == warns


def test_demo_config_reads_its_data_downscaled_on_purpose():
  for variant in ("", "tiny"):
    config = config_lib.load_config(
      os.path.join(ROOT, "configs", "demo.py") + (f":{variant}" if variant else "")
    )
    assert config.data.downscale is True
    data_res = config.data.builder_kwargs.resolution
    sides = [config.stages[n].resolution for n in config.stage_order]
    assert max(sides) == data_res and all(data_res % s == 0 for s in sides)
  assert config_lib.base_config().data.downscale is False


def test_custom_shapes_config_loads_without_the_tfds_warning(tmp_path, caplog):
  kwargs = dict(resolution=16, num_train=4, num_test=2, num_holdout=2)
  # The absl logger's own level: commands run in-process before (eval.*, sample.py) set
  # it to ERROR, which would hide the warning and make both checks vacuous.
  with caplog.at_level(logging.WARNING, logger="absl"):
    datasets.load_builder("shapes", tmp_path, **kwargs)
  assert not [r for r in caplog.records if "custom data configuration" in r.getMessage()]
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="absl"):  # the control: TFDS itself does warn
    shapes_builder.Shapes(config=shapes_builder.shapes_config(**kwargs), data_dir=str(tmp_path))
  assert [r for r in caplog.records if "custom data configuration" in r.getMessage()]


@pytest.mark.skipif(
  importlib.util.find_spec("torch") is not None, reason="torch is importable: no advice"
)
def test_tokenizer_import_gives_no_pytorch_advice():
  code = (
    "from imagen_jax.text import encoder; encoder._byt5_tokenizer(); "
    "import transformers; transformers.logging.get_logger('transformers').warning('control')"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr
  assert "PyTorch was not found" not in out.stderr
  assert "control" in out.stderr  # the library's other warnings still show
