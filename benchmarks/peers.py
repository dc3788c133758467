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
  spacing) written out as ``IFPipeline`` runs it, against ``sample_stage``.
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
huggingface_hub.
"""

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

PEERS = {"if": ("torch", "diffusers"), "imagen": ("torch", "torchvision", "imagen_pytorch")}
INSTALL_HINT = ("install the peers in a venv that sees this environment: python -m venv "
                "--system-site-packages VENV && VENV/bin/pip install -r "
                "benchmarks/requirements-peers.txt, then run VENV/bin/python -m benchmarks.peers")
T5_NAME = "google/t5-v1_1-base"
# The published google/t5-v1_1-base dimensions (imagen-pytorch only reads d_model).
T5_BASE = dict(model_type="t5", architectures=["T5ForConditionalGeneration"], d_model=768,
               d_ff=2048, d_kv=64, num_layers=12, num_decoder_layers=12, num_heads=12,
               vocab_size=32128, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
               is_gated_act=True, relative_attention_num_buckets=32, dropout_rate=0.1,
               layer_norm_epsilon=1e-6, initializer_factor=1.0, tie_word_embeddings=False,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
# DeepFloyd IF-I's DDPMScheduler settings (scheduler/scheduler_config.json).
IF_SCHEDULER = dict(
    _class_name="DDPMScheduler", beta_end=0.02, beta_schedule="squaredcos_cap_v2",
    beta_start=0.0001, clip_sample=True, clip_sample_range=1.0,
    dynamic_thresholding_ratio=0.95, num_train_timesteps=1000, prediction_type="epsilon",
    sample_max_value=1.5, steps_offset=0, thresholding=True, timestep_spacing="leading",
    trained_betas=None, variance_type="learned_range")
IF_GUIDANCE = 7.0        # IFPipeline's default
IMAGEN_GUIDANCE = 5.0
TEXT_LEN = 77            # IF's tokenizer length; used for both peers
LR, BETAS, WD = 1e-4, (0.9, 0.999), 0.01


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.peers",
                              description=__doc__.splitlines()[0])
  p.add_argument("--which", default="if,imagen", help="comma list of peers: if, imagen")
  p.add_argument("--batch", type=int, default=4, help="images per step (sampling: B images, "
                 "guidance on 2B rows)")
  p.add_argument("--steps", type=int, default=25, help="sampling steps (both sides)")
  p.add_argument("--repeats", type=int, default=5, help="timed calls of forward / train step")
  p.add_argument("--sample-repeats", type=int, default=2, help="timed sampling runs")
  p.add_argument("--width", type=int, default=64, help="base channel width of both peers")
  p.add_argument("--resolution", type=int, default=64, help="image size of both peers")
  p.add_argument("--small", action="store_true",
                 help="smoke run: 32×32, width 32, batch 2, 3 steps, 2 repeats")
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
  os.environ.update(HF_HOME=root, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                    HF_HUB_DISABLE_TELEMETRY="1")


# ---------------------------------------------------------------- timing


def time_calls(fn, repeats: int, sync=lambda out: out) -> dict:
  """First call (compile / warm-up) and the median of ``repeats`` further calls, in s."""
  t0 = time.perf_counter()
  sync(fn())
  first = time.perf_counter() - t0
  runs = []
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    sync(fn())
    runs.append(time.perf_counter() - t0)
  return dict(first=first, median=statistics.median(runs), runs=runs)


def jax_sync(out):
  return jax.block_until_ready(out)


def row(metric: str, ours: dict, theirs: dict) -> dict:
  o, t = ours["median"], theirs["median"]
  return dict(metric=metric, ours_s=o, theirs_s=t, ratio=o / t, speedup=t / o,
              ours_compile_s=max(ours["first"] - o, 0.0), ours_runs=ours["runs"],
              theirs_first_s=theirs["first"], theirs_runs=theirs["runs"])


def print_table(title: str, rows: list, notes: list) -> None:
  print(f"\n== {title} ==")
  for n in notes:
    print(f"  {n}")
  print(f"  {'metric':<34}{'ours (s)':>10}{'theirs (s)':>12}{'ours/theirs':>13}{'speedup':>9}")
  for r in rows:
    print(f"  {r['metric']:<34}{r['ours_s']:>10.4f}{r['theirs_s']:>12.4f}"
          f"{r['ratio']:>13.3f}{r['speedup']:>8.2f}x")
  print("  our compile (first call − steady state): " + ", ".join(
      f"{r['metric'].split(' (')[0]} {r['ours_compile_s']:.1f} s" for r in rows))


# ---------------------------------------------------------------- IF peer


def if_unet_config(width: int, res: int, text_dim: int = 4096) -> dict:
  """IF-I's diffusers UNet config (4 levels, ×1,2,3,4, attention at the lower 3) at ``width``."""
  ch = (width, 2 * width, 3 * width, 4 * width)
  head_dim = 64 if width % 64 == 0 else 32
  return dict(
      sample_size=res, in_channels=3, out_channels=6, block_out_channels=ch,
      layers_per_block=2, down_block_types=("ResnetDownsampleBlock2D",) + (
          "SimpleCrossAttnDownBlock2D",) * 3,
      up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
      mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=head_dim,
      cross_attention_dim=ch[-1], encoder_hid_dim=text_dim, encoder_hid_dim_type="text_proj",
      addition_embed_type="text", addition_embed_type_num_heads=64,
      cross_attention_norm="group_norm", act_fn="gelu", time_embedding_act_fn="gelu",
      resnet_time_scale_shift="scale_shift", resnet_skip_time_act=True,
      resnet_out_scale_factor=2 ** 0.5, norm_num_groups=32, norm_eps=1e-5,
      flip_sin_to_cos=True, freq_shift=0)


