"""Data: TFDS builders (synthetic shapes, captioned image folders), the grain
input pipeline and streamed webdataset / parquet corpora.

Modules (imported explicitly; this package imports nothing eagerly so that
`imagen_jax.data.shapes` stays light for evaluators):
  shapes          vocabulary, renderer and caption parser (numpy + PIL only).
  shapes_builder  TFDS builder `shapes`.
  image_captions  TFDS builder `image_captions`.
  captions        a captioned folder's listing and fingerprint.
  images          any decoded image -> 8-bit RGB (16-bit, alpha).
  datasets        load_builder / prepare / config checks / resolution checks.
  pipeline        grain pipeline: make_dataset, build_input, train_input,
                  make_global_batch.
  corpus          webdataset / parquet shard readers (local, gs://): records,
                  skip reasons, source patterns.
  streaming       streamed training input from shards, exact resume.
  inspect         CLI: python -m imagen_jax.data.inspect --config C ...
  corpus_builder  TFDS builder `corpus_shards`: shards prepared here or on Beam.
  beam_corpus     its Apache Beam pipeline (imports apache_beam).
  prepare         CLI: python -m imagen_jax.data.prepare --dataset shapes ...

Nearly a leaf package: from the rest of imagen_jax it imports only the leaf
modules `imagen_jax.lockfile` and (inspect) `imagen_jax.cli`.
"""
