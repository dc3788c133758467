"""Optimizer and learning-rate schedule from ``config.train``."""

from typing import Any

import optax


def lr_schedule(train_config: Any) -> optax.Schedule:
  """Linear warmup to ``lr``, then cosine decay to ``lr · end_lr_frac`` at num_steps."""
  c = train_config
  warmup = int(min(c.warmup_steps, max(c.num_steps - 1, 0)))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=c.lr,
    warmup_steps=warmup,
    decay_steps=max(int(c.num_steps), warmup + 1),
    end_value=c.lr * c.end_lr_frac,
  )


def make_optimizer(train_config: Any) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW or Adafactor, with ``lr_schedule``.

  Args:
    train_config: ``config.train`` (optimizer, lr, warmup_steps, num_steps,
      end_lr_frac, weight_decay, b1, b2, grad_clip).
  """
  c = train_config
  schedule = lr_schedule(c)
  if c.optimizer == "adamw":
    opt = optax.adamw(schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay)
  elif c.optimizer == "adafactor":
    # Absolute step sizes, as with AdamW: optax's default relative step (updates
    # scaled by max(RMS(param), 1e-3)) barely moves the UNets' zero-initialized
    # output layers (1e-5 per step at lr 1e-2, measured), and those layers gate
    # every other gradient at the start of training.
    opt = optax.adafactor(
      schedule, multiply_by_parameter_scale=False, weight_decay_rate=c.weight_decay or None
    )
  else:
    raise ValueError(f"unknown optimizer {c.optimizer!r}; expected 'adamw' or 'adafactor'")
  if c.grad_clip and c.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(c.grad_clip), opt)
  return opt