def write_if_folder(path: str, unet, diffusers_version: str) -> None:
  """A minimal diffusers IF pipeline folder (index, unet/, scheduler/) for ``load_unet``."""
  index = {"_class_name": "IFPipeline", "_diffusers_version": diffusers_version,
           "scheduler": ["diffusers", "DDPMScheduler"],
           "unet": ["diffusers", "UNet2DConditionModel"]}
  os.makedirs(os.path.join(path, "scheduler"))
  with open(os.path.join(path, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)
  with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(IF_SCHEDULER, f, indent=2)
  unet.save_pretrained(os.path.join(path, "unet"), safe_serialization=True)


def torch_if_sample(unet, sched_cls, text, uncond, steps: int, seed: int):
  """IFPipeline's stage-I denoising loop (guidance on ε only, conditional variance)."""
  import torch
  sched = sched_cls.from_config(IF_SCHEDULER)
  sched.set_timesteps(steps)
  gen = torch.Generator().manual_seed(seed)
  b, res = text.shape[0], unet.config.sample_size
  x = torch.randn(b, 3, res, res, generator=gen)
  emb = torch.cat([uncond, text])
  with torch.no_grad():
    for t in sched.timesteps:
      out = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample
      out_u, out_c = out.chunk(2)
      eps_u, _ = out_u.split(3, dim=1)
      eps_c, var_c = out_c.split(3, dim=1)
      eps = eps_u + IF_GUIDANCE * (eps_c - eps_u)
      x = sched.step(torch.cat([eps, var_c], dim=1), t, x, generator=gen).prev_sample
  return x


def torch_if_train_step(unet, opt, x0, text, alphas_cumprod):
  """ε-MSE on the first 3 output channels at random integer t, one AdamW step."""
  import torch
  import torch.nn.functional as F
  b = x0.shape[0]
  t = torch.randint(0, alphas_cumprod.shape[0], (b,))
  eps = torch.randn_like(x0)
  abar = alphas_cumprod[t].view(b, 1, 1, 1)
  x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
  opt.zero_grad(set_to_none=True)
  loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=text).sample[:, :3], eps)
  loss.backward()
  opt.step()
  return loss.detach()


