"""The pure train step of one cascade stage, and its jitted, sharded form.

``train_step(state, batch, rng, uncond, text_params) -> (state, metrics)``:
classifier-free-guidance text dropout (dropped rows get the empty caption),
the frozen T5 on the caption tokens (inside the step, sharded by the same
rules as everything else; or precomputed embeddings), the stage's own loss
(``Stage.loss``: noise level, low-res conditioning and objective of its kind)
over ``grad_accum`` microbatches, optax update, EMA. A step whose loss,
gradient norm or update norm is not finite keeps the old params, optimizer
state and EMA (the step counter still advances, so the data and the noise
keys move on); its ``finite`` metric is 0.
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from imagen_jax import axes, parallel
from imagen_jax.stages import Stage, to_float
from imagen_jax.train.state import TrainState, trainable, with_trainable

# (text_params, ids [B, L] int32, mask [B, L] bool) -> embeddings [B, L, D].
TextApply = Callable[[Any, jax.Array, jax.Array], jax.Array]


def _drop_text(rng, batch: dict, uncond: dict, p: float) -> tuple[jax.Array, jax.Array]:
  """Replaces each example's text by the empty caption's with probability p.

  Works on caption tokens (``text_ids``, encoded afterwards: T5 of the empty
  caption is the unconditional embedding) or on precomputed ``text_emb``.
  """
  key = "text_ids" if "text_ids" in batch else "text_emb"
  x = batch[key]
  drop = jax.random.bernoulli(rng, p, (x.shape[0],))
  keep_shape = (-1,) + (1,) * (x.ndim - 1)
  x = jnp.where(drop.reshape(keep_shape), uncond[key][None].astype(x.dtype), x)
  mask = jnp.where(drop[:, None], uncond["text_mask"][None], batch["text_mask"])
  return x, mask


def text_condition(
  batch: dict,
  uncond: dict,
  rng: jax.Array,
  p: float,
  text_params: Any,
  text_apply: Optional[TextApply],
) -> tuple[jax.Array, jax.Array]:
  """(text_emb [B, L, D], text_mask [B, L]) after dropout, encoded if tokens."""
  x, mask = _drop_text(rng, batch, uncond, p)
  if "text_ids" not in batch:
    return x, mask
  if text_apply is None:
    raise ValueError("the batch holds caption tokens but no text encoder was given")
  return jax.lax.stop_gradient(text_apply(text_params, x, mask)), mask


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
  """EMA decay with a warmup, min(decay, (1 + step) / (10 + step))."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _split_rows(x: jax.Array, leading: int) -> jax.Array:
  """Constrains axis ``leading`` of x (the rows) to the batch's mesh axes."""
  names = (None,) * leading + (axes.BATCH,) + (None,) * (x.ndim - leading - 1)
  return nn.with_logical_constraint(x, names)


def _loss_and_grads(stage: Stage, all_params: Any, inputs: dict, accum: int):
  """Mean loss and its gradient (float32) over ``accum`` microbatches.

  ``inputs`` holds [B, ...] rows (x0, text_emb, text_mask and the loss's
  noise, drawn for the whole batch); microbatch k is rows k, k + K, ... so
  each one splits evenly over the data-parallel devices without moving data.
  The gradient is of ``trainable(stage, params)`` only: frozen groups (a latent
  stage's VAE) are constants of the loss.
  """

  def loss_fn(p, rows):
    noise = {k[len("noise/") :]: v for k, v in rows.items() if k.startswith("noise/")}
    full = with_trainable(stage, all_params, p)
    return stage.loss(full, rows["x0"], rows["text_emb"], rows["text_mask"], noise=noise).mean()

  params = trainable(stage, all_params)
  if accum == 1:
    return jax.value_and_grad(loss_fn)(params, inputs)
  # Without the constraints XLA may run each microbatch replicated on every device.
  micro = jax.tree.map(
    lambda x: _split_rows(
      jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1), leading=1
    ),
    inputs,
  )

  def body(carry, rows):
    rows = jax.tree.map(lambda x: _split_rows(x, leading=0), rows)
    loss, grads = jax.value_and_grad(loss_fn)(params, rows)
    total_loss, total_grads = carry
    total_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), total_grads, grads)
    return (total_loss + loss, total_grads), None

  # zeros_like: the sums inherit the parameters' sharding (FSDP keeps them split).
  zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)
  (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
  grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grads, params)
  return loss / accum, grads


