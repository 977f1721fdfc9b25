"""Pure functions (no modules): the selective scan dispatcher and the causal conv."""

from mamba_jax.ops.conv1d import causal_conv1d, causal_conv1d_step
from mamba_jax.ops.selective_scan import IMPLS, resolve_impl, selective_scan

__all__ = ["selective_scan", "resolve_impl", "IMPLS", "causal_conv1d", "causal_conv1d_step"]
