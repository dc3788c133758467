"""Device mesh, logical-axis sharding presets and helpers to shard pytrees."""

from imagen_jax.parallel.sharding import (  # noqa: F401
    MESH_AXES,
    STRATEGIES,
    fit_sharding,
    logical_rules,
    logical_shardings,
    make_mesh,
    run_init,
)
