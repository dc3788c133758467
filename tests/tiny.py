"""The tests' one tiny training setup, shared so that their programs hit the compile cache.

`configs/demo.py:tiny` with a two-level base UNet (the train step compiles several
times faster than the demo's three levels). Tests that train take `tiny_config` (in
process) or `TRAIN_FLAGS` (train.py's command line); both give the same programs, so
the persistent compile cache (tests/conftest.py) serves every run after the first.
Settings a test changes on purpose (a learning rate, an optimizer) are its own.
"""

import os
import shutil

from imagen_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TINY = os.path.join(ROOT, "configs/demo.py:tiny")

# The tiny demo's own data settings: the session's prepared shapes (conftest.py).
SHAPES_KWARGS = dict(resolution=32, num_train=64, num_test=16, num_holdout=16)

# One fine-tuning step of a tiny converted SD stage (train.py flags). The README rows and
# tests/test_sd_finetune.py share them, so they share one compiled train step (the cache).
SD_FINETUNE_FLAGS = (
  "--config.train.num_steps=1",
  "--config.train.batch_size=8",
  "--config.train.lr=1e-5",
)

# The base model of every tiny training run, as config values and as train.py flags.
BASE_MODEL = dict(channels=(16, 32), num_res_blocks=(1, 1), attention=("none", "self_cross"))
MODEL_FLAGS = (
  "--config.stages.base.model.channels=(16, 32)",
  "--config.stages.base.model.num_res_blocks=(1, 1)",
  "--config.stages.base.model.attention=('none', 'self_cross')",
)


def tiny_config(data_dir, **train):
  """The tiny demo with the two-level base model; `train` overrides `config.train`.

  Args:
    data_dir: the TFDS data directory (usually the session's `shapes_data_dir`).
    **train: `config.train` settings.

  Returns:
    The config (both stages; set `stage_order` for the base alone).
  """
  config = config_lib.load_config(DEMO_TINY)
  config.data.data_dir = str(data_dir)
  config.train.update(train)
  config.stages.base.model.update(BASE_MODEL)
  return config


def if_pipeline(name, path, text=True):
  """A DeepFloyd IF pipeline folder at `path`: the parity fixture `name` (if_stage1 or
  if_stage2) plus, with `text`, the tiny T5 fixture as text_encoder/ and tokenizer/."""
  fixtures = os.path.join(ROOT, "tests", "fixtures")
  shutil.copytree(
    os.path.join(fixtures, name), path, ignore=shutil.ignore_patterns("reference.npz")
  )
  if text:
    shutil.copytree(os.path.join(fixtures, "t5_v1_1"), os.path.join(path, "text_encoder"))
    shutil.copytree(os.path.join(fixtures, "t5_v1_1"), os.path.join(path, "tokenizer"))
  return path


def clip_tokenizer(path, vocab_size=64, max_length=7):
  """A tiny CLIPTokenizer folder at `path` for the SD fixtures' text towers (64 tokens,
  BOS 62 and EOS 63, 7 positions): clip_tiny's tokenizer.json (CLIP's normalizer,
  pre-tokenizer and post-processor) with a vocabulary of the letters (word-inner and
  word-final) and digits, no merges; other characters are the unknown (= EOS) token."""
  import json  # pylint: disable=import-outside-toplevel
  import string  # pylint: disable=import-outside-toplevel

  fixtures = os.path.join(ROOT, "tests", "fixtures")
  with open(os.path.join(fixtures, "clip_tiny", "tokenizer.json")) as f:
    tok = json.load(f)
  letters = string.ascii_lowercase
  tokens = list(letters) + [c + "</w>" for c in letters] + list(string.digits)
  tokens = tokens[: vocab_size - 2] + ["<|startoftext|>", "<|endoftext|>"]
  tok["model"]["vocab"] = {t: i for i, t in enumerate(tokens)}
  tok["model"]["merges"] = []
  bos, eos = len(tokens) - 2, len(tokens) - 1
  tok["added_tokens"][0]["id"], tok["added_tokens"][1]["id"] = bos, eos
  tok["post_processor"]["cls"][1], tok["post_processor"]["sep"][1] = bos, eos
  with open(os.path.join(fixtures, "clip_tiny", "tokenizer_config.json")) as f:
    config = json.load(f)
  config["model_max_length"] = max_length
  os.makedirs(path)
  with open(os.path.join(path, "tokenizer.json"), "w") as f:
    json.dump(tok, f)
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return path


def sd_pipeline(name, path, tokenizer=True):
  """A Stable Diffusion pipeline folder at `path`: the parity fixture `name` (sd_v1_tiny,
  sd_v2_tiny, sd_x4_tiny) plus, with `tokenizer`, the tiny CLIP tokenizer as tokenizer/."""
  shutil.copytree(
    os.path.join(ROOT, "tests", "fixtures", name),
    path,
    ignore=shutil.ignore_patterns("reference.npz"),
  )
  if tokenizer:
    clip_tokenizer(os.path.join(path, "tokenizer"))
  return path
