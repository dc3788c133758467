"""The FID InceptionV3 in Flax: pytorch-fid's network, 2048-d pool features.

pytorch-fid's ``InceptionV3`` (block 3, ``use_fid_inception=True``) is the
TensorFlow FID graph (``pt_inception-2015-12-05``) ported to PyTorch:
torchvision's InceptionV3 with three patched blocks, which this module
reproduces layer for layer:

* ``FIDInceptionA`` / ``FIDInceptionC`` / ``FIDInceptionE_1``: the pooling
  branch averages over the valid window only (``count_include_pad=False``);
* ``FIDInceptionE_2`` (``Mixed_7c``): the pooling branch is a 3×3 max pool;
* BatchNorm eps 1e-3 (inference statistics), ReLU after every conv;
* input: images in [0, 1] resized to 299×299 bilinearly without antialiasing
  (``F.interpolate(align_corners=False)``), scaled to [-1, 1]; output: the
  spatial mean of ``Mixed_7c``, [B, 2048].

Weights: a ``.safetensors`` (or ``.npz``) file with pytorch-fid's state-dict
names (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``,
...). ``tools/make_inception_fixtures.py --convert pt_inception-....pth`` writes
it once from pytorch-fid's released weights; nothing is downloaded here.
"""

import os
import zlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NETWORK = "pytorch-fid-inception-v3"  # what produced the features (stored in stats)
FEATURE_DIM = 2048
RESOLUTION = 299  # pytorch-fid's input size
MIN_RESOLUTION = 75  # the smallest input the stride-2 stem accepts


