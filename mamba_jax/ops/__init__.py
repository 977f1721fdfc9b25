"""Pure functions (no modules): the selective scan dispatcher and the causal conv."""

from mamba_jax.ops.conv1d import causal_conv1d, causal_conv1d_step
from mamba_jax.ops.selective_scan import (
    IMPLS,
    VERIFIED_STATE_SIZES,
    resolve_impl,
    selective_scan,
    selective_state_update,
)
from mamba_jax.ops.ssd import SSD_IMPLS, resolve_ssd_impl, ssd, ssd_step

__all__ = [
    "selective_scan",
    "selective_state_update",
    "resolve_impl",
    "IMPLS",
    "VERIFIED_STATE_SIZES",
    "causal_conv1d",
    "causal_conv1d_step",
    "ssd",
    "ssd_step",
    "resolve_ssd_impl",
    "SSD_IMPLS",
]
