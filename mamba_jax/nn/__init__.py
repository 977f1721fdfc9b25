"""Flax NNX layers."""

from mamba_jax.nn.mamba import CausalConv1d, MambaBlock, MambaMixer, RMSNorm

__all__ = ["RMSNorm", "CausalConv1d", "MambaMixer", "MambaBlock"]
