"""Data: TFDS builders (synthetic shapes, captioned image folders) and the grain
input pipeline.

Modules (imported explicitly; this package imports nothing eagerly so that
`imagen_jax.data.shapes` stays light for evaluators):
  shapes          vocabulary, renderer and caption parser (numpy + PIL only).
  shapes_builder  TFDS builder `shapes`.
  image_captions  TFDS builder `image_captions`.
  datasets        load_builder / prepare / resolution checks.
  pipeline        grain pipeline: make_dataset, build_input, make_global_batch.
  prepare         CLI: python -m imagen_jax.data.prepare --dataset shapes ...

A leaf package: nothing else from imagen_jax is imported here.
"""
