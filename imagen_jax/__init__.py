"""imagen_jax: the Imagen text-to-image diffusion cascade in JAX/Flax."""

__version__ = "0.1.0"