def _pair(v: Any) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
  """conv (no bias) → BatchNorm (eps 1e-3, running statistics) → ReLU."""

  features: int
  kernel: Any = 1
  strides: int = 1
  padding: Any = 0  # int or (pad_h, pad_w), symmetric as in PyTorch

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(
      self.features,
      _pair(self.kernel),
      _pair(self.strides),
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool(x: jax.Array) -> jax.Array:
  """3×3 stride-1 average over the valid part of the window (count_include_pad=False)."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))


def _max_pool_down(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    a = BasicConv(64, name="branch1x1")(x)
    b = BasicConv(48, name="branch5x5_1")(x)
    b = BasicConv(64, 5, padding=2, name="branch5x5_2")(b)
    c = BasicConv(64, name="branch3x3dbl_1")(x)
    c = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(c)
    c = BasicConv(96, 3, padding=1, name="branch3x3dbl_3")(c)
    d = BasicConv(self.pool_features, name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([a, b, c, d], -1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    a = BasicConv(384, 3, 2, name="branch3x3")(x)
    b = BasicConv(64, name="branch3x3dbl_1")(x)
    b = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(b)
    b = BasicConv(96, 3, 2, name="branch3x3dbl_3")(b)
    return jnp.concatenate([a, b, _max_pool_down(x)], -1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    a = BasicConv(192, name="branch1x1")(x)
    b = BasicConv(c7, name="branch7x7_1")(x)
    b = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b)
    b = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b)
    c = BasicConv(c7, name="branch7x7dbl_1")(x)
    c = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(c)
    c = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(c)
    c = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(c)
    c = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(c)
    d = BasicConv(192, name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([a, b, c, d], -1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    a = BasicConv(192, name="branch3x3_1")(x)
    a = BasicConv(320, 3, 2, name="branch3x3_2")(a)
    b = BasicConv(192, name="branch7x7x3_1")(x)
    b = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b)
    b = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b)
    b = BasicConv(192, 3, 2, name="branch7x7x3_4")(b)
    return jnp.concatenate([a, b, _max_pool_down(x)], -1)


class InceptionE(nn.Module):
  pool: Callable[[jax.Array], jax.Array]

  @nn.compact
  def __call__(self, x):
    a = BasicConv(320, name="branch1x1")(x)
    b = BasicConv(384, name="branch3x3_1")(x)
    b = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b),
      ],
      -1,
    )
    c = BasicConv(448, name="branch3x3dbl_1")(x)
    c = BasicConv(384, 3, padding=1, name="branch3x3dbl_2")(c)
    c = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(c),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(c),
      ],
      -1,
    )
    d = BasicConv(192, name="branch_pool")(self.pool(x))
    return jnp.concatenate([a, b, c, d], -1)


class FIDInceptionV3(nn.Module):
  """images [B, H, W, 3] in [-1, 1] (already resized) → pool features [B, 2048]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = BasicConv(32, 3, 2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, 3, name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_down(x)
    x = BasicConv(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_down(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(_avg_pool, name="Mixed_7b")(x)
    x = InceptionE(_max_pool_same, name="Mixed_7c")(x)
    return x.mean((1, 2))


def preprocess(images: jax.Array, resolution: int = RESOLUTION) -> jax.Array:
  """uint8 [B, H, W, 3] → float32 [B, res, res, 3] in [-1, 1], as pytorch-fid.

  Bilinear, half-pixel centers, no antialiasing: ``F.interpolate(mode='bilinear',
  align_corners=False)`` on [0, 1] images, then ``2x - 1``.
  """
  x = images.astype(jnp.float32) / 255.0
  b, _, _, c = x.shape
  x = jax.image.resize(x, (b, resolution, resolution, c), "bilinear", antialias=False)
  return 2.0 * x - 1.0


# ----------------------------------------------------------------------------
# Weights: pytorch-fid state-dict names ↔ Flax variables.

_BN = {
  "weight": ("params", "scale"),
  "bias": ("params", "bias"),
  "running_mean": ("batch_stats", "mean"),
  "running_var": ("batch_stats", "var"),
}


def torch_names(abstract_variables: Any) -> dict[str, tuple[tuple[str, ...], tuple]]:
  """pytorch-fid state-dict name → (Flax variable path, Flax shape)."""
  out = {}
  flat = jax.tree_util.tree_flatten_with_path(abstract_variables)[0]
  inverse = {v: k for k, v in _BN.items()}
  for path, leaf in flat:
    keys = tuple(p.key for p in path)
    collection, *module, leaf_name = keys
    if module[-1] == "conv":
      torch_leaf = "weight"
    else:
      torch_leaf = inverse[(collection, leaf_name)]
    out[".".join(module + [torch_leaf])] = (keys, tuple(leaf.shape))
  return out


def abstract_variables(resolution: int = MIN_RESOLUTION) -> Any:
  """The Flax variables' shapes (``params`` and ``batch_stats``), without computing them."""
  return jax.eval_shape(
    FIDInceptionV3().init,
    jax.random.PRNGKey(0),
    jnp.zeros((1, resolution, resolution, 3), jnp.float32),
  )


def _read_tensors(path: str) -> Any:
  """A name → array getter over a .safetensors or .npz file (lazy for safetensors)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path}: no such file; expected the FID InceptionV3 weights as .safetensors "
      "(tools/make_inception_fixtures.py --convert pt_inception-2015-12-05-6726825d.pth)"
    )
  if path.endswith(".npz"):
    data = np.load(path)
    return set(data.files), lambda name: data[name]
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  f = safe_open(path, "np")
  return set(f.keys()), f.get_tensor


def load_variables(path: str) -> dict:
  """Reads pytorch-fid weights into Flax variables {'params', 'batch_stats'}.

  Raises:
    FileNotFoundError: no such file.
    ValueError: a missing tensor or one of the wrong shape (one line naming the
      file, the tensor and the expected shape).
  """
  names, get = _read_tensors(path)
  variables: dict = {}
  for name, (keys, shape) in torch_names(abstract_variables()).items():
    if name not in names:
      raise ValueError(
        f"{path}: tensor {name!r} missing; expected pytorch-fid's "
        f"InceptionV3 state dict (shape {shape} here)"
      )
    value = np.asarray(get(name), np.float32)
    if value.ndim == 4:  # OIHW → HWIO
      value = value.transpose(2, 3, 1, 0)
    if value.shape != shape:
      raise ValueError(
        f"{path}: tensor {name!r} has shape {value.shape} (as Flax), "
        f"expected {shape}: not pytorch-fid's FID InceptionV3"
      )
    node = variables
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  return variables


def apply(variables: Any, images: jax.Array, resolution: int = RESOLUTION) -> jax.Array:
  """uint8 images [B, H, W, 3] → pool features float32 [B, 2048] (pytorch-fid's)."""
  return FIDInceptionV3().apply(variables, preprocess(images, resolution))


def _unit_hash(name: str, n: int, seed: int) -> np.ndarray:
  """n numbers in [0, 1) from (name, seed), fixed forever (splitmix64 of a counter).

  Not NumPy's RNG: its streams may change between versions, and the parity
  fixture's reference was computed from exactly these numbers.
  """
  salt = np.uint64((zlib.crc32(name.encode()) << 16) + seed)
  with np.errstate(over="ignore"):
    z = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + salt
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
  return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def synthetic_tensor(name: str, shape: Sequence[int], seed: int = 0) -> np.ndarray:
  """A random-weight tensor of pytorch-fid's layout (conv OIHW) for tests and demos.

  Conv kernels He-uniform (activations stay O(1) through the 94 layers),
  BatchNorm scale and variance near 1, shift and mean near 0.
  """
  u = _unit_hash(name, int(np.prod(shape)), seed).reshape(shape)
  leaf = name.rsplit(".", 1)[-1]
  if len(shape) == 4 or name.startswith("fc.weight"):
    fan_in = int(np.prod(shape[1:]))
    value = (2 * u - 1) * np.sqrt(6.0 / fan_in)
  elif leaf in ("weight", "running_var"):
    value = 0.8 + 0.4 * u
  else:  # bias, running_mean
    value = 0.2 * (u - 0.5)
  return value.astype(np.float32)


def synthetic_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """Every tensor ``load_variables`` reads, random (``synthetic_tensor``), torch layout."""
  out = {}
  for name, (_, shape) in torch_names(abstract_variables()).items():
    torch_shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
    out[name] = synthetic_tensor(name, torch_shape, seed)
  return out
