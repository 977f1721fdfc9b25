"""Inference cache pytrees: per layer, the conv state and the float32 SSM state,
or the keys and values of an attention layer.

A Mamba layer's cache is a fixed-size summary of everything seen so far: its
size does not depend on the context length, so a one-token step costs O(1) in
the context. An attention layer keeps every key and value: its cache is a
preallocated buffer of ``max_length`` slots (fixed shapes, so a jitted step is
compiled once), and a step costs O(max_length).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mamba_jax.typing import Array, DType, Float


@flax.struct.dataclass
class MambaLayerCache:
    """State of one Mamba mixer (Mamba-1 or Mamba-2).

    Attributes:
      conv_state: the last ``d_conv - 1`` inputs of the convolution, (b, k - 1, d),
        in the compute dtype (the reference keeps ``d_conv`` columns; the newest
        is never needed again, so we keep one fewer). For Mamba-2 the convolution
        runs over ``xBC``: d = ``d_ssm + 2 * ngroups * d_state``.
      ssm_state: the selective-scan state, (b, d, n), always float32; for Mamba-2
        the SSD state (b, h, p, n) (:func:`mamba_jax.nn.mamba2.mamba2_cache_zeros`).
    """

    conv_state: Float[Array, "b k1 d"]
    ssm_state: Float[Array, "b d n"]

    @classmethod
    def zeros(cls, batch_size: int, d_inner: int, d_state: int, d_conv: int, dtype: DType) -> "MambaLayerCache":
        return cls(
            conv_state=jnp.zeros((batch_size, d_conv - 1, d_inner), dtype),
            ssm_state=jnp.zeros((batch_size, d_inner, d_state), jnp.float32),
        )


    @property
    def batch_size(self) -> int:
        return self.ssm_state.shape[0]


@flax.struct.dataclass
class AttentionLayerCache:
    """Keys and values of one attention layer, in a buffer of ``max_length`` slots.

    Every call ``model(ids, cache=...)`` writes its ``l`` tokens to the slots
    ``index .. index + l - 1`` of every row (padded tokens too, marked invalid),
    so the slots are in time order and a query attends to the valid slots up to
    its own. The buffer is not a ring: it holds ``max_length`` tokens in all
    (padding included). Writing past it is an error: :class:`mamba_jax.MambaLM`
    raises a ValueError when ``l > max_length`` or, outside ``jit``, when
    ``index + l > max_length``; inside ``jit`` the index is not known at trace
    time, so the attention outputs of an overflowing call are NaN instead.

    Attributes:
      k: rotated keys (b, max_length, h_kv, p) in the compute dtype.
      v: values (b, max_length, h_kv, p) in the compute dtype.
      valid: (b, max_length) bool, True for slots that hold a real (unpadded) token.
      lengths: (b,) int32, real tokens seen so far per row: the RoPE position of
        the next real token (left padding does not shift positions).
      index: () int32, slots written so far (the same for every row).
      conv_state: with ``MambaConfig.attn_d_conv`` = k > 0, the last ``k - 1``
        fused q/k/v projections before the convolution, (b, k - 1, (h + 2 h_kv) p),
        in the compute dtype; None without the convolution.
    """

    k: Float[Array, "b t g p"]
    v: Float[Array, "b t g p"]
    valid: Array
    lengths: Array
    index: Array
    conv_state: Float[Array, "b k1 q"] | None = None

    @classmethod
    def zeros(
        cls, batch_size: int, max_length: int, num_heads_kv: int, head_dim: int, dtype: DType,
        *, qkv_dim: int = 0, d_conv: int = 0,
    ) -> "AttentionLayerCache":
        shape = (batch_size, max_length, num_heads_kv, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),  # two buffers: a donated cache must not hold one twice
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch_size, max_length), jnp.bool_),
            lengths=jnp.zeros((batch_size,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
            conv_state=jnp.zeros((batch_size, d_conv - 1, qkv_dim), dtype) if d_conv else None,
        )

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def max_length(self) -> int:
        return self.k.shape[1]

    def check_room(self, n_new: int) -> None:
        """Raises a ValueError if ``n_new`` more tokens do not fit: always when
        ``n_new > max_length``, and when they overflow the slots left if ``index`` is
        a concrete value (outside ``jit``)."""
        t = self.max_length
        if n_new > t:
            raise ValueError(f"{n_new} new tokens do not fit in the KV cache of max_length={t} (see init_cache)")
        if not isinstance(self.index, jax.core.Tracer) and int(self.index) + n_new > t:
            raise ValueError(
                f"the KV cache is full: it holds {int(self.index)} of max_length={t} slots and {n_new} more do not "
                "fit; make the cache with a larger init_cache(batch_size, max_length=...)"
            )


@flax.struct.dataclass
class MambaCache:
    """The cache of a whole model: one entry per layer, in order (a
    :class:`MambaLayerCache` for a Mamba layer, an :class:`AttentionLayerCache`
    for an attention layer)."""

    layers: tuple[MambaLayerCache | AttentionLayerCache, ...]

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    @property
    def max_length(self) -> int | None:
        """Slots of the attention layers' KV buffers; None for a pure Mamba model."""
        for layer in self.layers:
            if isinstance(layer, AttentionLayerCache):
                return layer.max_length
        return None

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))
