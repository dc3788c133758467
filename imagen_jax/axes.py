"""Logical axis names shared by every module that creates parameters or activations.

Layers annotate parameters (``nn.with_logical_partitioning``) and activations
(``nn.with_logical_constraint``) with these names; a rules table
(``imagen_jax.parallel.logical_rules``) maps them to the mesh axes
``data``/``fsdp``/``tensor``. This module is a dependency-free constant table so
that leaf packages (``text/``, ``models/``) can import it.
"""

# Activations.
BATCH = "batch"  # examples
LENGTH = "length"  # text tokens
HEIGHT = "height"  # image rows
WIDTH = "width"  # image columns

# Parameters (and the channel axis of activations). A logical name may occur
# once per array (flax's rule): square kernels name their output side MLP or HEADS.
EMBED = "embed"  # residual-stream width: UNet channels, T5 d_model, time-embedding width
MLP = "mlp"  # hidden width inside a block: ResBlock inner channels, T5 d_ff
HEADS = "heads"  # attention heads
KV = "kv"  # per-head width
VOCAB = "vocab"  # token embedding rows
KERNEL = "kernel"  # reserved; conv spatial axes are left unnamed (never sharded)
TEXT_EMBED = "text_embed"  # width of incoming text embeddings (e.g. 4096 for T5-XXL)
RELPOS = "relpos_buckets"  # T5 relative-position buckets
NORM = "norm"  # scale/bias of a norm over the full channel axis (replicated)

ALL = (BATCH, LENGTH, HEIGHT, WIDTH, EMBED, MLP, HEADS, KV, VOCAB, KERNEL, TEXT_EMBED, RELPOS, NORM)
