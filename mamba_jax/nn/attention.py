"""Causal multi-head self-attention with RoPE and grouped KV heads.

The layer of the reference ``mamba_ssm/modules/mha.py`` (``MHA`` with
``causal=True``), used by the hybrid and Transformer++ layouts
(``MambaConfig.attn_layer_idx``):

* ``in_proj`` (e -> (h + 2 h_kv) p) is the fused projection; its output is
  ``[q (h p) | k (h_kv p) | v (h_kv p)]``, each head's ``p`` dims contiguous;
* RoPE (:func:`apply_rotary`) rotates the first ``rotary_dim`` dims of every
  query and key head, rotate-half convention (GPT-NeoX, flash-attn's
  non-interleaved ``RotaryEmbedding``), frequencies ``base ** (-2i / rotary_dim)``;
* grouped-query attention: query head ``i`` uses KV head ``i // (h / h_kv)``
  (the reference's ``repeat_interleave``);
* scores ``q . k / sqrt(p)`` and the softmax in float32; the causal mask;
* ``out_proj`` (h p -> e);
* with ``attn_d_conv`` = k > 0 (``mamba2attn``), a causal depthwise
  convolution ``conv1d`` (k taps, bias, no activation) over the fused q/k/v
  projection before RoPE, as the reference ``MHA(d_conv=k)``; padded tokens
  feed it zeros, and a document's tokens see only their own document's.

The score matrix (b, h, l, l) is materialised (no flash kernel): attention
memory grows with the square of the sequence length, on purpose (it is the
baseline the experiments compare against).

Left padding (``mask`` (b, l) bool, False = padding): padded keys get no
attention weight, and positions count real tokens only (``cumsum(mask) - 1``),
so the real tokens of a left-padded row get the outputs they get alone. A
padded query attends to itself only (its output is meaningless but finite).

With a cache (:class:`mamba_jax.cache.AttentionLayerCache`), the new keys and
values are written to the next slots of a preallocated buffer and the queries
attend to every valid slot up to their own: a prompt, a chunk or one token
give the outputs of the parallel forward.

Logical axes: ``embed`` (d_model) and ``heads`` (the fused q/k/v outputs and
the (h p) input of ``out_proj``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from mamba_jax.cache import AttentionLayerCache
from mamba_jax.config import MambaConfig
from mamba_jax.nn.conv import CausalConv1d
from mamba_jax.nn.init import partitioned, torch_linear_init
from mamba_jax.typing import Array, DType, Float, Int

_F32 = jnp.float32
_I32 = jnp.int32


def rotary_frequencies(rotary_dim: int, base: float) -> Float[Array, " half"]:
    """``base ** (-2i / rotary_dim)`` for ``i < rotary_dim / 2``, float32 (as the reference)."""
    return 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=_F32) / rotary_dim))


def apply_rotary(
    x: Float[Array, "b l h p"], positions: Int[Array, "b l"], *, rotary_dim: int, base: float = 10000.0
) -> Float[Array, "b l h p"]:
    """Rotary position embedding, rotate-half convention, on the first ``rotary_dim`` dims.

    With ``x1, x2`` the two halves of ``x[..., :rotary_dim]`` and angles
    ``positions * rotary_frequencies(rotary_dim, base)``, the result is
    ``[x1 cos - x2 sin, x2 cos + x1 sin, x[..., rotary_dim:]]``. Computed in
    float32, returned in ``x.dtype``. ``rotary_dim == 0`` returns ``x``.
    """
    if rotary_dim == 0:
        return x
    half = rotary_dim // 2
    angles = positions.astype(_F32)[..., None] * rotary_frequencies(rotary_dim, base)  # (b, l, half)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    xf = x.astype(_F32)
    x1, x2 = xf[..., :half], xf[..., half:rotary_dim]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, xf[..., rotary_dim:]], axis=-1)
    return rotated.astype(x.dtype)


def dot_product_attention(
    q: Float[Array, "b l h p"],
    k: Float[Array, "b m g p"],
    v: Float[Array, "b m g p"],
    allowed: Array,
) -> Float[Array, "b l h p"]:
    """``softmax(q k^T / sqrt(p) where allowed) v`` with ``g`` KV heads shared by ``h / g`` query heads each.

    ``allowed`` (b, l, m) bool says which keys each query sees; every query must
    see at least one key. Scores and softmax in float32; the probabilities are
    cast to ``v.dtype`` for the second product (accumulated in float32). The
    products are einsums (dot_generals), which XLA maps to matmuls everywhere.
    """
    b, l, h, p = q.shape
    g = k.shape[2]
    qg = q.reshape(b, l, g, h // g, p)  # query head i = (i // r, i % r): KV head i // r
    scores = jnp.einsum("blgrp,bmgp->bgrlm", qg, k, preferred_element_type=_F32) * (p**-0.5)
    scores = jnp.where(allowed[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bgrlm,bmgp->blgrp", probs.astype(v.dtype), v, preferred_element_type=_F32)
    return out.reshape(b, l, h, p).astype(q.dtype)


class CausalSelfAttention(nnx.Module):
    """Causal self-attention, the mixer of the layers in ``config.attn_layer_idx``.

    Args:
      config: the model configuration (``attn_*`` fields, ``d_model``, and
        ``n_layer`` / ``d_intermediate`` for the residual rescale of ``out_proj``).
      dtype: compute dtype (projections, keys and values); scores and softmax are float32.
      param_dtype: storage dtype of the parameters.
      rngs: random streams for initialisation.

    Initialisation follows the reference ``_init_weights``: torch's default
    ``nn.Linear`` range for ``in_proj``, the same range divided by
    ``sqrt(n_residuals_per_layer * n_layer)`` for ``out_proj``, zero biases.
    """

    def __init__(self, config: MambaConfig, *, dtype: DType = _F32, param_dtype: DType = _F32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.num_heads = h = config.attn_num_heads
        self.num_heads_kv = g = config.resolved_attn_num_heads_kv
        self.head_dim = p = config.resolved_attn_head_dim
        self.rotary_dim = config.resolved_attn_rotary_dim
        self.rope_base = float(config.attn_rope_base)
        e = config.d_model
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = nnx.Linear(
            e,
            (h + 2 * g) * p,
            use_bias=config.attn_qkv_bias,
            kernel_init=partitioned(torch_linear_init(e), ("embed", "heads")),
            bias_init=partitioned(nnx.initializers.zeros, ("heads",)),
            **common,
        )
        self.conv1d = (
            CausalConv1d((h + 2 * g) * p, config.attn_d_conv, use_bias=True, **common) if config.attn_d_conv else None
        )
        out_scale = (config.n_residuals_per_layer * config.n_layer) ** -0.5
        self.out_proj = nnx.Linear(
            h * p,
            e,
            use_bias=config.attn_out_bias,
            kernel_init=partitioned(torch_linear_init(h * p, scale=out_scale), ("heads", "embed")),
            bias_init=partitioned(nnx.initializers.zeros, ("embed",)),
            **common,
        )

    def __call__(
        self,
        hidden: Float[Array, "b l e"],
        cache: AttentionLayerCache | None = None,
        mask: Array | None = None,
        seq_idx: Array | None = None,
    ) -> Float[Array, "b l e"] | tuple[Float[Array, "b l e"], AttentionLayerCache]:
        """Attends causally along time. ``mask`` (b, l) bool marks real tokens
        (left padding: see the module docstring). With ``cache``, continues after
        the cached tokens and also returns the updated cache. ``seq_idx`` (b, l)
        int: packed documents; a query attends only to keys of its own document
        (RoPE scores depend on relative positions only, so a document gets the
        outputs it gets alone). The cached tokens belong to the first document of
        the call, and the returned cache keeps only the last document's."""
        b, l, _ = hidden.shape
        h, g, p = self.num_heads, self.num_heads_kv, self.head_dim
        qkv = self.in_proj(hidden)
        real = jnp.ones((b, l), jnp.bool_) if mask is None else mask
        conv_state = None
        if self.conv1d is not None:
            if mask is not None:  # padding feeds zeros to the convolution
                qkv = jnp.where(mask[..., None], qkv, jnp.zeros_like(qkv))
            if cache is None:
                qkv = self.conv1d(qkv, seq_idx=seq_idx)
            else:
                qkv, conv_state = self.conv1d(qkv, cache.conv_state, seq_idx)
        q = qkv[..., : h * p].reshape(b, l, h, p)
        k = qkv[..., h * p : (h + g) * p].reshape(b, l, g, p)
        v = qkv[..., (h + g) * p :].reshape(b, l, g, p)
        seen = jnp.zeros((b,), _I32) if cache is None else cache.lengths
        positions = seen[:, None] + jnp.cumsum(real, axis=1, dtype=_I32) - 1
        q = apply_rotary(q, positions, rotary_dim=self.rotary_dim, base=self.rope_base)
        k = apply_rotary(k, positions, rotary_dim=self.rotary_dim, base=self.rope_base)

        query_slot = jnp.arange(l, dtype=_I32)
        if cache is None:
            keys, values, key_valid = k, v, real
        else:
            cache.check_room(l)
            index = cache.index
            start = (jnp.zeros((), _I32), index, jnp.zeros((), _I32), jnp.zeros((), _I32))
            keys = lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start)
            values = lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start)
            key_valid = lax.dynamic_update_slice(cache.valid, real, start[:2])
            query_slot = query_slot + index
        key_slot = jnp.arange(keys.shape[1], dtype=_I32)
        causal = key_slot[None, :] <= query_slot[:, None]
        own = key_slot[None, :] == query_slot[:, None]  # a padded query sees itself: no empty row
        allowed = causal[None] & (key_valid[:, None, :] | own[None])
        if seq_idx is not None:
            key_doc = seq_idx
            if cache is not None:  # cached slots: the first document of this call
                key_doc = jnp.broadcast_to(seq_idx[:, :1], key_valid.shape)
                key_doc = lax.dynamic_update_slice(key_doc, seq_idx.astype(key_doc.dtype), start[:2])
                key_valid = key_valid & (key_doc == seq_idx[:, -1:])  # the next call continues the last document
            allowed = allowed & (key_doc[:, None, :] == seq_idx[:, :, None])
        out = dot_product_attention(q, keys, values, allowed)
        if cache is not None:  # inside jit an overflow cannot raise: make it visible instead
            out = jnp.where(cache.index + l > cache.max_length, jnp.asarray(jnp.nan, out.dtype), out)
        out = self.out_proj(out.reshape(b, l, h * p))
        if cache is None:
            return out
        new_cache = AttentionLayerCache(
            k=keys,
            v=values,
            valid=key_valid,
            lengths=cache.lengths + jnp.sum(real, axis=1, dtype=_I32),
            index=cache.index + l,
            conv_state=conv_state,
        )
        return out, new_cache
