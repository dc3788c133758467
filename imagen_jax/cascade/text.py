"""The cascade's text encoders: one per distinct text tower, each prompt encoded once by each.

IF and Imagen stages share the cascade's T5 (``config.text``, ``text.max_length``
tokens); a latent (Stable Diffusion, x4 upscaler) stage brings its own CLIP tower
(``stages.NAME.text_encoder``: the converted folder and the penultimate-layer flag,
the tokenizer's length, 77 for SD). ``encoder_key`` names the tower a stage uses;
``load_encoders`` loads each distinct one once; ``TextRows`` encodes a call's prompts
(and negative prompts) once per encoder and the empty prompt once per cascade and
encoder, and hands every stage its encoder's rows.
"""

from typing import Any, Mapping, Sequence

import numpy as np

from imagen_jax import run as run_lib
from imagen_jax.stages import stage_kind
from imagen_jax.text import TextEncoder
from imagen_jax.text.clip import CLIPTextConfig
from imagen_jax.text.clip_encoder import CLIPEncoder, load_tokenizer

T5 = ("t5",)


def encoder_key(stage_config: Any) -> tuple:
  """Which text tower a stage takes: ``T5`` or ('clip', folder, penultimate)."""
  if stage_kind(stage_config) != "latent":
    return T5
  spec = stage_config.get("text_encoder") or {}
  if not spec.get("folder"):
    raise ValueError(
      f"stage {stage_config.name}: a latent stage needs text_encoder.folder (a converted "
      "Stable Diffusion folder holding its CLIP tower)"
    )
  return ("clip", str(spec["folder"]), bool(spec.get("penultimate", False)))


def load_clip(folder: str, penultimate: bool, mesh: Any = None, rules: Any = None) -> CLIPEncoder:
  """The CLIP text encoder of a converted Stable Diffusion folder (its tokenizer/ too).

  Raises:
    FileNotFoundError: the folder has no tokenizer (one line, ``run.sd_tokenizer_dir``).
  """
  text, params, tokenizer = run_lib.read_sd_text_encoder(folder)
  config = CLIPTextConfig.from_dict(text)
  return CLIPEncoder(
    config,
    params,
    load_tokenizer(tokenizer),
    skip_layers=1 if penultimate else 0,
    mesh=mesh,
    rules=rules,
  )


def load_encoders(config: Any, mesh: Any = None, rules: Any = None) -> dict:
  """Stage name → its text encoder, each distinct tower loaded once (the T5 only when
  a stage takes it)."""
  loaded, out = {}, {}
  for name in config.stage_order:
    key = encoder_key(config.stages[name])
    if key not in loaded:
      if key == T5:
        loaded[key] = TextEncoder.from_config(config.text, mesh, rules)
      else:
        loaded[key] = load_clip(key[1], key[2], mesh, rules)
    out[name] = loaded[key]
  return out


def text_length(encoder: Any, config: Any) -> int:
  """L for an encoder: a CLIP tower's own (its tokenizer's ``max_length``), the T5's
  ``config.text.max_length``."""
  own = getattr(encoder, "max_length", None)  # CLIPEncoder has one; TextEncoder takes any L
  return int(own) if own else int(config.text.max_length)


class TextRows:
  """Encodes a call's prompts once per distinct encoder; the empty prompt once per cascade.

  Attributes:
    encoders: stage name → encoder (the same object for stages that share one).
    lengths: stage name → L, the tokens per prompt of its encoder.
  """

  def __init__(self, encoders: Mapping[str, Any], lengths: Mapping[str, int]):
    self.encoders = dict(encoders)
    self.lengths = dict(lengths)
    self._uncond = {}  # id(encoder) → (emb [L, D], mask [L])

  def _distinct(self) -> list:
    """[(encoder, L, stage names)], one entry per distinct encoder object, stage order."""
    groups = {}
    for name, enc in self.encoders.items():
      groups.setdefault(id(enc), (enc, self.lengths[name], []))[2].append(name)
    return list(groups.values())

  def uncond(self, encoder: Any, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The empty prompt's (emb [L, D], mask [L]) of one encoder, encoded once."""
    if id(encoder) not in self._uncond:
      emb, mask = encoder.encode([""], length)
      self._uncond[id(encoder)] = (np.asarray(emb)[0], np.asarray(mask)[0])
    return self._uncond[id(encoder)]

  def rows(self, prompts: Sequence[str], negative: Any, num_per_prompt: int) -> dict:
    """Stage name → {'text': ..., 'uncond': ...} of a call.

    Each is {'text_emb' [N, L, D], 'text_mask' [N, L]}, N = P · num_per_prompt, in the
    stage's encoder's L and D; the unconditional rows are the negative prompts' (one
    for all prompts, or one per prompt) or the empty prompt's.

    Raises:
      ValueError: neither one negative prompt nor one per prompt.
    """
    if negative is None or negative == "" or negative == []:
      negative = None
    else:
      negative = [negative] if isinstance(negative, str) else list(negative)
      if len(negative) not in (1, len(prompts)):
        raise ValueError(
          f"negative prompts: give one for all prompts or one per prompt "
          f"({len(prompts)}), got {len(negative)}"
        )
      negative = negative * (len(prompts) // len(negative))
    out = {}
    for encoder, length, names in self._distinct():
      rows = self._encode(encoder, length, list(prompts), negative, num_per_prompt)
      out.update(dict.fromkeys(names, rows))
    return out

  def _encode(self, encoder, length, prompts, negative, num_per_prompt) -> dict:
    emb, mask = encoder.encode(prompts, length)
    emb = np.repeat(np.asarray(emb), num_per_prompt, axis=0)
    mask = np.repeat(np.asarray(mask), num_per_prompt, axis=0)
    if negative is None:
      u_emb, u_mask = self.uncond(encoder, length)
      u_emb = np.broadcast_to(u_emb, emb.shape).astype(emb.dtype)
      u_mask = np.broadcast_to(u_mask, mask.shape)
    else:
      u_emb, u_mask = encoder.encode(negative, length)
      u_emb = np.repeat(np.asarray(u_emb), num_per_prompt, axis=0)
      u_mask = np.repeat(np.asarray(u_mask), num_per_prompt, axis=0)
    return {
      "text": {"text_emb": emb, "text_mask": mask},
      "uncond": {"text_emb": u_emb, "text_mask": u_mask},
    }
