"""Ours against PyTorch peers: same network, same batch, same machine, one run.

  PEERS_VENV/bin/python -m benchmarks.peers [--which if,imagen] [--batch 4]
      [--steps 25] [--repeats 5] [--small] [--json out.json]

Peers (installed only by ``benchmarks/requirements-peers.txt``, in a
``--system-site-packages`` venv; never by the main requirements):

* ``if``: diffusers' ``UNet2DConditionModel`` in DeepFloyd IF-I's block
  structure (ResnetDownsampleBlock2D, then SimpleCrossAttn levels, simple-cross
  mid block, text_proj, 'text' addition embedding, scale-shift ResBlocks, 6
  output channels), random weights at reduced width, written as a diffusers
  IF folder and loaded into our UNet with our IF converter (outputs checked to
  agree). Timed: a no-grad forward, an ε-MSE AdamW train step, and IF's guided
  DDPM sampling loop (learned-range variance, dynamic thresholding, leading
  spacing) written out as ``IFPipeline`` runs it, against our stage's ``stage.sample``.
* ``imagen``: lucidrains imagen-pytorch's ``Unet`` + ``Imagen`` (text embeddings
  given directly, no T5 run) against our native base UNet at a matched
  parameter count, 64×64, eps prediction, cosine schedule, Min-SNR-5 loss.
  Timed: a forward, a train step (both sides clip + AdamW + EMA + CFG text
  dropout) and a guided ancestral sampling run with dynamic thresholding.

Times are medians of ``--repeats`` runs after a warm-up call, fp32 on both
sides; our compile time (first call minus steady state) is reported apart.
Ratios are ours / theirs (time); speedup = theirs / ours. Nothing is
downloaded: imagen-pytorch reads T5's config at import time, so a local
t5-v1_1-base config is laid out in a temporary hub cache and the hub is set
offline before the import. torch, diffusers, imagen_pytorch and imagen_jax are
imported inside the functions that use them: ``--help`` and the missing-peer
message need none of them, and HF_HOME must be set before any of them loads
huggingface_hub. The two peers live in ``benchmarks/peer_if.py`` and
``benchmarks/peer_imagen.py``; this module holds the CLI, ``benchmarks.common`` the
timing and settings they share (neither peer imports this module).
"""

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import sys
import tempfile

from benchmarks.common import cpu_model

PEERS = {"if": ("torch", "diffusers"), "imagen": ("torch", "torchvision", "imagen_pytorch")}
INSTALL_HINT = (
  "install the peers in a venv that sees this environment: python -m venv "
  "--system-site-packages VENV && VENV/bin/pip install -r "
  "benchmarks/requirements-peers.txt, then run VENV/bin/python -m benchmarks.peers"
)
T5_NAME = "google/t5-v1_1-base"
# The published google/t5-v1_1-base dimensions (imagen-pytorch only reads d_model).
T5_BASE = dict(
  model_type="t5",
  architectures=["T5ForConditionalGeneration"],
  d_model=768,
  d_ff=2048,
  d_kv=64,
  num_layers=12,
  num_decoder_layers=12,
  num_heads=12,
  vocab_size=32128,
  feed_forward_proj="gated-gelu",
  dense_act_fn="gelu_new",
  is_gated_act=True,
  relative_attention_num_buckets=32,
  dropout_rate=0.1,
  layer_norm_epsilon=1e-6,
  initializer_factor=1.0,
  tie_word_embeddings=False,
  pad_token_id=0,
  eos_token_id=1,
  decoder_start_token_id=0,
)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.peers", description=__doc__.splitlines()[0]
  )
  p.add_argument("--which", default="if,imagen", help="comma list of peers: if, imagen")
  p.add_argument(
    "--batch", type=int, default=4, help="images per step (sampling: B images, guidance on 2B rows)"
  )
  p.add_argument("--steps", type=int, default=25, help="sampling steps (both sides)")
  p.add_argument("--repeats", type=int, default=5, help="timed calls of forward / train step")
  p.add_argument("--sample-repeats", type=int, default=2, help="timed sampling runs")
  p.add_argument("--width", type=int, default=64, help="base channel width of both peers")
  p.add_argument("--resolution", type=int, default=64, help="image size of both peers")
  p.add_argument(
    "--small", action="store_true", help="smoke run: 32×32, width 32, batch 2, 3 steps, 2 repeats"
  )
  p.add_argument("--json", default="", help="also write the results here")
  args = p.parse_args(argv)
  args.which = [w.strip() for w in args.which.split(",") if w.strip()]
  bad = sorted(set(args.which) - set(PEERS))
  if bad:
    p.error(f"unknown peer(s) {bad}; expected some of {sorted(PEERS)}")
  if args.small:
    args.resolution, args.width, args.batch, args.steps = 32, 32, 2, 3
    args.repeats, args.sample_repeats = 2, 1
  return args


