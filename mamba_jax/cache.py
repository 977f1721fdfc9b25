"""Inference cache pytrees: per layer, the conv state and the float32 SSM state.

A cache is a fixed-size summary of everything seen so far: its size does not
depend on the context length, so a one-token step costs O(1) in the context.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mamba_jax.typing import Array, DType, Float


@flax.struct.dataclass
class MambaLayerCache:
    """State of one Mamba mixer.

    Attributes:
      conv_state: the last ``d_conv - 1`` inputs of the convolution, (b, k - 1, d),
        in the compute dtype (the reference keeps ``d_conv`` columns; the newest
        is never needed again, so we keep one fewer).
      ssm_state: the selective-scan state, (b, d, n), always float32.
    """

    conv_state: Float[Array, "b k1 d"]
    ssm_state: Float[Array, "b d n"]

    @classmethod
    def zeros(cls, batch_size: int, d_inner: int, d_state: int, d_conv: int, dtype: DType) -> "MambaLayerCache":
        return cls(
            conv_state=jnp.zeros((batch_size, d_conv - 1, d_inner), dtype),
            ssm_state=jnp.zeros((batch_size, d_inner, d_state), jnp.float32),
        )


@flax.struct.dataclass
class MambaCache:
    """The cache of a whole model: one entry per layer, in order."""

    layers: tuple[MambaLayerCache, ...]

    @property
    def batch_size(self) -> int:
        return self.layers[0].ssm_state.shape[0]

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))
