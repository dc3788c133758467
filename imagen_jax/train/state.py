"""TrainState and its creation directly sharded on the mesh."""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from imagen_jax import parallel
from imagen_jax.stages import Stage


class TrainState(struct.PyTreeNode):
  """Everything a train step reads and writes; a plain pytree of arrays."""

  step: jax.Array  # [] int32, number of updates applied
  params: Any  # the stage's parameters (param_dtype), frozen groups included
  ema_params: Any  # exponential moving average of params (sampled from)
  opt_state: Any  # optax state of ``trainable(stage, params)`` only


def trainable(stage: Stage, params: Any) -> Any:
  """The params the optimizer updates: all but the stage's ``frozen`` top-level groups.

  A latent stage's VAE (``frozen = ('vae',)``) stays in ``params`` and ``ema_params``
  (sampling decodes with it) but gets no gradient and no optimizer state.
  """
  if not stage.frozen:
    return params
  return {k: v for k, v in params.items() if k not in stage.frozen}


def with_trainable(stage: Stage, params: Any, new: Any) -> Any:
  """``params`` with its trainable groups replaced by ``new`` (the frozen ones as they are)."""
  if not stage.frozen:
    return new
  return dict(params, **new)


def _init_state(
  rng: jax.Array, stage: Stage, tx: optax.GradientTransformation, text_len: int
) -> TrainState:
  """Boxed TrainState (logical names kept), for eval_shape and the sharded init."""
  params = stage.init(rng, text_len)
  plain = nn.unbox(params)
  opt_state = tx.init(trainable(stage, plain))
  # Re-box the optimizer moments so they inherit the parameters' logical names.
  opt_state = _rebox_like(opt_state, trainable(stage, plain), trainable(stage, params))
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=opt_state
  )


def _rebox_like(tree: Any, plain_params: Any, boxed_params: Any) -> Any:
  """Replaces every sub-tree of ``tree`` shaped like the params by its boxed twin."""
  params_def = jax.tree_util.tree_structure(plain_params)
  shapes = [p.shape for p in jax.tree_util.tree_leaves(plain_params)]

  def is_params(x):
    # Same nesting AND same shapes: Adafactor's factored moments share the
    # nesting but not the shapes, and must not inherit the parameters' names.
    if jax.tree_util.tree_structure(x) != params_def:
      return False
    return [getattr(v, "shape", None) for v in jax.tree_util.tree_leaves(x)] == shapes

  def rebox(x):
    if not is_params(x):
      return x
    return jax.tree.map(
      lambda box, v: box.replace_boxed(v),
      boxed_params,
      x,
      is_leaf=lambda b: isinstance(b, nn.Partitioned),
    )

  return jax.tree.map(rebox, tree, is_leaf=is_params)


def state_shardings(
  stage: Stage, tx: optax.GradientTransformation, mesh, rules, text_len: int = 8
) -> tuple[Any, TrainState]:
  """(NamedShardings of the TrainState, abstract unboxed TrainState)."""
  abstract = jax.eval_shape(
    functools.partial(_init_state, stage=stage, tx=tx, text_len=text_len), jax.random.PRNGKey(0)
  )
  shardings = parallel.logical_shardings(abstract, mesh, rules)
  return shardings, nn.unbox(abstract)


def create_train_state(
  rng: jax.Array,
  stage: Stage,
  tx: optax.GradientTransformation,
  mesh: Optional[jax.sharding.Mesh],
  rules,
  text_len: int = 8,
) -> tuple[TrainState, Any]:
  """Initializes the TrainState directly sharded (never whole on one device).

  Returns:
    (state, shardings): the unboxed state and its per-leaf NamedShardings.
  """
  shardings, _ = state_shardings(stage, tx, mesh, rules, text_len)
  init = lambda r: nn.unbox(_init_state(r, stage, tx, text_len))
  state = parallel.run_init(init, rng, shardings if mesh is not None else None, mesh)
  return state, shardings
