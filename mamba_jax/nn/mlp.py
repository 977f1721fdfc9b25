"""The gated MLP (SwiGLU) of the reference ``mamba_ssm/modules/mlp.py``.

``fc1`` (e -> 2f, no bias) splits into ``(y, gate)``; the output is
``fc2(y * silu(gate))`` (f -> e, no bias). Logical axes: ``embed`` (d_model)
and ``mlp`` (the hidden width f).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.nn.init import partitioned, torch_linear_init
from mamba_jax.typing import Array, DType, Float

_F32 = jnp.float32


class GatedMLP(nnx.Module):
    """``fc2(y * silu(gate))`` with ``(y, gate) = split(fc1(x))``.

    Args:
      d_model: input and output width (e).
      hidden: hidden width (f). Unlike the reference, it is used as given (the
        reference rounds it up to a multiple of 128).
      out_scale: scale of ``fc2``'s initialisation range (the residual rescale
        ``1 / sqrt(n_residuals_per_layer * n_layer)`` of the reference).
      use_bias: whether ``fc1`` and ``fc2`` have biases (the reference: no).
    """

    def __init__(
        self,
        d_model: int,
        hidden: int,
        *,
        out_scale: float = 1.0,
        use_bias: bool = False,
        dtype: DType = _F32,
        param_dtype: DType = _F32,
        rngs: nnx.Rngs,
    ):
        self.hidden = hidden
        common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = nnx.Linear(
            d_model,
            2 * hidden,
            kernel_init=partitioned(torch_linear_init(d_model), ("embed", "mlp")),
            bias_init=partitioned(nnx.initializers.zeros, ("mlp",)),
            **common,
        )
        self.fc2 = nnx.Linear(
            hidden,
            d_model,
            kernel_init=partitioned(torch_linear_init(hidden, scale=out_scale), ("mlp", "embed")),
            bias_init=partitioned(nnx.initializers.zeros, ("embed",)),
            **common,
        )

    def __call__(self, x: Float[Array, "b l e"]) -> Float[Array, "b l e"]:
        y, gate = jnp.split(self.fc1(x), 2, axis=-1)
        return self.fc2(y * jax.nn.silu(gate))