def train_step(
  state: TrainState,
  batch: dict,
  rng: jax.Array,
  uncond: dict,
  text_params: Any = None,
  *,
  stage: Stage,
  tx: optax.GradientTransformation,
  train_config: Any,
  lr_fn=None,
  text_apply: Optional[TextApply] = None,
) -> tuple[TrainState, dict]:
  """One optimization step.

  Args:
    state: the TrainState.
    batch: {'image': uint8 [B, R, R, 3], 'text_mask': [B, L] bool} and either
      'text_ids': [B, L] int32 caption tokens (encoded here by ``text_apply``)
      or 'text_emb': [B, L, D] precomputed embeddings.
    rng: base key; the step folds in ``state.step`` so each step differs.
    uncond: the empty caption: {'text_mask': [L]} and 'text_ids': [L] or
      'text_emb': [L, D], matching the batch.
    text_params: the frozen encoder's parameters (with 'text_ids' batches).
    stage: the cascade stage (model, schedules, prediction kind).
    tx: the optimizer.
    train_config: ``config.train`` (ema_decay, grad_accum).
    lr_fn: optional schedule, reported as the 'lr' metric.
    text_apply: ``(text_params, ids, mask) -> emb``, the frozen encoder.

  Returns:
    (new state, metrics {'loss', 'grad_norm', 'finite' (1 or 0), 'lr'} as float32
    scalars).
  """
  rng = jax.random.fold_in(rng, state.step)
  r_drop, r_loss = jax.random.split(rng)
  x0 = to_float(batch["image"])
  text_emb, text_mask = text_condition(
    batch, uncond, r_drop, stage.config.diffusion.cond_drop, text_params, text_apply
  )
  inputs = {"x0": x0, "text_emb": text_emb, "text_mask": text_mask}
  inputs.update({f"noise/{k}": v for k, v in stage.loss_noise(r_loss, x0).items()})
  loss, grads = _loss_and_grads(stage, state.params, inputs, int(train_config.get("grad_accum", 1)))
  # Frozen groups (``stage.frozen``) take no part in the update or the EMA: they
  # come back bit for bit.
  old = trainable(stage, state.params)
  updates, opt_state = tx.update(grads, state.opt_state, old)
  params = optax.apply_updates(old, updates)
  k = ema_decay(state.step, train_config.ema_decay)
  ema = jax.tree.map(
    lambda e, p: (e + (1.0 - k) * (p - e)).astype(e.dtype),
    trainable(stage, state.ema_params),
    params,
  )
  params = with_trainable(stage, state.params, params)
  ema = with_trainable(stage, state.ema_params, ema)
  grad_norm = optax.tree.norm(grads)
  # The update norm overflows to inf long before a float32 parameter does: a
  # blow-up (lr 1e30) is caught on the step that would apply it.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
  metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
  if lr_fn is not None:
    metrics["lr"] = jnp.asarray(lr_fn(state.step), jnp.float32)
  # Selected on the device: skipping a non-finite update needs no host sync.
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
    step=state.step + 1,
    params=keep(params, state.params),
    ema_params=keep(ema, state.ema_params),
    opt_state=keep(opt_state, state.opt_state),
  )
  return new_state, metrics


def batch_shardings(mesh: Optional[jax.sharding.Mesh], tokens: bool = False) -> Any:
  """Shardings of a batch dict: the leading axis split over (data, fsdp).

  ``tokens``: the batch holds caption tokens ('text_ids') instead of 'text_emb'.
  """
  if mesh is None:
    return None
  split = parallel.batch_sharding(mesh)
  text = "text_ids" if tokens else "text_emb"
  return {"image": split, text: split, "text_mask": split}


def check_batch(batch_size: int, grad_accum: int, mesh) -> None:
  """Refuses (before compiling) a global batch the devices and microbatches cannot split."""
  names, dp = parallel.batch_axes(mesh)
  if grad_accum < 1:
    raise ValueError(f"config.train.grad_accum={grad_accum} must be >= 1")
  if batch_size % (dp * grad_accum):
    raise ValueError(
      f"config.train.batch_size={batch_size} is not divisible by the data-parallel "
      f"size {dp} (mesh axes {'×'.join(names) or 'none'}) × config.train.grad_accum="
      f"{grad_accum} = {dp * grad_accum}"
    )


def jit_train_step(
  stage: Stage, tx, train_config, state_shardings, mesh, rules, lr_fn=None, text_encoder=None
):
  """``train_step`` jitted once with explicit shardings and the state donated.

  Args:
    stage, tx, train_config, lr_fn: as in ``train_step``.
    state_shardings: the TrainState's shardings (``state.state_shardings``).
    mesh, rules: the mesh (None: one device) and the logical-axis rules.
    text_encoder: a ``TextEncoder`` whose frozen params the step takes as
      ``text_params`` (sharded as they are) to encode 'text_ids' batches; None
      for batches of precomputed 'text_emb'.

  Returns:
    A function ``(state, batch, rng, uncond, text_params=None) -> (state,
    metrics)`` that traces and runs under the mesh and the logical-axis rules;
    its ``lower`` attribute lowers ahead of time with the same arguments
    (benchmarks, memory).
  """
  text_apply = None if text_encoder is None else text_encoder.apply_fn
  fn = functools.partial(
    train_step, stage=stage, tx=tx, train_config=train_config, lr_fn=lr_fn, text_apply=text_apply
  )
  if mesh is None:
    return jax.jit(fn, donate_argnums=(0,))
  replicated = NamedSharding(mesh, P())
  text_shardings = (
    None if text_encoder is None else jax.tree.map(lambda x: x.sharding, text_encoder.params)
  )
  jitted = jax.jit(
    fn,
    in_shardings=(
      state_shardings,
      batch_shardings(mesh, text_encoder is not None),
      replicated,
      replicated,
      text_shardings,
    ),
    out_shardings=(state_shardings, replicated),
    donate_argnums=(0,),
  )

  def run(state, batch, rng, uncond, text_params=None):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(state, batch, rng, uncond, text_params)

  def lower(state, batch, rng, uncond, text_params=None):
    """AOT lowering (arrays or ShapeDtypeStructs) under the mesh and the rules."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted.lower(state, batch, rng, uncond, text_params)

  run.lower = lower
  return run
