"""Diffusion math as pure functions: schedules, losses, guidance, samplers.

No Flax and no model code here: samplers take a denoise function
`model_fn(x_t, t, args) -> prediction` (see `samplers`).
"""

from imagen_jax.diffusion import guidance
from imagen_jax.diffusion import if_solvers
from imagen_jax.diffusion import loop
from imagen_jax.diffusion import losses
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion import schedules
from imagen_jax.diffusion import solvers

__all__ = ["guidance", "if_solvers", "loop", "losses", "samplers", "schedules", "solvers"]
