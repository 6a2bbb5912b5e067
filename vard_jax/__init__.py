"""vard_jax: value-based RL fine-tuning of diffusion models (VARD) in JAX/Flax."""

__version__ = "0.1.0"
