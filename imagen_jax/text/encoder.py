"""`TextEncoder`: a frozen T5 encoder plus its tokenizer, ready to encode prompts.

    enc = TextEncoder.from_pretrained("/ckpt/t5-v1_1-xxl", dtype=jnp.bfloat16,
                                      mesh=mesh, rules=rules)
    emb, mask = enc.encode(["a red cube", ""], max_length=77)
    # emb: [2, 77, 4096] bfloat16, mask: [2, 77] bool

`encode` runs one jitted function; batches of the same shape never retrace.
Parameters live on device (sharded by their logical axis names when a mesh and
rules are given); inside a training step call `encode_tokens` or apply
`module` to `params` directly.
"""

import logging
import os
import sys
import threading
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import axes
from imagen_jax import parallel
from imagen_jax.text import loading
from imagen_jax.text.t5 import T5Config, T5Encoder, relative_position_buckets

logger = logging.getLogger(__name__)

_DTYPES = {
  "float32": jnp.float32,
  "fp32": jnp.float32,
  "bfloat16": jnp.bfloat16,
  "bf16": jnp.bfloat16,
}
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def resolve_dtype(dtype: Any) -> Any:
  """Maps ``jnp.float32 | jnp.bfloat16 | 'float32' | 'bf16' ...`` to a jnp dtype.

  Raises:
    ValueError: any other dtype (T5 overflows in float16).
  """
  if isinstance(dtype, str) and dtype.lower() in _DTYPES:
    return _DTYPES[dtype.lower()]
  try:
    name = np.dtype(dtype).name
  except TypeError:
    name = None
  if name in ("float32", "bfloat16"):
    return _DTYPES[name]
  raise ValueError(f"unknown dtype {dtype!r} for the T5 encoder; expected float32 or bfloat16")


def _drop_torch_advice(record: logging.LogRecord) -> bool:
  return not record.getMessage().startswith("PyTorch was not found")


def import_transformers():
  """``transformers``, imported without its "PyTorch was not found" advice.

  We use its tokenizers only, never its PyTorch models, so that line (logged by
  ``import transformers`` when torch is absent) is noise on every first screen.
  Only that message is filtered, on the library's own logger.
  """
  if "transformers" not in sys.modules:
    logging.getLogger("transformers").addFilter(_drop_torch_advice)
  import transformers  # pylint: disable=g-import-not-at-top

  return transformers


def _load_tokenizer(path: str):
  """Loads a local tokenizer (sentencepiece-style T5 or ByT5), never downloading."""
  AutoTokenizer = import_transformers().AutoTokenizer  # noqa: N806

  if not os.path.isdir(path) or not any(
    os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES
  ):
    raise FileNotFoundError(f"no tokenizer files in {path}: expected one of {_TOKENIZER_FILES}")
  return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _byt5_tokenizer():
  return import_transformers().ByT5Tokenizer()


def locality_bias(config: T5Config, slopes: Sequence[float]) -> jax.Array:
  """[num_buckets, num_heads] T5 relative-position bias: -slope_h × the smallest
  distance of each bucket (ALiBi-shaped; see ``TextEncoder.random_init``).

  Raises:
    ValueError: not one slope per head, or a negative slope.
  """
  slopes = [float(s) for s in slopes]
  if len(slopes) != config.num_heads or min(slopes) < 0:
    raise ValueError(
      f"text random_locality needs {config.num_heads} slopes >= 0 (one per head), got {slopes}"
    )
  n, far = config.relative_attention_num_buckets, config.relative_attention_max_distance
  # Row `far` of the bucket matrix: the buckets of offsets -far..far.
  buckets = relative_position_buckets(2 * far + 1, 2 * far + 1, n, far)[far]
  distance = np.full(n, float(far))
  for b, offset in zip(buckets, range(-far, far + 1)):
    distance[b] = min(distance[b], abs(offset))
  return jnp.asarray(-distance[:, None] * np.asarray(slopes)[None, :], jnp.float32)


