"""Builds the golden CLIP fixture under tests/fixtures/clip_tiny/ (PyTorch + transformers).

Never run by the tests or CI; rerun by hand after changing the fixture:

    pip install -r tools/requirements.txt
    python tools/make_clip_fixtures.py [--out tests/fixtures/clip_tiny]

Writes a tiny random ``CLIPModel`` as a Hugging Face folder (config.json,
model.safetensors, a tiny byte-level BPE CLIP tokenizer, preprocessor_config.json
that resizes and center-crops), and ``reference.npz``: prompts, token ids and
masks, transformers' text embeddings; uint8 images, the image processor's
pixel_values and transformers' image embeddings.
"""

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

PROMPTS = [
  "a red circle in the top left",
  "a blue square in the center",
  "a photo of a cat sitting on the grass, next to an unusually long word: supercalifragilistic",
  "",
]
WORDS = [
  "a",
  "red",
  "blue",
  "circle",
  "square",
  "in",
  "the",
  "top",
  "left",
  "center",
  "photo",
  "of",
  "cat",
]
OUT = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "clip_tiny"
)


def byte_symbols() -> list[str]:
  """The 256 printable stand-ins of byte-level BPE (GPT-2/CLIP), in byte order."""
  keep = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("\xa1"), ord("\xac") + 1),
    *range(ord("\xae"), ord("\xff") + 1),
  ]
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return [out[b] for b in range(256)]


def tiny_tokenizer(max_length: int) -> transformers.CLIPTokenizer:
  """A byte-level BPE CLIP tokenizer: every byte, with and without </w>, plus word merges."""
  chars = byte_symbols()
  vocab_list, merges = chars + [c + "</w>" for c in chars], []
  for word in WORDS:  # merge left to right: (w, o) → wo, (wo, r) → wor, ... word</w>
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    cur = symbols[0]
    for sym in symbols[1:]:
      merges.append((cur, sym))
      cur += sym
      vocab_list.append(cur)
  vocab_list += ["<|startoftext|>", "<|endoftext|>"]
  vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
  merges = list(dict.fromkeys(merges))
  return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=OUT)
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  max_len = 16
  tokenizer = tiny_tokenizer(max_len)
  eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
  bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
  config = transformers.CLIPConfig(
    text_config=dict(
      vocab_size=len(tokenizer),
      hidden_size=32,
      intermediate_size=40,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=max_len,
      hidden_act="quick_gelu",
      bos_token_id=bos,
      eos_token_id=eos,
      pad_token_id=eos,
    ),
    vision_config=dict(
      hidden_size=24,
      intermediate_size=48,
      num_hidden_layers=2,
      num_attention_heads=2,
      image_size=30,
      patch_size=6,
      hidden_act="quick_gelu",
    ),
    projection_dim=20,
  )
  torch.manual_seed(0)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # LayerNorms start at (1, 0): make them distinct
    for name, param in model.named_parameters():
      if "layer_norm" in name or "layrnorm" in name or "post_layernorm" in name:
        param.copy_(torch.randn_like(param) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
  model.save_pretrained(args.out, safe_serialization=True)
  tokenizer.save_pretrained(args.out)
  processor = transformers.CLIPImageProcessor(
    size={"shortest_edge": 32},
    crop_size={"height": 30, "width": 30},
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
  )
  processor.save_pretrained(args.out)

  rng = np.random.default_rng(0)
  # Smooth-ish images (upsampled noise): resampling differences stay realistic.
  images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8).repeat(8, 1).repeat(8, 2)
  pixel_values = processor(images=list(images), return_tensors="pt")["pixel_values"]
  tok = tokenizer(
    PROMPTS, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
  )
  with torch.no_grad():
    text = model.get_text_features(
      input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
    ).pooler_output
    image = model.get_image_features(pixel_values=pixel_values).pooler_output
  np.savez_compressed(
    os.path.join(args.out, "reference.npz"),
    prompts=np.asarray(PROMPTS),
    input_ids=tok["input_ids"].numpy(),
    attention_mask=tok["attention_mask"].numpy(),
    text_embeds=text.numpy(),
    images=images,
    pixel_values=pixel_values.permute(0, 2, 3, 1).numpy(),
    image_embeds=image.numpy(),
  )
  size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
  print(f"wrote {args.out}: {sorted(os.listdir(args.out))}, {size // 1024} KB")
  print(json.dumps({"ids": tok["input_ids"][0].tolist(), "text_std": float(text.std())}))


if __name__ == "__main__":
  main()
