"""Parity fixture for imagen_jax/eval/inception.py from pytorch-fid, and weight conversion.

Fixture (tests/fixtures/inception_parity.npz, ~40 KB): pytorch-fid's
``InceptionV3()`` (2048-d block, resize to 299, FID blocks) with the synthetic
weights of ``inception.synthetic_tensor`` — a counter hash, so the test
regenerates the same 24M weights instead of storing 95 MB — run on a few small
uint8 images. Stored: the images, the reference features, the state-dict names
the reference loaded (strict) and a checksum per tensor.

Conversion: pytorch-fid's released weights (pt_inception-2015-12-05-6726825d.pth,
fetched by the user) into the .safetensors file the evaluation CLIs read:

  python tools/make_inception_fixtures.py                      # the fixture
  python tools/make_inception_fixtures.py --convert pt_inception-2015-12-05-6726825d.pth \\
      --out inception_fid.safetensors

Needs torch, torchvision and pytorch-fid 0.3.0 (a separate venv; never the tests).
"""

import argparse
import os
import sys
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from imagen_jax.eval import inception  # noqa: E402  pylint: disable=wrong-import-position

OUT = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  "tests",
  "fixtures",
  "inception_parity.npz",
)
SEED = 0


def synthetic_reference(seed: int) -> tuple[torch.nn.Module, dict]:
  """pytorch-fid's InceptionV3 loaded (strict) with synthetic weights, and those weights."""
  from pytorch_fid import inception as ptfid  # pylint: disable=g-import-not-at-top

  # Build the FID network once without weights, only to learn its state-dict layout.
  with (
    mock.patch.object(ptfid, "load_state_dict_from_url", return_value={}),
    mock.patch.object(torch.nn.Module, "load_state_dict", return_value=None),
  ):
    skeleton = ptfid.fid_inception_v3()
  state = {}
  for name, t in skeleton.state_dict().items():
    if name.endswith("num_batches_tracked"):
      state[name] = torch.zeros_like(t)
    else:
      state[name] = torch.from_numpy(inception.synthetic_tensor(name, tuple(t.shape), seed))
  with mock.patch.object(ptfid, "load_state_dict_from_url", return_value=state):
    model = ptfid.InceptionV3([3]).eval()  # the real constructor: strict load_state_dict
  return model, state


def make_fixture(out: str) -> None:
  model, state = synthetic_reference(SEED)
  rng = np.random.default_rng(0)
  # Two small images (upsampled to 299 inside, as our 64px samples are) and one
  # larger than 299 (downsampled without antialiasing, as pytorch-fid does).
  images = [
    rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8),
    # 8×8 blocks: compresses to a few KB, still crosses pixel edges.
    rng.integers(0, 256, (1, 40, 40, 3), dtype=np.uint8).repeat(8, 1).repeat(8, 2),
  ]
  feats = []
  with torch.no_grad():
    for x in images:
      t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
      feats.append(model(t)[0][:, :, 0, 0].numpy())
  names = sorted(
    n for n in state if not n.endswith("num_batches_tracked") and not n.startswith("fc.")
  )
  sums = np.asarray([float(state[n].double().sum()) for n in names])
  np.savez_compressed(
    out,
    images_small=images[0],
    features_small=feats[0],
    images_large=images[1],
    features_large=feats[1],
    names=np.asarray(names),
    sums=sums,
    seed=SEED,
  )
  print(
    f"wrote {out} ({os.path.getsize(out) // 1024} KB); feature std "
    f"{feats[0].std():.3f}, mean {feats[0].mean():.3f}"
  )


def convert(src: str, out: str) -> None:
  """A pytorch-fid .pth state dict → .safetensors (float32, same names, fc dropped)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  state = torch.load(src, map_location="cpu", weights_only=True)
  tensors = {
    k: v.float().numpy()
    for k, v in state.items()
    if not k.endswith("num_batches_tracked") and not k.startswith("fc.")
  }
  save_file(tensors, out, metadata={"network": inception.NETWORK, "source": os.path.basename(src)})
  inception.load_variables(out)  # Fails loudly if the layout is not the FID network's.
  print(f"wrote {out}: {len(tensors)} tensors")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--convert", help="pytorch-fid .pth weights to convert")
  p.add_argument("--out", default=OUT)
  args = p.parse_args()
  if args.convert:
    convert(args.convert, args.out)
  else:
    make_fixture(args.out)


if __name__ == "__main__":
  main()