def jax_if_train_step(model, tx, alphas_cumprod):
  """The same step in JAX: one jit of value_and_grad + optax AdamW, state donated."""
  ac = jnp.asarray(alphas_cumprod, jnp.float32)

  def step(params, opt_state, rng, x0, text):
    r_t, r_eps = jax.random.split(rng)
    b = x0.shape[0]
    t = jax.random.randint(r_t, (b,), 0, ac.shape[0])
    eps = jax.random.normal(r_eps, x0.shape, jnp.float32)
    abar = ac[t][:, None, None, None]
    x_t = jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * eps

    def loss_fn(p):
      out = model.apply({"params": p}, x_t, t, text, None)
      return jnp.mean((out[..., :3].astype(jnp.float32) - eps) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def bench_if(args, workdir: str) -> dict:
  """The IF-shaped peer: diffusers UNet2DConditionModel vs our converted UNet."""
  import diffusers
  import torch
  from imagen_jax.convert import deepfloyd_if, if_config, if_sampling
  from imagen_jax.diffusion import schedules
  from imagen_jax.models.unet import count_params

  b, res, steps = args.batch, args.resolution, args.steps
  torch.manual_seed(0)
  config = if_unet_config(args.width, res)
  unet = diffusers.UNet2DConditionModel(**config).eval()
  folder = os.path.join(workdir, "if_unet")
  write_if_folder(folder, unet, diffusers.__version__)
  model, params = deepfloyd_if.load_unet(folder, dtype="float32")
  stage = deepfloyd_if.build_stage_config(if_config.read_if_folder(folder), "float32")
  n_theirs = sum(p.numel() for p in unet.parameters())
  n_pool = sum(p.numel() for p in unet.add_embedding.parameters())
  n_ours = count_params(params)

  rng = np.random.default_rng(0)
  x_np = rng.standard_normal((b, 3, res, res), np.float32)
  t_np = rng.integers(0, 1000, (b,))
  text_np = rng.standard_normal((b, TEXT_LEN, 4096), np.float32)
  uncond_np = rng.standard_normal((b, TEXT_LEN, 4096), np.float32)
  x_t, t_t, text_t, uncond_t = (torch.from_numpy(a) for a in (x_np, t_np, text_np, uncond_np))
  x_j = jnp.asarray(x_np.transpose(0, 2, 3, 1))
  t_j, text_j, uncond_j = jnp.asarray(t_np), jnp.asarray(text_np), jnp.asarray(uncond_np)

  def torch_fwd():
    with torch.no_grad():
      return unet(x_t, t_t, encoder_hidden_states=text_t).sample

  fwd = jax.jit(lambda p, x, t, e: model.apply({"params": p}, x, t, e, None))
  theirs_out = torch_fwd().permute(0, 2, 3, 1).numpy()
  t0 = time.perf_counter()
  ours_out = np.asarray(fwd(params, x_j, t_j, text_j))   # compiles: counted as the first call
  ours_first = time.perf_counter() - t0
  diff = float(np.abs(ours_out - theirs_out).max())
  scale = float(np.abs(theirs_out).max())
  print(f"[if] parity: max|ours − diffusers| = {diff:.2e} (|out| max {scale:.2f})", flush=True)
  if not diff <= 1e-3:
    raise SystemExit(f"[if] our converted UNet disagrees with diffusers: max abs diff "
                     f"{diff:.3e} > 1e-3 (fp32)")
  ours = time_calls(lambda: fwd(params, x_j, t_j, text_j), args.repeats, jax_sync)
  ours["first"] = ours_first
  rows = [row(f"forward (B={b})", ours, time_calls(torch_fwd, args.repeats))]
  print("[if] forward done", flush=True)

  # Guided sampling: IFPipeline's loop vs sample_stage (one jit, 2B rows per call).
  ts = schedules.if_timesteps(steps, 1000, "leading")
  probe = diffusers.DDPMScheduler.from_config(IF_SCHEDULER)
  probe.set_timesteps(steps)
  assert tuple(int(s) for s in probe.timesteps) == tuple(ts), (probe.timesteps, ts)
  key = jax.random.PRNGKey(0)
  ours = time_calls(lambda: if_sampling.sample_stage(
      stage, params, text_j, uncond_j, key, guidance_scale=IF_GUIDANCE, timesteps=ts),
                    args.sample_repeats, jax_sync)
  theirs = time_calls(lambda: torch_if_sample(unet, diffusers.DDPMScheduler, text_t, uncond_t,
                                              steps, 0), args.sample_repeats)
  rows.append(row(f"guided sampling ({steps} steps, B={b})", ours, theirs))
  print("[if] sampling done", flush=True)

  # Train step (last: it changes the weights on both sides).
  ac = schedules.alphas_cumprod(schedules.betas_squaredcos_cap_v2(1000)).astype(np.float32)
  x0_np = np.tanh(rng.standard_normal((b, 3, res, res), np.float32))
  tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=1e-8, weight_decay=WD)
  state = [jax.tree.map(jnp.copy, params)]
  state.append(tx.init(state[0]))
  step = jax_if_train_step(model, tx, ac)
  x0_j = jnp.asarray(x0_np.transpose(0, 2, 3, 1))
  counter = [0]

  def ours_step():
    counter[0] += 1
    state[0], state[1], loss = step(state[0], state[1], jax.random.PRNGKey(counter[0]),
                                    x0_j, text_j)
    return loss

  unet.train()
  opt = make_torch_adamw(unet.parameters(), WD)
  x0_t, ac_t = torch.from_numpy(x0_np), torch.from_numpy(ac)
  rows.append(row(f"train step (B={b})", time_calls(ours_step, args.repeats, jax_sync),
                  time_calls(lambda: torch_if_train_step(unet, opt, x0_t, text_t, ac_t),
                             args.repeats)))
  notes = [
      "diffusers UNet2DConditionModel, IF-I block structure: channels "
      f"{config['block_out_channels']}, "
      f"layers_per_block {config['layers_per_block']}, head dim {config['attention_head_dim']}, "
      f"cross-attention dim "
      f"{config['cross_attention_dim']}, {res}×{res}, text {TEXT_LEN}×4096",
      f"params: ours {n_ours / 1e6:.2f}M, theirs {n_theirs / 1e6:.2f}M (same weights, "
      f"converted; {n_pool / 1e6:.1f}M of them in IF's 4096-wide text pooling, which does "
      f"not shrink with the width); parity max abs diff {diff:.1e}",
      "train: ε-MSE on channels 0–2, random integer t, IF alphas_cumprod, AdamW "
      f"(lr {LR}, betas {BETAS}, wd {WD}); theirs eager PyTorch, {opt_kind(opt)} AdamW",
      f"sampling: {steps} leading-spaced steps, guidance {IF_GUIDANCE} on ε (one call on 2B "
      "rows), learned-range variance, dynamic thresholding 0.95 / max 1.5; theirs "
      "DDPMScheduler.step per step, ours sample_stage (one jit)",
  ]
  print_table("IF-I shape: diffusers (PyTorch) vs our converted UNet", rows, notes)
  return dict(config=config, params_ours=n_ours, params_theirs=n_theirs,
              parity_max_abs_diff=diff, output_abs_max=scale, rows=rows, notes=notes)


