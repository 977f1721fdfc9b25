"""Flax NNX layers."""

from mamba_jax.nn.mamba import Block, CausalConv1d, MambaBlock, MambaMixer, RMSNorm
from mamba_jax.nn.attention import CausalSelfAttention, apply_rotary, dot_product_attention
from mamba_jax.nn.mlp import GatedMLP
from mamba_jax.nn.mamba2 import Mamba2Mixer, RMSNormGated

__all__ = [
    "RMSNorm",
    "CausalConv1d",
    "MambaMixer",
    "Block",
    "MambaBlock",
    "Mamba2Mixer",
    "RMSNormGated",
    "CausalSelfAttention",
    "GatedMLP",
    "apply_rotary",
    "dot_product_attention",
]
