"""mamba-jax: Mamba selective state space models in JAX and Flax NNX."""

from mamba_jax import ops, states
from mamba_jax.cache import AttentionLayerCache, MambaCache, MambaLayerCache
from mamba_jax.config import MambaConfig
from mamba_jax.generation import GenerationConfig, generate
from mamba_jax.interop import from_pretrained, save_pretrained
from mamba_jax.model import MambaLM

__all__ = [
    "ops",
    "states",
    "MambaConfig",
    "MambaLM",
    "MambaCache",
    "MambaLayerCache",
    "AttentionLayerCache",
    "generate",
    "GenerationConfig",
    "from_pretrained",
    "save_pretrained",
]
