"""Checks with real diffusers that an export-diffusers folder loads and matches.

Never run by the tests or CI (it needs PyTorch + diffusers); run by hand after
changing the converter or the exporter:

    python -m venv --system-site-packages /path/to/venv     # keeps torch out of the main env
    /path/to/venv/bin/pip install -r tools/requirements.txt
    /path/to/venv/bin/python tools/check_export_roundtrip.py

For each golden fixture (tests/fixtures/if_stage{1,2}): diffusers folder →
``python -m imagen_jax.convert deepfloyd-if`` → ``export-diffusers`` (once
with the kept source config, once with the config derived from our model
config, in float32 and float16) → ``UNet2DConditionModel.from_pretrained`` →
the fixture's reference inputs. Prints, per case, the max abs difference to
the fixture's reference output (float32, must be ≤ 1e-5) and to the same
diffusers UNet loaded from the original folder (float32 export: must be 0).
Exit status 1 if any case fails.
"""

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from imagen_jax.convert import __main__ as cli  # noqa: E402

TOL = 1e-5


def nchw(a: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))


def run_unet(folder: str, ref: dict, variant=None) -> np.ndarray:
  """The diffusers UNet of ``folder`` in float32 on the reference inputs (NHWC out)."""
  unet = UNet2DConditionModel.from_pretrained(
    folder, variant=variant, torch_dtype=torch.float32
  ).eval()
  x = nchw(ref["unet_x"])
  kwargs = {}
  if "unet_lowres" in ref:
    x = torch.cat([x, nchw(ref["unet_lowres"])], dim=1)
    kwargs["class_labels"] = torch.from_numpy(ref["unet_noise_level"])
  with torch.no_grad():
    out = unet(
      x,
      torch.from_numpy(ref["unet_t"]),
      encoder_hidden_states=torch.from_numpy(ref["unet_text"]),
      **kwargs,
    ).sample
  return out.permute(0, 2, 3, 1).numpy()


def drop_kept_config(converted: str) -> None:
  """Removes the kept diffusers config, so the export derives one from ours."""
  path = os.path.join(converted, "config.json")
  with open(path) as f:
    meta = json.load(f)
  del meta["stage"]["diffusers_unet"]
  with open(path, "w") as f:
    json.dump(meta, f)


def check_stage(name: str, fixtures: str, tmp: str) -> bool:
  src = os.path.join(fixtures, name)
  ref = dict(np.load(os.path.join(src, "reference.npz")))
  variant = "fp16" if any(".fp16." in f for f in os.listdir(os.path.join(src, "unet"))) else None
  original = run_unet(os.path.join(src, "unet"), ref, variant)
  ok = True
  for kept in (True, False):
    converted = os.path.join(tmp, f"{name}_{'kept' if kept else 'derived'}")
    assert cli.main(["deepfloyd-if", "--src", src, "--out", converted]) == 0
    if not kept:
      drop_kept_config(converted)
    for dtype in ("float32", "float16"):
      out = os.path.join(tmp, f"{os.path.basename(converted)}_{dtype}")
      assert cli.main(["export-diffusers", "--src", converted, "--out", out, "--dtype", dtype]) == 0
      got = run_unet(out, ref)
      err_ref = float(np.abs(got - ref["unet_out"]).max())
      err_orig = float(np.abs(got - original).max())
      # float16 rounds the fixture's bf16 weights (stage I): only float32 must be exact.
      good = err_ref <= TOL and err_orig == 0.0 if dtype == "float32" else err_ref < 1e-2
      ok &= good
      print(
        f"{name} ({'kept' if kept else 'derived'} config, {dtype}): diffusers loads the "
        f"export; max abs diff vs reference {err_ref:.2e}, vs the original folder "
        f"{err_orig:.2e} {'OK' if good else 'FAIL'}"
      )
  return ok


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--fixtures", default=os.path.join(ROOT, "tests", "fixtures"))
  args = parser.parse_args()
  torch.set_grad_enabled(False)
  with tempfile.TemporaryDirectory() as tmp:
    ok = all([check_stage(name, args.fixtures, tmp) for name in ("if_stage1", "if_stage2")])
  print("all OK" if ok else "FAILED")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