def missing_peers(which) -> list:
  """Peer packages that are not importable (checked without importing them)."""
  names = sorted({m for w in which for m in PEERS[w]})
  return [m for m in names if importlib.util.find_spec(m) is None]


def offline_t5_home(root: str) -> None:
  """A hub-cache layout holding t5-v1_1-base's config under ``root``; hub set offline.

  Must run before transformers / huggingface_hub / diffusers are imported
  (they read HF_HOME and the offline switches at import time).
  """
  rev = "0" * 40
  repo = os.path.join(root, "hub", "models--" + T5_NAME.replace("/", "--"))
  os.makedirs(os.path.join(repo, "snapshots", rev))
  os.makedirs(os.path.join(repo, "refs"))
  with open(os.path.join(repo, "refs", "main"), "w") as f:
    f.write(rev)
  with open(os.path.join(repo, "snapshots", rev, "config.json"), "w") as f:
    json.dump(T5_BASE, f, indent=2)
  os.environ.update(
    HF_HOME=root, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1"
  )


# ---------------------------------------------------------------- run


def machine_info() -> dict:
  import importlib.metadata as md

  cpu = cpu_model()
  versions = {}
  for dist in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "imagen-pytorch"):
    try:
      versions[dist] = md.version(dist)
    except md.PackageNotFoundError:
      versions[dist] = None
  import torch

  return dict(
    date=datetime.datetime.now().isoformat(timespec="seconds"),
    cpu=cpu,
    cores=os.cpu_count(),
    torch_threads=torch.get_num_threads(),
    python=platform.python_version(),
    versions=versions,
  )


def main(argv=None) -> int:
  args = parse_args(argv)
  missing = missing_peers(args.which)
  if missing:
    print(f"benchmarks.peers: missing {', '.join(missing)}; {INSTALL_HINT}", file=sys.stderr)
    return 2
  with tempfile.TemporaryDirectory(prefix="peers-") as workdir:
    offline_t5_home(os.path.join(workdir, "hf_home"))
    info = machine_info()
    print(
      f"{info['date']}  {info['cpu']}  {info['cores']} cores, torch threads "
      f"{info['torch_threads']}; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
      flush=True,
    )
    print(
      f"batch {args.batch}, {args.resolution}×{args.resolution}, sampling steps "
      f"{args.steps}, repeats {args.repeats} (sampling {args.sample_repeats}), fp32",
      flush=True,
    )
    results = dict(machine=info, args={k: v for k, v in vars(args).items()})
    if "if" in args.which:
      from benchmarks import peer_if  # pylint: disable=import-outside-toplevel

      results["if"] = peer_if.bench_if(args, workdir)
      gc.collect()  # free the first peer's weights and optimizer state before the second
    if "imagen" in args.which:
      from benchmarks import peer_imagen  # pylint: disable=import-outside-toplevel

      results["imagen"] = peer_imagen.bench_imagen(args, workdir)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2, default=str)
    print(f"\nwrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
