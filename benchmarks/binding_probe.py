"""Can the demo's text path bind? A supervised probe without the diffusion model.

The demo's base stage fails two-object prompts by mixing up which color and shape go
to which quadrant (``benchmarks/RESULTS.md``, demo binding table). This probe asks
whether the text side is the limit. It takes the config's frozen text encoder (the
demo: a random T5 over a word vocabulary fitted on shapes captions) and the UNet's
trainable text layers (``model.text_layers`` / ``text_conv_kernel`` of the first
stage), and puts on top one cross-attention with four *learned* queries, one per
quadrant, each classifying its quadrant's color (or empty) and shape. Trained with
cross-entropy on fresh shapes captions (three quarters two-object), it reports the
share of held-out captions whose four quadrants are all right:

  python -m benchmarks.binding_probe --config configs/demo.py [--steps 1600] [--batch 32]

If the probe binds in a few hundred steps while the diffusion model does not in
1600, the limit is on the image side: the queries the UNet forms from noisy image
features, or how few training examples are noisy enough that the layout must come
from the text alone.
"""

import argparse
import json
import os
import tempfile
import time
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from imagen_jax import cli
from imagen_jax.data import shapes
from imagen_jax.models import attention as attention_lib
from imagen_jax.models import text_layers
from imagen_jax.text import words
from imagen_jax.text.encoder import TextEncoder

_EMPTY = len(shapes.COLORS)  # the color class of a quadrant without an object


def parse_args(argv: Optional[Sequence[str]]):
  p = argparse.ArgumentParser(prog="python -m benchmarks.binding_probe", description=__doc__)
  cli.add_config_arg(p)
  p.add_argument("--stage", default=None, help="whose text layers (default: the first stage)")
  p.add_argument("--steps", type=int, default=1600)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--eval_every", type=int, default=200)
  p.add_argument("--num_eval", type=int, default=400, help="held-out captions")
  p.add_argument("--two_object_share", type=float, default=0.75)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="write the curve as JSON here")
  args, rest = p.parse_known_args(argv)
  return args, cli.config_from_args(args, rest)


def make_batch(rng: np.random.Generator, n: int, two_object_share: float):
  """n captions with per-quadrant labels: colors [n, 4] (``_EMPTY``: none), shapes [n, 4]."""
  captions = []
  colors = np.full((n, len(shapes.QUADRANTS)), _EMPTY)
  kinds = np.zeros((n, len(shapes.QUADRANTS)), int)
  for i in range(n):
    objects = shapes.sample_objects(rng, 2 if rng.random() < two_object_share else 1)
    captions.append(shapes.make_caption(objects))
    for o in objects:
      if o.position in shapes.QUADRANTS:  # a centered single object has no quadrant
        q = shapes.QUADRANTS.index(o.position)
        colors[i, q] = shapes.COLORS.index(o.color)
        kinds[i, q] = shapes.SHAPES.index(o.shape)
  return captions, colors, kinds


class QuadrantProbe(nn.Module):
  """The UNet's text layers, then one cross-attention with a learned query per quadrant."""

  text_layers: int
  text_layer_heads: int
  max_offset: int
  conv_kernel: int

  @nn.compact
  def __call__(self, text, mask):
    if self.text_layers or self.conv_kernel:
      text = text_layers.TextTransformer(
        self.text_layers,
        self.text_layer_heads,
        max_offset=self.max_offset,
        conv_kernel=self.conv_kernel,
      )(text, mask)
    b, length, d = text.shape
    queries = self.param("queries", nn.initializers.normal(1.0), (len(shapes.QUADRANTS), d))
    q = jnp.broadcast_to(nn.Dense(d)(queries) * d**-0.5, (b, len(shapes.QUADRANTS), d))
    heads = lambda x: x[:, :, None, :]  # one head: [B, T, 1, D]
    h = attention_lib.xla_attention(
      heads(q), heads(nn.Dense(d)(text)), heads(nn.Dense(d)(text)), mask
    )[:, :, 0]
    h = nn.gelu(nn.Dense(d)(h))
    return nn.Dense(len(shapes.COLORS) + 1)(h), nn.Dense(len(shapes.SHAPES))(h)


def scene_accuracy(color_logits, shape_logits, colors, kinds) -> np.ndarray:
  """[n] bool: every quadrant's color (or emptiness) and every object's shape right."""
  ok_color = np.asarray(color_logits.argmax(-1)) == colors
  ok_shape = (np.asarray(shape_logits.argmax(-1)) == kinds) | (colors == _EMPTY)
  return (ok_color & ok_shape).all(-1)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args, config = parse_args(argv)
  stage = config.stages[args.stage or list(config.stages.keys())[0]].model
  rng = np.random.default_rng(args.seed)
  with tempfile.TemporaryDirectory() as tmp:
    if config.text.get("fit_tokenizer") and not config.text.get("path"):
      corpus, _, _ = make_batch(np.random.default_rng(args.seed + 1), 4000, 0.5)
      words.fit_word_tokenizer(corpus, tmp, vocab_size=int(config.text.random.vocab_size))
      config.text.tokenizer = tmp
    encoder = TextEncoder.from_config(config.text)

  def encode(captions):
    emb, mask = encoder.encode(captions, int(config.text.max_length))
    return jnp.asarray(emb, jnp.float32), jnp.asarray(mask, bool)

  probe = QuadrantProbe(
    int(stage.get("text_layers", 0)),
    int(stage.get("text_layer_heads", 4)),
    int(stage.get("text_layer_max_offset", 16)),
    int(stage.get("text_conv_kernel", 0)),
  )
  captions, colors, kinds = make_batch(rng, args.batch, args.two_object_share)
  params = probe.init(jax.random.key(args.seed), *encode(captions))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, emb, mask, colors, kinds):
    def loss_fn(p):
      lc, ls = probe.apply(p, emb, mask)
      xent = optax.softmax_cross_entropy_with_integer_labels
      return xent(lc, colors).mean() + xent(ls, kinds).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  eval_caps, eval_colors, eval_kinds = make_batch(
    np.random.default_rng(args.seed + 2), args.num_eval, 0.5
  )
  eval_inputs = encode(eval_caps)
  two = np.array([" and " in c for c in eval_caps])
  curve, start = [], time.perf_counter()
  for i in range(1, args.steps + 1):
    captions, colors, kinds = make_batch(rng, args.batch, args.two_object_share)
    params, opt_state, loss = step(params, opt_state, *encode(captions), colors, kinds)
    if i % args.eval_every == 0 or i == args.steps:
      ok = scene_accuracy(*probe.apply(params, *eval_inputs), eval_colors, eval_kinds)
      row = dict(step=i, loss=float(loss), two=float(ok[two].mean()), one=float(ok[~two].mean()))
      curve.append(row)
      print(
        f"step {i}: loss {row['loss']:.3f}, two-object {row['two']:.0%}, single {row['one']:.0%}",
        flush=True,
      )
  settings = dict(
    text_layers=probe.text_layers, text_conv_kernel=probe.conv_kernel, steps=args.steps
  )
  result = dict(curve=curve, seconds=time.perf_counter() - start, settings=settings)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2, default=str)
  return result


if __name__ == "__main__":
  main()
