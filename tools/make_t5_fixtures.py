"""Builds the golden T5 fixtures under tests/fixtures/t5_*/ (PyTorch + transformers).

Never run by the tests or CI; rerun by hand after changing a fixture:

    pip install -r tools/requirements.txt
    python tools/make_t5_fixtures.py [--out tests/fixtures]

Writes two tiny random T5 checkpoints with their tokenizers, and for each a
`reference.npz` of token ids, masks and transformers' encoder hidden states in
float32 and bfloat16:

- t5_v1_0: T5 v1.0 style (ReLU FFN), saved as a full T5ForConditionalGeneration
  (encoder + a 1-layer decoder, which the loader must skip), with a tiny
  sentencepiece-style Unigram tokenizer built in memory (no sentencepiece).
- t5_v1_1: T5 v1.1 / ByT5 style (gated tanh-GELU FFN, untied embeddings),
  saved as a T5EncoderModel, with the byte-level ByT5 tokenizer; different
  heads, d_kv and relative-position buckets.

Also writes t5_buckets/buckets.npz: transformers' relative-position buckets for
relative positions -600..600 under several (num_buckets, max_distance).
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

PROMPTS = [
  "",
  "a red cube",
  "two blue spheres left of a green cone",
  "A small Yellow triangle above a big purple square, drawn on white paper "
  "next to three tiny orange stars and a circle",
  "Über café: 123 #!",
]
WORDS = [
  "a",
  "red",
  "blue",
  "green",
  "cube",
  "sphere",
  "s",
  "cone",
  "left",
  "of",
  "two",
  "small",
  "big",
  "on",
  "the",
  "above",
  "square",
  "star",
]
BUCKET_CONFIGS = [(32, 128), (16, 24), (64, 256), (8, 16)]


def sp_tokenizer() -> transformers.T5Tokenizer:
  """A tiny sentencepiece-style (Unigram) T5 tokenizer: words, then letters."""
  vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
  vocab += [("\u2581" + w, -3.0 - 0.1 * i) for i, w in enumerate(WORDS)]
  letters = "abcdefghijklmnopqrstuvwxyz0123456789"
  vocab += [(c, -8.0) for c in letters] + [("\u2581" + c, -9.0) for c in letters]
  vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(4))]
  return transformers.T5Tokenizer(vocab=vocab, extra_ids=4)


def randomize_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
  """Gives every RMS-norm scale a distinct random value (init is all ones)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(0.5 + torch.rand(p.shape, generator=gen))


def reference(model_cls, path: str, tok, max_length: int) -> dict:
  """Prompts, token ids, masks and encoder hidden states (float32, bfloat16)."""
  enc = tok(
    PROMPTS, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
  )
  out = {
    "input_ids": enc["input_ids"].numpy().astype(np.int32),
    "attention_mask": enc["attention_mask"].numpy().astype(bool),
    "max_length": np.int32(max_length),
    "prompts": np.array(PROMPTS),
  }
  for name, dtype in (("hidden_fp32", torch.float32), ("hidden_bf16", torch.bfloat16)):
    model = model_cls.from_pretrained(path, dtype=dtype).eval()
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else model
    with torch.no_grad():
      h = encoder(
        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
      ).last_hidden_state
    out[name] = h.float().numpy()
  return out


def build(
  out_dir: str, name: str, config: transformers.T5Config, model_cls, tok, max_length: int, seed: int
) -> None:
  path = os.path.join(out_dir, name)
  os.makedirs(path, exist_ok=True)
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  randomize_norms(model, torch.Generator().manual_seed(seed + 1))
  model.save_pretrained(path, safe_serialization=True)
  tok.save_pretrained(path)
  np.savez_compressed(
    os.path.join(path, "reference.npz"), **reference(model_cls, path, tok, max_length)
  )
  print(name, sorted(os.listdir(path)))


def buckets(out_dir: str) -> None:
  """transformers' bucket function on relative positions -600..600."""
  rel = torch.arange(-600, 601)
  fn = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  out = {"relative_position": rel.numpy().astype(np.int32)}
  for nb, md in BUCKET_CONFIGS:
    out[f"buckets_{nb}_{md}"] = (
      fn(rel, bidirectional=True, num_buckets=nb, max_distance=md).numpy().astype(np.int16)
    )
  os.makedirs(out_dir, exist_ok=True)
  np.savez_compressed(os.path.join(out_dir, "buckets.npz"), **out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
  )
  args = parser.parse_args()
  v10 = transformers.T5Config(
    vocab_size=128,
    d_model=32,
    d_kv=6,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=1,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="relu",
    dropout_rate=0.0,
  )
  build(
    args.out,
    "t5_v1_0",
    v10,
    transformers.T5ForConditionalGeneration,
    sp_tokenizer(),
    max_length=16,
    seed=0,
  )
  v11 = transformers.T5Config(
    vocab_size=384,
    d_model=40,
    d_kv=12,
    d_ff=64,
    num_layers=2,
    num_heads=2,
    relative_attention_num_buckets=16,
    relative_attention_max_distance=24,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    dropout_rate=0.0,
  )
  build(
    args.out,
    "t5_v1_1",
    v11,
    transformers.T5EncoderModel,
    transformers.ByT5Tokenizer(),
    max_length=48,
    seed=1,
  )
  buckets(os.path.join(args.out, "t5_buckets"))


if __name__ == "__main__":
  main()
