"""CLIP image and text towers in Flax, loaded from a local Hugging Face CLIP folder.

The text tower is ``imagen_jax.text.clip`` (shared with Stable Diffusion's text encoder).

The folder is what ``CLIPModel.save_pretrained`` plus the tokenizer and image
processor write: ``config.json``, ``model.safetensors`` (or sharded),
``tokenizer.json`` / ``vocab.json`` + ``merges.txt``, ``preprocessor_config.json``.
The towers follow transformers' ``CLIPModel``: pre-LayerNorm transformer
layers (quick-GELU or GELU MLPs), a causal text encoder pooled at the first
end-of-text token (``argmax(ids)`` for old configs with ``eos_token_id == 2``),
a ViT pooled at the class token after ``post_layernorm``, and bias-free
projections. ``image_embeds`` / ``text_embeds`` are the projections
(``get_image_features`` / ``get_text_features``), not normalized.

Preprocessing runs in JAX on uint8 images: resize the shorter side to
``size.shortest_edge`` (bicubic, antialiased when shrinking), center crop to
``crop_size``, scale to [0, 1], normalize by ``image_mean`` / ``image_std``.
Transformers' processor resizes uint8 pixels and rounds them; this does not,
so pixel values differ from it by up to ~1/255 before normalization.
"""

import dataclasses
import json
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.safetensors_dir import WeightsReader
from imagen_jax.text.clip import CLIPTextConfig, Encoder, TextTransformer, TowerConfig, hf_name


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """What the Flax towers need from a CLIP config.json."""

  text: TowerConfig
  vision: TowerConfig
  vocab_size: int
  max_length: int  # max_position_embeddings of the text tower
  eos_token_id: int
  image_size: int
  patch_size: int
  projection_dim: int

  @classmethod
  def from_json(cls, config: dict) -> "CLIPConfig":
    """Reads transformers' CLIPConfig dict (config.json)."""
    t, v = config["text_config"], config["vision_config"]

    return cls(
      text=TowerConfig.from_json(t),
      vision=TowerConfig.from_json(v),
      vocab_size=t["vocab_size"],
      max_length=t.get("max_position_embeddings", 77),
      eos_token_id=t.get("eos_token_id", 2),
      image_size=v["image_size"],
      patch_size=v["patch_size"],
      projection_dim=config.get("projection_dim", 512),
    )


class VisionTower(nn.Module):
  """normalized pixels [B, S, S, 3] → pooled class-token state [B, D]."""

  config: CLIPConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    c, v = self.config, self.config.vision
    p = c.patch_size
    x = nn.Conv(
      v.hidden_size, (p, p), (p, p), padding="VALID", use_bias=False, name="patch_embedding"
    )(pixels)
    b = x.shape[0]
    x = x.reshape(b, -1, v.hidden_size)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (v.hidden_size,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, v.hidden_size)), x], 1)
    x = (
      x
      + nn.Embed(x.shape[1], v.hidden_size, name="position_embedding")(jnp.arange(x.shape[1]))[None]
    )
    x = nn.LayerNorm(v.eps, name="pre_layrnorm")(x)
    x = Encoder(v, name="encoder")(x)
    return nn.LayerNorm(v.eps, name="post_layernorm")(x[:, 0])


