"""The word-level tokenizer fitted on the captions, and the UNet's text adapter layers."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from imagen_jax import config as config_lib
from imagen_jax import run as run_lib
from imagen_jax.models import layers, text_layers
from imagen_jax.models.unet import UNet, UNetConfig, dummy_inputs
from imagen_jax.text import TextEncoder, words
from imagen_jax.text.encoder import _load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = [
  "a red circle in the top left",
  "a blue square in the center",
  "a red circle in the top left and a blue square in the bottom right",
  "A Green triangle in the bottom left",
]


def test_fit_gives_one_token_per_word_and_eos(tmp_path):
  out = str(tmp_path / "tok")
  size = words.fit_word_tokenizer(CORPUS, out, vocab_size=64)
  assert set(os.listdir(out)) == {"tokenizer.json", "tokenizer_config.json"}
  tok = _load_tokenizer(out)
  assert len(tok) == size == 3 + len(set(" ".join(CORPUS).lower().split()))
  ids = tok(["a red circle in the top left", "", "a purple hexagon"])["input_ids"]
  assert len(ids[0]) == 8 and ids[0][-1] == 1  # seven words, then </s>
  assert ids[1] == [1]  # the unconditional prompt: just </s>
  assert ids[2][1:3] == [2, 2]  # unseen words are <unk>, not errors
  # Lower-cased: the capitalized caption's words are the same tokens.
  assert tok(["a green triangle"])["input_ids"] == tok(["A GREEN Triangle"])["input_ids"]
  # Deterministic: the same corpus gives the same file.
  again = str(tmp_path / "again")
  words.fit_word_tokenizer(CORPUS, again, vocab_size=64)
  assert (
    open(os.path.join(out, "tokenizer.json")).read()
    == open(os.path.join(again, "tokenizer.json")).read()
  )


def test_vocab_size_keeps_the_most_frequent_words(tmp_path):
  out = str(tmp_path / "tok")
  assert words.fit_word_tokenizer(CORPUS * 3 + ["zebra"], out, vocab_size=5) == 5
  tok = _load_tokenizer(out)
  assert tok(["zebra"])["input_ids"][0] == [2, 1]  # dropped: rarest
  with pytest.raises(ValueError, match="empty"):
    words.fit_word_tokenizer([], str(tmp_path / "none"), vocab_size=16)
  with pytest.raises(ValueError, match="at least"):
    words.fit_word_tokenizer(CORPUS, str(tmp_path / "small"), vocab_size=3)


def test_encoder_uses_the_fitted_tokenizer(tmp_path):
  out = str(tmp_path / "tok")
  words.fit_word_tokenizer(CORPUS, out, vocab_size=32)
  text = ml_collections.ConfigDict(
    dict(
      path="",
      tokenizer="",
      fit_tokenizer="words",
      dim=16,
      dtype="float32",
      seed=0,
      random=dict(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4),
    )
  )
  with pytest.raises(ValueError, match="fitted by train.py"):
    TextEncoder.from_config(text)
  text.tokenizer = out
  enc = TextEncoder.from_config(text)
  ids, mask = enc.tokenize(["a red circle in the top left"], 12)
  assert mask.sum() == 8 and ids[0, 7] == 1
  emb, _ = enc.encode(["a red circle in the top left"], 12)
  assert emb.shape == (1, 12, 16)
  # A vocabulary larger than the encoder's embedding table is refused.
  words.fit_word_tokenizer(CORPUS, out, vocab_size=64)
  text.random.vocab_size = 8
  with pytest.raises(ValueError, match="vocab_size"):
    TextEncoder.from_config(text)


def test_read_config_points_at_the_runs_tokenizer(tmp_path):
  config = config_lib.load_config(os.path.join(ROOT, "configs/demo.py:tiny"))
  config.text.fit_tokenizer = "words"
  run_lib.write_config(str(tmp_path), config)
  read = run_lib.read_config(str(tmp_path))
  assert read.text.tokenizer == os.path.join(str(tmp_path), "tokenizer")
  stored = json.loads((tmp_path / "config.json").read_text())
  assert stored["text"]["tokenizer"] == ""  # the workdir can move


def test_text_adapter_layers():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 16)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  module = text_layers.TextTransformer(num_layers=2, num_heads=4)
  params = module.init(jax.random.key(0), x, mask)
  y = module.apply(params, x, mask)
  assert y.shape == x.shape
  # Padded tokens are never attended to: changing them leaves real tokens alone.
  x2 = x.at[0, 3:].set(5.0)
  y2 = module.apply(params, x2, mask)
  np.testing.assert_allclose(y2[0, :3], y[0, :3], atol=1e-6)
  # Positions matter: the same token at another place gets another output.
  same = jnp.broadcast_to(x[:1, :1], (1, 6, 16))
  out = module.apply(params, same, None)
  assert float(jnp.abs(out[0, 0] - out[0, 5]).max()) > 1e-3


def test_text_adapter_conv_is_local_and_masked():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 16)), jnp.float32)
  mask = jnp.asarray([[1] * 6 + [0] * 3, [1] * 9], bool)
  module = text_layers.TextTransformer(num_layers=0, num_heads=4, conv_kernel=3)
  params = module.init(jax.random.key(0), x, mask)
  y = module.apply(params, x, mask)
  # Token 4 reaches its neighbours 3 and 5 only.
  y2 = module.apply(params, x.at[:, 4].add(jnp.linspace(-1.0, 1.0, 16)), mask)
  changed = np.abs(np.asarray(y2 - y)).max(-1) > 1e-6
  np.testing.assert_array_equal(changed[1], np.abs(np.arange(9) - 4) <= 1)
  # Padding is zeroed before the convolution: real tokens never see it.
  y3 = module.apply(params, x.at[0, 6:].set(7.0), mask)
  np.testing.assert_allclose(y3[0, :6], y[0, :6], atol=1e-6)
  # The offsets have their own weights: a sequence read backwards is another input.
  rev = module.apply(params, x[:, ::-1], None)[:, ::-1]
  assert float(jnp.abs(rev - module.apply(params, x, None)).max()) > 1e-3
  with pytest.raises(ValueError, match="odd"):
    UNetConfig(channels=(8,), num_res_blocks=1, attention="none", text_dim=16, text_conv_kernel=4)


def test_unet_text_layers_config():
  c = UNetConfig(
    channels=(8, 16),
    num_res_blocks=1,
    attention=("none", "cross"),
    norm_groups=4,
    head_dim=8,
    text_dim=16,
    text_pool_heads=2,
    text_layers=1,
    text_layer_heads=4,
  )
  model = UNet(c)
  inputs = dummy_inputs(c, 2, 8, text_len=5)
  params = model.init(jax.random.key(0), **inputs)
  assert "text_adapter" in params["params"]
  assert model.apply(params, **inputs).shape == (2, 8, 8, 3)
  with pytest.raises(ValueError, match="text_layers"):
    UNetConfig(channels=(8,), num_res_blocks=1, attention="none", text_dim=16, text_layers=-1)
  with pytest.raises(ValueError, match="divisible"):
    UNetConfig(
      channels=(8,),
      num_res_blocks=1,
      attention="none",
      text_dim=18,
      text_layers=1,
      text_layer_heads=4,
    )


@pytest.mark.slow
def test_train_fits_once_and_sampling_reads_it(tmp_path, shapes_data_dir):
  from imagen_jax import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.train import trainer  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config(os.path.join(ROOT, "configs/demo.py:tiny"))
  config.data.data_dir = str(shapes_data_dir)
  config.text.update(dict(fit_tokenizer="words", max_length=20))
  config.stages.base.model.update(
    dict(channels=(16, 32), num_res_blocks=(1, 1), attention=("none", "self_cross"), text_layers=1)
  )
  config.train.update(dict(num_steps=2, checkpoint_every=2))
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir, ["base"])
  tok_file = os.path.join(workdir, "tokenizer", "tokenizer.json")
  vocab = json.load(open(tok_file))["model"]["vocab"]
  assert {"red", "triangle", "bottom", "and"} <= set(vocab)  # fitted on the captions
  mtime = os.path.getmtime(tok_file)
  config.train.num_steps = 4
  trainer.train_and_evaluate(config, workdir, ["base"])  # resumes: the same tokenizer
  assert os.path.getmtime(tok_file) == mtime
  read = run_lib.read_config(workdir)
  read.stage_order = ("base",)
  cascade = cascade_lib.Cascade.from_workdir(workdir, config=read)
  out = cascade.sample(["a red circle in the top left", "a purple hexagon"], jax.random.key(0))
  assert out.final.shape == (2, 16, 16, 3)
  config.text.path = str(tmp_path)  # a real T5 brings its own tokenizer
  with pytest.raises(Exception, match="fit_tokenizer"):
    trainer.train_and_evaluate(config, str(tmp_path / "run2"), ["base"])


def test_attention_position_codes():
  codes = layers.positions_2d(4, 4, 16)
  assert codes.shape == (4, 4, 16)
  flat = np.asarray(codes).reshape(16, 16)
  assert len({tuple(np.round(r, 5)) for r in flat}) == 16  # every cell its own code
  # The same fraction of the side gets the same code at every resolution.
  np.testing.assert_allclose(layers.positions_2d(8, 8, 16)[2, 4], codes[1, 2], atol=1e-5)
  x = jnp.ones((1, 4, 4, 16))  # a constant image: only the codes tell cells apart
  block = layers.AttentionBlock("self", head_dim=8, groups=4, pos_embed=True)
  params = block.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # the output projection is zero at init
  y = np.asarray(block.apply(params, x))
  assert np.abs(y[0, 0, 0] - y[0, 3, 3]).max() > 1e-4
  plain = layers.AttentionBlock("self", head_dim=8, groups=4)
  y = np.asarray(plain.apply(params, x))
  np.testing.assert_allclose(y[0, 0, 0], y[0, 3, 3], atol=1e-5)


def test_attention_query_positions():
  # Text attention from a constant image: only the query's own position code can
  # make cells attend to different words.
  x = jnp.ones((1, 4, 4, 16))
  text = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 12)), jnp.float32)
  block = layers.AttentionBlock("cross", head_dim=8, groups=4, query_pos=True)
  params = block.init(jax.random.key(0), x, text)
  assert (
    "q_pos" in params["params"]
    and "q_pos"
    not in layers.AttentionBlock("cross", head_dim=8, groups=4).init(jax.random.key(0), x, text)[
      "params"
    ]
  )
  params = jax.tree.map(lambda p: p + 0.1, params)  # the output projection is zero at init
  y = np.asarray(block.apply(params, x, text))
  assert np.abs(y[0, 0, 0] - y[0, 3, 3]).max() > 1e-4
  # The codes reach the queries only: the image tokens' keys and values are unchanged,
  # so a self-attention block over a constant image still returns one value everywhere.
  self_block = layers.AttentionBlock("self", head_dim=8, groups=4, query_pos=True)
  p2 = jax.tree.map(lambda p: p + 0.1, self_block.init(jax.random.key(0), x))
  y = np.asarray(self_block.apply(p2, x))
  np.testing.assert_allclose(y[0, 0, 0], y[0, 3, 3], atol=1e-5)


def test_locality_bias_of_the_random_encoder():
  from imagen_jax.text.encoder import locality_bias  # pylint: disable=g-import-not-at-top
  from imagen_jax.text.t5 import T5Config, relative_position_buckets  # pylint: disable=g-import-not-at-top

  c = T5Config(vocab_size=384, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2)
  table = np.asarray(locality_bias(c, (1.0, 0.25)))
  buckets = relative_position_buckets(9, 9, c.relative_attention_num_buckets, 128)
  bias = table[buckets]  # [9, 9, heads]
  np.testing.assert_allclose(bias[4, :, 0], -np.abs(np.arange(9) - 4.0))  # exact up to 7 apart
  np.testing.assert_allclose(bias[4, :, 1], -0.25 * np.abs(np.arange(9) - 4.0))
  with pytest.raises(ValueError, match="one per head"):
    locality_bias(c, (1.0,))

  # Tokens then carry their neighbours: the same word after different words differs
  # far more than under T5's own (near-uniform) random attention.
  def spread(locality):
    enc = TextEncoder.random_init(c, locality=locality)
    ids = np.asarray([[5, 7, 9, 1], [6, 7, 9, 1]], np.int32)  # one word changed, two away
    emb = np.asarray(enc.encode_tokens(ids, ids > 0))
    near = np.abs(emb[0, 1] - emb[1, 1]).mean()  # its neighbour changed
    far = np.abs(emb[0, 3] - emb[1, 3]).mean()  # three tokens away
    return near / far

  assert spread((1.0, 1.0)) > 1.5 * spread(())
