"""Device mesh, logical-axis sharding presets and helpers to shard pytrees."""

from imagen_jax.parallel.sharding import (  # noqa: F401
  BATCH_MESH_AXES,
  MESH_AXES,
  STRATEGIES,
  batch_axes,
  batch_sharding,
  config_rules,
  fit_sharding,
  logical_rules,
  logical_shardings,
  make_mesh,
  pad_rows,
  run_init,
)