class CLIP(nn.Module):
  """Both towers and their projections (``text_projection``, ``visual_projection``)."""

  config: CLIPConfig

  def setup(self):
    c = self.config
    self.text_model = TextTransformer(
      CLIPTextConfig(c.text, c.vocab_size, c.max_length, c.eos_token_id)
    )
    self.vision_model = VisionTower(self.config)
    self.text_projection = nn.Dense(self.config.projection_dim, use_bias=False)
    self.visual_projection = nn.Dense(self.config.projection_dim, use_bias=False)

  def __call__(self, ids, mask, pixels):
    return self.encode_text(ids, mask), self.encode_image(pixels)

  def encode_text(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids int [B, L], mask [B, L] → text_embeds [B, E]."""
    return self.text_projection(self.text_model(ids, mask)[1])

  def encode_image(self, pixels: jax.Array) -> jax.Array:
    """normalized pixels [B, S, S, 3] → image_embeds [B, E]."""
    return self.visual_projection(self.vision_model(pixels))


# ----------------------------------------------------------------------------
# Preprocessing.


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """preprocessor_config.json's resize / crop / normalization."""

  shortest_edge: int
  crop: tuple[int, int]  # (height, width)
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @classmethod
  def from_json(cls, c: dict, image_size: int) -> "Preprocess":
    size = c.get("size", image_size)
    edge = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    crop = c.get("crop_size", image_size)
    crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
    return cls(
      int(edge),
      crop,
      tuple(c.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
      tuple(c.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
    )

  def __call__(self, images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] → float32 [B, crop_h, crop_w, 3], normalized."""
    b, h, w, ch = images.shape
    scale = self.shortest_edge / min(h, w)
    nh, nw = max(self.shortest_edge, round(h * scale)), max(self.shortest_edge, round(w * scale))
    x = images.astype(jnp.float32)
    if (nh, nw) != (h, w):
      x = jax.image.resize(x, (b, nh, nw, ch), "bicubic", antialias=True)
      x = jnp.clip(x, 0.0, 255.0)
    ch_, cw = self.crop
    top, left = (nh - ch_) // 2, (nw - cw) // 2
    x = x[:, top : top + ch_, left : left + cw] / 255.0
    return (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)


# ----------------------------------------------------------------------------
# Loading a Hugging Face folder.


def _read(
  reader: WeightsReader, names: set, name: str, kind: str, shape: tuple, path: str
) -> np.ndarray:
  if name not in names:
    raise ValueError(
      f"{path}: tensor {name!r} missing; expected a transformers CLIPModel "
      f"checkpoint (shape {shape} here)"
    )
  value = np.asarray(reader.get(name), np.float32)
  if kind == "dense":
    value = value.T
  elif kind == "conv":  # OIHW → HWIO
    value = value.transpose(2, 3, 1, 0)
  if value.shape != tuple(shape):
    raise ValueError(
      f"{path}: tensor {name!r} has shape {value.shape} (as Flax), expected "
      f"{tuple(shape)} from config.json"
    )
  return value


def load_params(path: str, config: CLIPConfig) -> dict:
  """Reads the CLIPModel weights of folder `path` into CLIP's Flax params."""
  model = CLIP(config)
  s = config.image_size
  abstract = jax.eval_shape(
    model.init,
    jax.random.PRNGKey(0),
    jnp.zeros((1, config.max_length), jnp.int32),
    jnp.ones((1, config.max_length), jnp.int32),
    jnp.zeros((1, s, s, 3), jnp.float32),
  )["params"]
  abstract = nn.unbox(abstract)
  params: dict = {}
  with WeightsReader(path, weights_name="model") as reader:
    names = reader.keys()
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
      keys = tuple(k.key for k in key_path)
      name, kind = hf_name(keys)
      node = params
      for k in keys[:-1]:
        node = node.setdefault(k, {})
      node[keys[-1]] = _read(reader, names, name, kind, leaf.shape, path)
  return params


class CLIPScorer:
  """A loaded CLIP folder: tokenizer, preprocessing and jitted, mesh-sharded towers.

  Attributes:
    config: the ``CLIPConfig``; preprocess: the ``Preprocess``; path: the folder.
  """

  def __init__(self, path: str, *, mesh=None, rules=None, batch_size: int = 64):
    """Loads `path` (config.json, safetensors, tokenizer, preprocessor_config.json).

    Raises:
      FileNotFoundError: the folder or one of its files is missing (named).
      ValueError: a tensor missing or of the wrong shape (named, with the expected shape).
    """
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    from imagen_jax.eval import features  # pylint: disable=g-import-not-at-top

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
      raise FileNotFoundError(
        f"{config_path}: no such file; expected a Hugging Face CLIP "
        "folder (config.json, model.safetensors, tokenizer files, "
        "preprocessor_config.json)"
      )
    with open(config_path) as f:
      self.config = CLIPConfig.from_json(json.load(f))
    pre_path = os.path.join(path, "preprocessor_config.json")
    pre = {}
    if os.path.isfile(pre_path):
      with open(pre_path) as f:
        pre = json.load(f)
    self.preprocess = Preprocess.from_json(pre, self.config.image_size)
    self.path = path
    self.tokenizer = AutoTokenizer.from_pretrained(path)
    params = load_params(path, self.config)
    model = CLIP(self.config)

    def image_fn(params, images):
      return model.apply({"params": params}, self.preprocess(images), method=CLIP.encode_image)

    def text_fn(params, ids, mask):
      return model.apply({"params": params}, ids, mask, method=CLIP.encode_text)

    self._images = features.FeatureExtractor(
      image_fn, params, mesh=mesh, rules=rules, batch_size=batch_size
    )
    self._text = features.FeatureExtractor(
      text_fn, self._images.variables, mesh=mesh, rules=rules, batch_size=batch_size
    )

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [N, L], mask int32 [N, L]), padded and truncated to max_length."""
    tok = self.tokenizer(
      list(prompts),
      padding="max_length",
      truncation=True,
      max_length=self.config.max_length,
      return_tensors="np",
    )
    return tok["input_ids"].astype(np.int32), tok["attention_mask"].astype(np.int32)

  def image_embeds(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
    """uint8 [N, H, W, 3] → float32 [N, E] (unnormalized)."""
    return self._images(np.asarray(images, np.uint8), progress=progress, desc="CLIP images")

  def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
    """N prompts → float32 [N, E] (unnormalized)."""
    return self._text(*self.tokenize(prompts))

  def scores(
    self, images: np.ndarray, prompts: Sequence[str], progress: bool = False
  ) -> np.ndarray:
    """Per-image CLIP score 100 · max(cos, 0) against its prompt: float64 [N]."""
    from imagen_jax.eval import metrics  # pylint: disable=g-import-not-at-top

    if len(images) != len(prompts):
      raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return metrics.clip_scores(self.image_embeds(images, progress), self.text_embeds(prompts))