def make_torch_adamw(params, weight_decay: float):
  """torch AdamW, fused on CPU when this torch has it (the peer's fastest eager option)."""
  import torch
  params = list(params)
  try:
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=1e-8,
                             weight_decay=weight_decay, fused=True)
  except (RuntimeError, TypeError, ValueError):
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=1e-8, weight_decay=weight_decay)


def opt_kind(opt) -> str:
  return "fused" if opt.defaults.get("fused") else "default"


# ---------------------------------------------------------------- imagen-pytorch peer


def imagen_peer_configs(width: int, res: int, text_dim: int = 768):
  """(imagen-pytorch Unet kwargs, our config.model): BaseUnet64's structure at ``width``.

  Theirs per level: a cross-attention ResBlock + 3 ResBlocks (global-context
  attention) + a transformer block at the lower 3 levels, 8 heads × 64. Ours:
  Imagen's base UNet layout (×1,2,3,4, self+cross attention at the lower 3 levels,
  head dim 64) with 3 ResBlocks per level and 2 at the lowest, which matches the
  parameter count within a few percent at width 64.
  """
  theirs = dict(dim=width, dim_mults=(1, 2, 3, 4), num_resnet_blocks=3,
                layer_attns=(False, True, True, True),
                layer_cross_attns=(False, True, True, True), attn_heads=8,
                attn_dim_head=64 if width >= 64 else 32, ff_mult=2.0, memory_efficient=False,
                text_embed_dim=text_dim, max_text_len=TEXT_LEN)
  ours = dict(channels=(width, 2 * width, 3 * width, 4 * width), num_res_blocks=(3, 3, 3, 2),
              attention=("none", "self_cross", "self_cross", "self_cross"),
              mid_attention="self_cross", head_dim=64 if width >= 64 else 32,
              time_embed_dim=4 * width, text_dim=text_dim, text_proj_dim=4 * width,
              text_pool="attention", text_pool_projected=True,
              norm_groups=32 if width >= 64 else 16, dtype="float32", param_dtype="float32")
  return theirs, ours


