"""mamba-jax: Mamba selective state space models in JAX and Flax NNX."""

from mamba_jax import ops

__all__ = ["ops"]
