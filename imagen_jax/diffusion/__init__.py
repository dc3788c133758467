"""Diffusion math as pure functions: schedules, losses, guidance, sampling.

No Flax and no model code here: sampling takes a denoise function
`model_fn(x_t, t, args) -> prediction`. One interface (`sampling`: a static
SamplerSpec, traced SamplerOptions, one jitted loop over `loop.run`) runs
every sampler; its update rules live in `rules_ancestral` and `rules_ode`,
its grids in `grids`; `samplers` keeps the old call style on top of it.
"""

from imagen_jax.diffusion import grids
from imagen_jax.diffusion import guidance
from imagen_jax.diffusion import loop
from imagen_jax.diffusion import losses
from imagen_jax.diffusion import rules_ancestral
from imagen_jax.diffusion import rules_ode
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion import sampling
from imagen_jax.diffusion import schedules

__all__ = [
  "grids",
  "guidance",
  "loop",
  "losses",
  "rules_ancestral",
  "rules_ode",
  "samplers",
  "sampling",
  "schedules",
]