def _text_inputs(rng, b: int, dim: int):
  """Random caption embeddings [B, L, D] zero past a random length, and masks [B, L]."""
  lengths = rng.integers(8, TEXT_LEN + 1, (b,))
  mask = np.arange(TEXT_LEN)[None] < lengths[:, None]
  emb = rng.standard_normal((b, TEXT_LEN, dim), np.float32) * 0.2 * mask[..., None]
  return emb.astype(np.float32), mask


def bench_imagen(args, workdir: str) -> dict:  # pylint: disable=unused-argument
  """The imagen-pytorch peer at a matched parameter count."""
  import torch
  from imagen_pytorch import Imagen, Unet
  from imagen_jax import config as config_lib
  from imagen_jax.diffusion import samplers
  from imagen_jax.models.unet import count_params
  from imagen_jax.stages import Stage
  from imagen_jax.train import optim, state as state_lib, step as step_lib

  b, res, steps, text_dim = args.batch, args.resolution, args.steps, 768
  theirs_cfg, ours_cfg = imagen_peer_configs(args.width, res, text_dim)
  torch.manual_seed(0)
  imagen = Imagen(unets=(Unet(**theirs_cfg),), image_sizes=(res,), text_embed_dim=text_dim,
                  timesteps=steps, cond_drop_prob=0.1, noise_schedules="cosine",
                  pred_objectives="noise", dynamic_thresholding=True,
                  dynamic_thresholding_percentile=0.95, min_snr_loss_weight=True,
                  min_snr_gamma=5)
  unet = imagen.unets[0]
  stage_cfg = config_lib.stage_config("base", res, ours_cfg)
  stage_cfg.diffusion.update(dict(prediction="eps", schedule="cosine", min_snr_gamma=5.0,
                                  cond_drop=0.1))
  stage = Stage(stage_cfg)
  train_cfg = config_lib.base_config().train
  train_cfg.update(dict(lr=LR, warmup_steps=0, num_steps=10 ** 9, end_lr_frac=1.0,
                        weight_decay=0.0, b1=BETAS[0], b2=BETAS[1], grad_clip=1.0,
                        ema_decay=0.9999))
  tx = optim.make_optimizer(train_cfg)
  state, shardings = state_lib.create_train_state(jax.random.PRNGKey(0), stage, tx, None, None,
                                                  TEXT_LEN)
  n_ours, n_theirs = count_params(state.params), sum(p.numel() for p in unet.parameters())

  rng = np.random.default_rng(1)
  text_np, mask_np = _text_inputs(rng, b, text_dim)
  images_np = rng.integers(0, 256, (b, res, res, 3), dtype=np.uint8)
  x_np = rng.standard_normal((b, res, res, 3), np.float32)
  t_np = rng.uniform(0.0, 1.0, (b,)).astype(np.float32)
  text_t, mask_t = torch.from_numpy(text_np), torch.from_numpy(mask_np)
  x_t = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
  text_j, mask_j, x_j, t_j = (jnp.asarray(a) for a in (text_np, mask_np, x_np, t_np))
  uncond = {"text_emb": jnp.zeros((TEXT_LEN, text_dim), jnp.float32),
            "text_mask": jnp.arange(TEXT_LEN) < 1}

  # Forward: the UNet alone, no grad, conditional (theirs: time given as log-SNR).
  sched = imagen.noise_schedulers[0]
  cond_t = sched.get_condition(torch.from_numpy(t_np))

  def torch_fwd():
    with torch.no_grad():
      return unet(x_t, cond_t, text_embeds=text_t, text_mask=mask_t, cond_drop_prob=0.0)

  unet.eval()
  fwd = jax.jit(lambda p, x, t, e, m: stage.apply(p, x, t, e, m))
  rows = [row(f"forward (B={b})", time_calls(lambda: fwd(state.params, x_j, t_j, text_j, mask_j),
                                              args.repeats, jax_sync),
              time_calls(torch_fwd, args.repeats))]
  print("[imagen] forward done", flush=True)

  # Guided sampling: ancestral steps, guidance 5, dynamic thresholding 0.95.
  args_j = {"params": state.params,
            "text_emb": jnp.concatenate([jnp.broadcast_to(uncond["text_emb"], text_j.shape),
                                         text_j]),
            "text_mask": jnp.concatenate([jnp.broadcast_to(uncond["text_mask"], mask_j.shape),
                                          mask_j])}
  key = jax.random.PRNGKey(0)
  ours = time_calls(lambda: samplers.ddpm_sample(
      stage.model_fn, (b, res, res, 3), key, args_j, num_steps=steps, prediction="eps",
      schedule=stage.logsnr_fn, guidance_scale=IMAGEN_GUIDANCE, threshold="dynamic",
      quantile=0.95), args.sample_repeats, jax_sync)
  theirs = time_calls(lambda: imagen.sample(
      text_embeds=text_t, text_masks=mask_t, cond_scale=IMAGEN_GUIDANCE,
      cfg_remove_parallel_component=False, use_tqdm=False), args.sample_repeats)
  rows.append(row(f"guided sampling ({steps} steps, B={b})", ours, theirs))
  print("[imagen] sampling done", flush=True)

  # Train step: theirs Imagen.forward (CFG dropout, Min-SNR loss), backward,
  # clip, AdamW, EMA; ours jit_train_step (the same, one jit, state donated).
  train = step_lib.jit_train_step(stage, tx, train_cfg, shardings, None, None)
  batch = {"image": jnp.asarray(images_np), "text_emb": text_j, "text_mask": mask_j}
  holder = [state]

  def ours_step():
    holder[0], metrics = train(holder[0], batch, key, uncond)
    return metrics["loss"]

  imagen.train()
  params = [p for p in unet.parameters() if p.requires_grad]
  opt = make_torch_adamw(params, 0.0)
  ema = [p.detach().clone() for p in params]
  # ema_pytorch's use_foreach path: one multi-tensor lerp over all parameters.
  lerp_ = torch._foreach_lerp_  # pylint: disable=protected-access
  images_t = torch.from_numpy(images_np.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)

  def torch_step():
    opt.zero_grad(set_to_none=True)
    loss = imagen(images_t, text_embeds=text_t, text_masks=mask_t, unet_number=1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
      lerp_(ema, [p.detach() for p in params], 1.0 - 0.9999)
    return loss.detach()

  rows.append(row(f"train step (B={b})", time_calls(ours_step, args.repeats, jax_sync),
                  time_calls(torch_step, args.repeats)))
  notes = [
      f"theirs imagen-pytorch Unet(dim={theirs_cfg['dim']}, dim_mults=(1,2,3,4), "
      f"num_resnet_blocks=3, attention at the lower 3 levels, {theirs_cfg['attn_heads']} "
      f"heads × {theirs_cfg['attn_dim_head']}); ours channels {ours_cfg['channels']}, "
      f"res blocks {ours_cfg['num_res_blocks']}, head dim {ours_cfg['head_dim']}",
      f"params: ours {n_ours / 1e6:.2f}M, theirs {n_theirs / 1e6:.2f}M "
      f"({100 * (n_ours / n_theirs - 1):+.1f}%); {res}×{res}, text {TEXT_LEN}×{text_dim} "
      "given directly (no T5 run)",
      "train: eps prediction, continuous cosine schedule, Min-SNR-5, CFG text dropout 0.1, "
      f"grad clip 1.0, AdamW (lr {LR}, betas {BETAS}), EMA 0.9999 on both sides; theirs "
      f"eager PyTorch, {opt_kind(opt)} AdamW, EMA by torch._foreach_lerp_",
      f"sampling: {steps} ancestral steps, guidance {IMAGEN_GUIDANCE}, dynamic thresholding "
      "0.95; theirs two UNet calls per step (cond, then null), ours one call on 2B rows "
      "(empty-caption rows) inside one jit; theirs without the parallel-component removal",
      "architectures differ (theirs: cross-embed stem, global-context attention, "
      "Perceiver text pooling, time tokens; ours: Imagen's base UNet): equal parameter "
      "count is not equal FLOPs",
  ]
  print_table("imagen-pytorch vs our base UNet (matched parameter count)", rows, notes)
  return dict(config_theirs=theirs_cfg, config_ours=ours_cfg, params_ours=n_ours,
              params_theirs=n_theirs, rows=rows, notes=notes)


# ---------------------------------------------------------------- run


def machine_info() -> dict:
  import importlib.metadata as md
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  versions = {}
  for dist in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "imagen-pytorch"):
    try:
      versions[dist] = md.version(dist)
    except md.PackageNotFoundError:
      versions[dist] = None
  import torch
  return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), cpu=cpu,
              cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
              python=platform.python_version(), versions=versions)


def main(argv=None) -> int:
  args = parse_args(argv)
  missing = missing_peers(args.which)
  if missing:
    print(f"benchmarks.peers: missing {', '.join(missing)}; {INSTALL_HINT}", file=sys.stderr)
    return 2
  with tempfile.TemporaryDirectory(prefix="peers-") as workdir:
    offline_t5_home(os.path.join(workdir, "hf_home"))
    info = machine_info()
    print(f"{info['date']}  {info['cpu']}  {info['cores']} cores, torch threads "
          f"{info['torch_threads']}; " + ", ".join(f"{k} {v}" for k, v in
                                                   info["versions"].items()), flush=True)
    print(f"batch {args.batch}, {args.resolution}×{args.resolution}, sampling steps "
          f"{args.steps}, repeats {args.repeats} (sampling {args.sample_repeats}), fp32",
          flush=True)
    results = dict(machine=info, args={k: v for k, v in vars(args).items()})
    if "if" in args.which:
      results["if"] = bench_if(args, workdir)
      gc.collect()   # free the first peer's weights and optimizer state before the second
    if "imagen" in args.which:
      results["imagen"] = bench_imagen(args, workdir)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2, default=str)
    print(f"\nwrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
