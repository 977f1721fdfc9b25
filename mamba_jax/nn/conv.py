"""The depthwise causal convolution layer shared by the Mamba-1 and Mamba-2 mixers."""

from __future__ import annotations

from flax import nnx

from mamba_jax.nn.init import partitioned, torch_linear_init
from mamba_jax.ops import causal_conv1d
from mamba_jax.typing import DType


class CausalConv1d(nnx.Module):
    """Depthwise causal convolution; ``kernel`` is (k, d) (torch's weight (d, 1, k) transposed),
    initialised as torch's ``Conv1d`` (fan_in = k for a depthwise kernel)."""

    def __init__(self, dim: int, width: int, *, use_bias: bool, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        init = torch_linear_init(width)
        self.dtype = dtype
        self.kernel = nnx.Param(partitioned(init, ("conv", "mlp"))(rngs.params(), (width, dim), param_dtype))
        self.bias = (
            nnx.Param(partitioned(init, ("mlp",))(rngs.params(), (dim,), param_dtype)) if use_bias else None
        )

    def __call__(self, x, conv_state=None, seq_idx=None):
        """:func:`mamba_jax.ops.causal_conv1d` (``seq_idx``: packed documents)."""
        bias = None if self.bias is None else self.bias[...]
        return causal_conv1d(x.astype(self.dtype), self.kernel[...], bias, conv_state, seq_idx)