class TextEncoder:
  """A frozen T5 encoder with its tokenizer, params on device.

  Attributes:
    config: the `T5Config`.
    module: the `T5Encoder` Flax module.
    params: ``{'params': ...}`` device arrays (sharded when a mesh is given).
    tokenizer: a transformers tokenizer.
    dtype: compute and output dtype.
    mesh: the mesh or None.
    rules: the logical-axis rules (empty without a mesh).
    trace_count: how often the jitted encode function has been traced.
  """

  def __init__(
    self,
    config: T5Config,
    params: Any,
    tokenizer: Any,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: Any = None,
    rules: Sequence[tuple[str, Any]] | None = None,
  ):
    """Wraps ready params; prefer `from_pretrained` or `random_init`."""
    self.config = config
    self.dtype = resolve_dtype(dtype)
    self.param_dtype = resolve_dtype(param_dtype or self.dtype)
    self.mesh = mesh
    self.rules = tuple(rules or ()) if mesh is not None else ()
    self.module = T5Encoder(config, dtype=self.dtype, param_dtype=self.param_dtype, mesh=mesh)
    self.params = params
    self.tokenizer = tokenizer
    if len(tokenizer) > config.vocab_size:
      raise ValueError(
        f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}"
      )
    self.trace_count = 0
    self._tokenizer_lock = threading.Lock()
    self._encode_fn = jax.jit(self._apply)

  @property
  def embed_dim(self) -> int:
    """D, the width of the embeddings."""
    return self.config.d_model

  @staticmethod
  def _setup(
    config: T5Config, dtype: Any, param_dtype: Any, mesh: Any, rules: Any
  ) -> tuple[Any, Any]:
    """(boxed abstract params, per-param shardings or None) for a config."""
    dtype = resolve_dtype(dtype)
    module = T5Encoder(config, dtype=dtype, param_dtype=resolve_dtype(param_dtype or dtype))
    ids = jnp.zeros((1, 8), jnp.int32)
    boxed = jax.eval_shape(module.init, jax.random.key(0), ids, ids > 0)
    return boxed, parallel.logical_shardings(boxed, mesh, rules)

  @classmethod
  def from_pretrained(
    cls,
    path: str,
    dtype: Any = jnp.float32,
    *,
    param_dtype: Any = None,
    mesh: Any = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    tokenizer: Any = None,
  ) -> "TextEncoder":
    """Loads the encoder of a local Hugging Face T5 checkpoint.

    Args:
      path: directory with config.json, model.safetensors (or a sharded
        index) and tokenizer files.
      dtype: compute/output dtype, float32 or bfloat16.
      param_dtype: storage dtype (default: `dtype`).
      mesh: optional `jax.sharding.Mesh`; params are placed sharded on it.
      rules: logical-axis rules for the mesh (e.g.
        ``imagen_jax.parallel.logical_rules('fsdp')``).
      tokenizer: a tokenizer object or a directory to load one from
        (default: `path`).

    Returns:
      The encoder. Only encoder tensors are read, one at a time.
    """
    config = loading.read_config(path)
    boxed, shardings = cls._setup(config, dtype, param_dtype, mesh, rules)
    params = loading.load_params(
      path, config, nn.meta.unbox(boxed), shardings, resolve_dtype(param_dtype or dtype)
    )
    tok = tokenizer if tokenizer is not None else path
    tok = _load_tokenizer(tok) if isinstance(tok, (str, os.PathLike)) else tok
    return cls(config, params, tok, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)

  @classmethod
  def from_config(
    cls, text_config: Any, mesh: Any = None, rules: Sequence[tuple[str, Any]] | None = None
  ) -> "TextEncoder":
    """The frozen encoder a cascade config names (``config.text``).

    Args:
      text_config: ``path`` (a local Hugging Face T5 directory, or '' for a
        random encoder built from ``random`` and ``seed``), ``tokenizer`` (a
        tokenizer directory; '' = the one in ``path``, or ByT5 bytes for a
        random encoder), ``dtype`` and ``dim`` (the width the UNets expect; checked).
      mesh, rules: as in `from_pretrained`.
    """
    tokenizer = text_config.get("tokenizer") or None
    if text_config.get("fit_tokenizer") and not tokenizer:
      raise ValueError(
        f"config.text.fit_tokenizer={text_config.fit_tokenizer!r}: the tokenizer is fitted "
        "by train.py and saved with the run; read the run's config (run.read_config(WORKDIR)) "
        "or set config.text.tokenizer to its folder"
      )
    if text_config.get("path"):
      enc = cls.from_pretrained(
        text_config.path, dtype=text_config.dtype, mesh=mesh, rules=rules, tokenizer=tokenizer
      )
    else:
      enc = cls.random_init(
        dict(text_config.random),
        seed=text_config.seed,
        locality=tuple(text_config.get("random_locality") or ()),
        dtype=text_config.dtype,
        mesh=mesh,
        rules=rules,
        tokenizer=_load_tokenizer(tokenizer) if tokenizer else None,
      )
    if text_config.get("dim") is not None and enc.embed_dim != text_config.dim:
      raise ValueError(
        f"config.text.dim={text_config.dim} but the text encoder gives "
        f"{enc.embed_dim}-wide embeddings"
      )
    return enc

  @classmethod
  def random_init(
    cls,
    config: T5Config | Mapping[str, Any] | None = None,
    seed: int = 0,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: Any = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    tokenizer: Any = None,
    locality: Sequence[float] = (),
  ) -> "TextEncoder":
    """A small, deterministic, randomly initialized T5 with the ByT5 tokenizer.

    Args:
      config: a `T5Config`, a mapping of its fields (e.g. a ConfigDict), or
        None for the default demo size (4 layers, width 128, 384 tokens).
      seed: the init seed; the same seed gives the same params.
      dtype, param_dtype, mesh, rules: as in `from_pretrained`.
      tokenizer: defaults to the byte-level ByT5 tokenizer (no files needed).
      locality: one slope per head, or empty. A random T5's attention is
        nearly uniform, so every token's output is its own embedding plus the
        whole caption's average: a bag of words. With slopes, head h's
        relative-position bias is ``-slope_h * distance`` (ALiBi's shape), so
        a token's output mixes in its neighbours first ("right" in "bottom
        right" carries "bottom"). The bias table is an ordinary T5 parameter:
        this is an initialization, not another model.

    Returns:
      The encoder, params created directly sharded when a mesh is given.
    """
    if config is None:
      config = T5Config()
    elif not isinstance(config, T5Config):
      config = T5Config.from_dict(dict(config), strict=True)
    _, shardings = cls._setup(config, dtype, param_dtype, mesh, rules)
    store = resolve_dtype(param_dtype or dtype)
    ids = jnp.zeros((1, 8), jnp.int32)

    table = locality_bias(config, locality) if locality else None

    def init(rng):
      # Drawn in float32 whatever the dtype, so every dtype gets one model.
      params = nn.meta.unbox(T5Encoder(config).init(rng, ids, ids > 0))
      if table is not None:
        params["params"]["relpos_bias"] = table
      return jax.tree.map(lambda p: p.astype(store), params)

    params = parallel.run_init(
      init, jax.random.key(seed), shardings if mesh is not None else None, mesh
    )
    tok = tokenizer if tokenizer is not None else _byt5_tokenizer()
    return cls(config, params, tok, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)

  def tokenize(self, prompts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes, pads to `max_length` and truncates longer prompts.

    Args:
      prompts: B strings ("" gives the unconditional prompt: just EOS).
      max_length: L, tokens per prompt including EOS.

    Returns:
      (ids [B, L] int32, mask [B, L] bool). Logs one warning with the number
      of prompts that were cut.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
      raise TypeError(f"prompts must be a list of strings, got {type(prompts)}")
    if not prompts:
      raise ValueError("prompts is empty: encode needs at least one prompt")
    if not all(isinstance(p, str) for p in prompts):
      raise TypeError("every prompt must be a str")
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    prompts = list(prompts)
    with self._tokenizer_lock:  # fast tokenizers refuse concurrent use (prefetch thread)
      return self._tokenize(prompts, max_length)

  def _tokenize(self, prompts: list, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    full = self.tokenizer(prompts)["input_ids"]
    cut = sum(len(x) > max_length for x in full)
    if cut:
      logger.warning(
        "%d of %d prompts were longer than max_length=%d tokens and were truncated",
        cut,
        len(prompts),
        max_length,
      )
    tok = self.tokenizer(
      prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np"
    )
    return (tok["input_ids"].astype(np.int32), tok["attention_mask"].astype(bool))

  def apply_fn(self, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """The pure encoder, ``(params, ids [B, L], mask [B, L]) -> emb [B, L, D]``.

    For use inside another jitted function (the train step), which passes
    ``self.params`` in and runs under the mesh and the rules.
    """
    return self.module.apply(params, ids, mask)

  def _apply(self, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    self.trace_count += 1  # Runs at trace time only.
    with nn.logical_axis_rules(self.rules):
      return self.module.apply(params, ids, mask)

  def _batch_shards(self) -> tuple[int, Any]:
    """(number of batch shards, input sharding) under the mesh and rules."""
    if self.mesh is None:
      return 1, None
    spec = nn.logical_to_mesh_axes((axes.BATCH, axes.LENGTH), self.rules)
    entry = spec[0]
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    n = int(np.prod([self.mesh.shape[a] for a in names]))
    return n, jax.sharding.NamedSharding(self.mesh, spec)

  def encode_tokens(self, ids: np.ndarray, mask: np.ndarray) -> jax.Array:
    """Runs the jitted encoder on token ids.

    Args:
      ids: [B, L] int token ids.
      mask: [B, L] bool, True for real tokens.

    Returns:
      [B, L, D] embeddings in `dtype` (batch-sharded under a mesh).
    """
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
    b = ids.shape[0]
    n, sharding = self._batch_shards()
    pad = -b % n  # The batch must divide over the data-parallel devices.
    if pad:
      ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), np.int32)])
      mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
    if sharding is not None:
      ids, mask = jax.device_put(ids, sharding), jax.device_put(mask, sharding)
    emb = self._encode_fn(self.params, ids, mask)
    return emb[:b] if pad else emb

  def encode(self, prompts: Sequence[str], max_length: int) -> tuple[jax.Array, jax.Array]:
    """Encodes prompts.

    Args:
      prompts: B strings; ``[""]`` gives the unconditional embedding used by
        classifier-free guidance.
      max_length: L; shorter prompts are padded, longer ones truncated.

    Returns:
      (emb [B, L, D] in `dtype`, mask [B, L] bool).
    """
    ids, mask = self.tokenize(prompts, max_length)
    return self.encode_tokens(ids, mask), jnp.asarray(mask)
