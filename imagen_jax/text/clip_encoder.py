"""`CLIPEncoder`: a frozen CLIP text tower plus its tokenizer, with `TextEncoder`'s interface.

    enc = CLIPEncoder(config, params, load_tokenizer("sd/sd15/tokenizer"))
    emb, mask = enc.encode(["a red cube", ""], enc.max_length)
    # emb: [2, 77, 768] float32, mask: [2, 77] bool

Stable Diffusion's stages (and the x4 upscaler) take CLIP text states; the cascade
holds one encoder per distinct text tower and calls ``encode(prompts, max_length)`` on
each, as it does on the T5 ``TextEncoder``. Tokenization is diffusers' pipelines':
padded to ``max_length`` (the tokenizer's ``model_max_length``, 77 for SD, capped by the
tower's position embeddings) and truncated; the tower sees the ids without an attention
mask (diffusers' SD pipelines pass none, so the padding tokens' states are the
pipeline's). ``skip_layers=1`` gives the penultimate layer (the stage's
``text_encoder.penultimate``). The mask returned marks the real tokens; SD's UNet
ignores it. The model is ``text.clip.CLIPTextModel`` (the package's one CLIP tower).
"""

import logging
import os
import threading
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import parallel
from imagen_jax.text.clip import CLIPTextConfig, CLIPTextModel
from imagen_jax.text.encoder import import_transformers

logger = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
# transformers' "no limit" model_max_length (a tokenizer_config.json without one).
_NO_LIMIT = 10**9


def load_tokenizer(path: str):
  """A local CLIP tokenizer folder (what a pipeline's ``tokenizer/`` holds), never downloading.

  Raises:
    FileNotFoundError: no tokenizer files in ``path`` (named).
  """
  if not os.path.isdir(path) or not any(
    os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES
  ):
    raise FileNotFoundError(f"no tokenizer files in {path}: expected one of {TOKENIZER_FILES}")
  return import_transformers().AutoTokenizer.from_pretrained(path, local_files_only=True)


def text_length(config: CLIPTextConfig, tokenizer: Any) -> int:
  """L: the tokenizer's ``model_max_length``, capped by the tower's positions."""
  limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
  return min(limit, config.max_length) if 0 < limit < _NO_LIMIT else config.max_length


def abstract_params(module: CLIPTextModel, mesh: Any = None, rules: Any = None) -> Any:
  """The tower's ``{'params': ...}`` as ShapeDtypeStructs, sharded by logical names under
  a mesh (ahead-of-time compiles: nothing allocated)."""
  boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  if mesh is None:
    return nn.unbox(boxed)
  shardings = parallel.logical_shardings(boxed, mesh, tuple(rules or ()))
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
  )


class CLIPEncoder:
  """A frozen CLIP text tower with its tokenizer, params on device.

  Attributes:
    config: the ``CLIPTextConfig``.
    module: the ``CLIPTextModel`` (with ``skip_layers``).
    params: ``{'params': ...}`` device arrays (sharded by logical names under a mesh).
    tokenizer: a transformers tokenizer.
    max_length: L, the tokens per prompt the cascade pads to.
    trace_count: how often the jitted encode function has been traced.
  """

  def __init__(
    self,
    config: CLIPTextConfig,
    params: Any,
    tokenizer: Any,
    *,
    skip_layers: int = 0,
    dtype: Any = jnp.float32,
    mesh: Any = None,
    rules: Optional[Sequence] = None,
  ):
    """Wraps a tower's params (unboxed, ``{'params': ...}`` or the bare tree).

    Raises:
      ValueError: a tokenizer with more tokens than the tower's vocabulary.
    """
    self.config = config
    dtype = jnp.dtype(dtype)
    self.module = CLIPTextModel(config, skip_layers=skip_layers, dtype=dtype, param_dtype=dtype)
    self.tokenizer = tokenizer
    if len(tokenizer) > config.vocab_size:
      raise ValueError(
        f"the CLIP tokenizer has {len(tokenizer)} tokens but the text encoder's vocab_size "
        f"is {config.vocab_size}"
      )
    self.max_length = text_length(config, tokenizer)
    params = nn.unbox(params)
    params = params if set(params) == {"params"} else {"params": params}
    self.mesh = mesh
    self.rules = tuple(rules or ()) if mesh is not None else ()
    if mesh is not None:
      boxed = jax.eval_shape(self.module.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
      params = jax.device_put(params, parallel.logical_shardings(boxed, mesh, self.rules))
    else:
      params = jax.tree.map(jnp.asarray, params)
    self.params = params
    self.trace_count = 0
    self._tokenizer_lock = threading.Lock()
    self._encode_fn = jax.jit(self._apply)

  @property
  def embed_dim(self) -> int:
    """D, the width of the text states."""
    return self.config.tower.hidden_size

  def tokenize(self, prompts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, L] int32, mask [B, L] bool): padded to ``max_length``, longer prompts cut
    (one warning with their number)."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
      raise TypeError("prompts must be a non-empty list of strings")
    if not 1 <= max_length <= self.config.max_length:
      raise ValueError(
        f"max_length must be in [1, {self.config.max_length}] (the CLIP tower's positions), "
        f"got {max_length}"
      )
    with self._tokenizer_lock:  # fast tokenizers refuse concurrent use
      cut = sum(len(x) > max_length for x in self.tokenizer(list(prompts))["input_ids"])
      tok = self.tokenizer(
        list(prompts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="np",
      )
    if cut:
      logger.warning(
        "%d of %d prompts were longer than the CLIP tokenizer's %d tokens and were truncated",
        cut,
        len(prompts),
        max_length,
      )
    return tok["input_ids"].astype(np.int32), tok["attention_mask"].astype(bool)

  def apply_fn(self, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """The pure tower, ``(params, ids [B, L], mask [B, L]) -> states [B, L, D]``, as
    ``TextEncoder.apply_fn``: for the train step, which passes ``self.params`` in and
    runs under the mesh and the rules. ``mask`` is unused (the pipelines pass none)."""
    del mask
    return self.module.apply(params, ids)

  def _apply(self, params: Any, ids: jax.Array) -> jax.Array:
    self.trace_count += 1  # runs at trace time only
    with nn.logical_axis_rules(self.rules):
      return self.module.apply(params, ids)

  def encode_tokens(self, ids: np.ndarray) -> jax.Array:
    """The jitted tower on token ids [B, L] int → text states [B, L, D]."""
    return self._encode_fn(self.params, jnp.asarray(ids, jnp.int32))

  def encode(self, prompts: Sequence[str], max_length: int) -> tuple[jax.Array, jax.Array]:
    """Encodes prompts: (emb [B, L, D] float, mask [B, L] bool); ``[""]`` is the
    unconditional row of guidance (BOS, EOS, padding: diffusers' empty prompt)."""
    ids, mask = self.tokenize(prompts, max_length)
    return self.encode_tokens(ids), jnp.asarray(mask)
