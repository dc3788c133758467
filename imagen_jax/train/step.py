"""The pure train step of one cascade stage, and its jitted, sharded form.

``train_step(state, batch, rng, uncond) -> (state, metrics)``:
classifier-free-guidance text dropout (dropped rows get the empty caption's
embedding), the stage's own loss (``Stage.loss``: noise level, low-res
conditioning and objective of its kind), optax update, EMA. A step whose
loss, gradient norm or update norm is not finite keeps the old params,
optimizer state and EMA (the step counter still advances, so the data and
the noise keys move on); its ``finite`` metric is 0.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from imagen_jax import parallel
from imagen_jax.stages import Stage, to_float
from imagen_jax.train.state import TrainState


def _drop_text(rng, text_emb, text_mask, uncond, p):
  """Replaces each example's text by the empty caption's with probability p."""
  drop = jax.random.bernoulli(rng, p, (text_emb.shape[0],))
  emb = jnp.where(drop[:, None, None], uncond["text_emb"][None].astype(text_emb.dtype),
                  text_emb)
  mask = jnp.where(drop[:, None], uncond["text_mask"][None], text_mask)
  return emb, mask


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
  """EMA decay with a warmup, min(decay, (1 + step) / (10 + step))."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(state: TrainState, batch: dict, rng: jax.Array, uncond: dict, *,
               stage: Stage, tx: optax.GradientTransformation, train_config: Any,
               lr_fn=None) -> tuple[TrainState, dict]:
  """One optimization step.

  Args:
    state: the TrainState.
    batch: {'image': uint8 [B, R, R, 3], 'text_emb': [B, L, D], 'text_mask': [B, L] bool}.
    rng: base key; the step folds in ``state.step`` so each step differs.
    uncond: {'text_emb': [L, D], 'text_mask': [L]}, the empty caption's encoding.
    stage: the cascade stage (model, schedules, prediction kind).
    tx: the optimizer.
    train_config: ``config.train`` (ema_decay).
    lr_fn: optional schedule, reported as the 'lr' metric.

  Returns:
    (new state, metrics {'loss', 'grad_norm', 'finite' (1 or 0), 'lr'} as float32
    scalars).
  """
  rng = jax.random.fold_in(rng, state.step)
  r_drop, r_loss = jax.random.split(rng)
  x0 = to_float(batch["image"])
  text_emb, text_mask = _drop_text(r_drop, batch["text_emb"], batch["text_mask"], uncond,
                                   stage.config.diffusion.cond_drop)

  def loss_fn(params):
    return stage.loss(params, x0, text_emb, text_mask, r_loss).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  k = ema_decay(state.step, train_config.ema_decay)
  ema = jax.tree.map(lambda e, p: (e + (1.0 - k) * (p - e)).astype(e.dtype),
                     state.ema_params, params)
  grad_norm = optax.tree.norm(grads)
  # The update norm overflows to inf long before a float32 parameter does: a
  # blow-up (lr 1e30) is caught on the step that would apply it.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(
      optax.tree.norm(updates))
  metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
  if lr_fn is not None:
    metrics["lr"] = jnp.asarray(lr_fn(state.step), jnp.float32)
  # Selected on the device: skipping a non-finite update needs no host sync.
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                            ema_params=keep(ema, state.ema_params),
                            opt_state=keep(opt_state, state.opt_state))
  return new_state, metrics


def batch_shardings(mesh: Optional[jax.sharding.Mesh]) -> Any:
  """Shardings of a batch dict: the leading axis split over (data, fsdp)."""
  if mesh is None:
    return None
  split = parallel.batch_sharding(mesh)
  return {"image": split, "text_emb": split, "text_mask": split}


def jit_train_step(stage: Stage, tx, train_config, state_shardings, mesh, rules,
                   lr_fn=None):
  """``train_step`` jitted once with explicit shardings and the state donated.

  Returns a function ``(state, batch, rng, uncond) -> (state, metrics)`` that
  traces and runs under the mesh and the logical-axis rules; its ``lower``
  attribute lowers ahead of time with the same arguments (benchmarks, memory).
  """
  fn = functools.partial(train_step, stage=stage, tx=tx, train_config=train_config,
                         lr_fn=lr_fn)
  if mesh is None:
    return jax.jit(fn, donate_argnums=(0,))
  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(fn, in_shardings=(state_shardings, batch_shardings(mesh), replicated,
                                     replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  def run(state, batch, rng, uncond):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(state, batch, rng, uncond)

  def lower(state, batch, rng, uncond):
    """AOT lowering (arrays or ShapeDtypeStructs) under the mesh and the rules."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted.lower(state, batch, rng, uncond)

  run.lower = lower
  return run
