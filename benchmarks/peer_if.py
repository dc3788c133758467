"""The IF-shaped peer of ``benchmarks.peers``: diffusers' UNet2DConditionModel in
DeepFloyd IF-I's block structure against the same weights in our UNet (ported by
our IF converter): forward, an ε-MSE AdamW train step, and IF's guided sampling loop
(ours: ``stage.sample`` of the converted stage, as ``benchmarks.if_sampling`` times it).

torch and diffusers are imported inside the functions: ``benchmarks.peers`` imports
this module only once it has set the hub offline.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import (
  BETAS,
  LR,
  TEXT_LEN,
  WD,
  make_torch_adamw,
  opt_kind,
  peer_report,
  row,
  time_calls,
)
from benchmarks.if_sampling import (
  IF_GUIDANCE,
  IF_TEXT_DIM,
  guided_sampler,
  if_stage,
  if_unet_config,
  write_if_folder,
)
from imagen_jax.convert import deepfloyd_if
from imagen_jax.convert.if_config import IF_SCHEDULER
from imagen_jax.diffusion import schedules
from imagen_jax.models import count_params


def torch_if_sample(unet, sched_cls, text, uncond, steps: int, seed: int):
  """IFPipeline's stage-I denoising loop (guidance on ε only, conditional variance)."""
  import torch  # pylint: disable=import-outside-toplevel

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


def jax_if_train_step(model, tx, alphas_cumprod, donate: bool = True):
  """The same step in JAX: one jit of value_and_grad + optax AdamW, the params and
  optimizer state donated (``donate=False`` to call it again on the same arguments)."""
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

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def bench_if(args, workdir: str) -> dict:
  """The IF-shaped peer: diffusers UNet2DConditionModel vs our converted UNet."""
  import diffusers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  b, res, steps = args.batch, args.resolution, args.steps
  torch.manual_seed(0)
  config = if_unet_config(args.width, res)
  unet = diffusers.UNet2DConditionModel(**config).eval()
  folder = os.path.join(workdir, "if_unet")
  write_if_folder(folder, dict(unet.config), diffusers.__version__)
  unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
  model, params = deepfloyd_if.load_unet(folder, dtype="float32")
  stage = if_stage(folder, "float32")
  n_theirs = sum(p.numel() for p in unet.parameters())
  n_pool = sum(p.numel() for p in unet.add_embedding.parameters())
  n_ours = count_params(params)

  rng = np.random.default_rng(0)
  x_np = rng.standard_normal((b, 3, res, res), np.float32)
  t_np = rng.integers(0, 1000, (b,))
  text_np = rng.standard_normal((b, TEXT_LEN, IF_TEXT_DIM), np.float32)
  uncond_np = rng.standard_normal((b, TEXT_LEN, IF_TEXT_DIM), np.float32)
  x_t, t_t, text_t, uncond_t = (torch.from_numpy(a) for a in (x_np, t_np, text_np, uncond_np))
  x_j = jnp.asarray(x_np.transpose(0, 2, 3, 1))
  t_j, text_j, uncond_j = jnp.asarray(t_np), jnp.asarray(text_np), jnp.asarray(uncond_np)

  def torch_fwd():
    with torch.no_grad():
      return unet(x_t, t_t, encoder_hidden_states=text_t).sample

  fwd = jax.jit(lambda p, x, t, e: model.apply({"params": p}, x, t, e, None))
  theirs_out = torch_fwd().permute(0, 2, 3, 1).numpy()
  t0 = time.perf_counter()
  ours_out = np.asarray(fwd(params, x_j, t_j, text_j))  # compiles: counted as the first call
  ours_first = time.perf_counter() - t0
  diff = float(np.abs(ours_out - theirs_out).max())
  scale = float(np.abs(theirs_out).max())
  print(f"[if] parity: max|ours − diffusers| = {diff:.2e} (|out| max {scale:.2f})", flush=True)
  if not diff <= 1e-3:
    raise SystemExit(
      f"[if] our converted UNet disagrees with diffusers: max abs diff {diff:.3e} > 1e-3 (fp32)"
    )
  ours = time_calls(lambda: fwd(params, x_j, t_j, text_j), args.repeats, jax.block_until_ready)
  ours["first"] = ours_first
  rows = [row(f"forward (B={b})", ours, time_calls(torch_fwd, args.repeats))]
  print("[if] forward done", flush=True)

  # Guided sampling: IFPipeline's loop vs stage.sample (one jit, 2B rows per call).
  settings, sample = guided_sampler(stage, params, text_j, uncond_j, steps, jax.random.PRNGKey(0))
  probe = diffusers.DDPMScheduler.from_config(IF_SCHEDULER)
  probe.set_timesteps(steps)
  ts = settings.timesteps
  assert tuple(int(s) for s in probe.timesteps) == tuple(ts), (probe.timesteps, ts)
  ours = time_calls(sample, args.sample_repeats, jax.block_until_ready)
  theirs = time_calls(
    lambda: torch_if_sample(unet, diffusers.DDPMScheduler, text_t, uncond_t, steps, 0),
    args.sample_repeats,
  )
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
    state[0], state[1], loss = step(
      state[0], state[1], jax.random.PRNGKey(counter[0]), x0_j, text_j
    )
    return loss

  unet.train()
  opt = make_torch_adamw(unet.parameters(), WD)
  x0_t, ac_t = torch.from_numpy(x0_np), torch.from_numpy(ac)
  rows.append(
    row(
      f"train step (B={b})",
      time_calls(ours_step, args.repeats, jax.block_until_ready),
      time_calls(lambda: torch_if_train_step(unet, opt, x0_t, text_t, ac_t), args.repeats),
    )
  )
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
    f"DDPMScheduler.step per step, ours stage.sample ({settings.sampler}, one jit)",
  ]
  return peer_report(
    "IF-I shape: diffusers (PyTorch) vs our converted UNet",
    rows,
    notes,
    config=config,
    params_ours=n_ours,
    params_theirs=n_theirs,
    parity_max_abs_diff=diff,
    output_abs_max=scale,
  )
