"""MambaLM: embedding, residual blocks, final norm and the (tied) LM head.

The blocks are Mamba blocks, or, per ``MambaConfig.attn_layer_idx`` and
``d_intermediate``, attention blocks and blocks with a gated MLP: the pure
Mamba, hybrid and Transformer++ layouts of the reference ``MixerModel``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax.cache import AttentionLayerCache, MambaCache, MambaLayerCache
from mamba_jax.config import MambaConfig
from mamba_jax.nn.init import partitioned
from mamba_jax.nn.mamba import Block, RMSNorm
from mamba_jax.nn.mamba2 import mamba2_cache_zeros
from mamba_jax.typing import Array, DType, Float, Int

_F32 = jnp.float32


class MambaLM(nnx.Module):
    """A Mamba-1 or Mamba-2 (or hybrid, or Transformer++) language model (the reference ``MambaLMHeadModel``).

    ``model(input_ids)`` runs the parallel forward: (b, l) int -> logits (b, l, v)
    with ``v = config.padded_vocab_size``. ``model(input_ids, cache=cache)``
    continues from a cache made by :meth:`init_cache` (or returned by an earlier
    call) and returns ``(logits, new_cache)``: a whole prompt, a chunk of one or
    a single token all work and give the same logits as the parallel forward.
    Models with attention layers (``config.attn_layer_idx``) need
    ``init_cache(batch_size, max_length)``: their KV buffers hold ``max_length``
    tokens in all.

    Args:
      config: the model configuration.
      dtype: compute dtype (activations, matmuls); the scan state is always float32.
      param_dtype: storage dtype of the parameters.
      rngs: random streams for initialisation.
    """

    def __init__(self, config: MambaConfig, *, dtype: DType = _F32, param_dtype: DType = _F32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embedding = nnx.Embed(
            config.padded_vocab_size,
            config.d_model,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [
                Block(config, layer_idx=i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for i in range(config.n_layer)
            ]
        )
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if not config.tie_embeddings:
            self.lm_head = nnx.Linear(
                config.d_model,
                config.padded_vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=partitioned(nnx.initializers.normal(0.02), ("embed", "vocab")),
                rngs=rngs,
            )

    def init_cache(self, batch_size: int, max_length: int | None = None) -> MambaCache:
        """An empty cache (zeros) for ``batch_size`` sequences.

        Every layer gets buffers of its own (and an attention layer separate ones
        for keys and values), so the cache can be donated to a jitted step
        (``jax.jit(..., donate_argnums=...)``).

        ``max_length``: the number of tokens (padding included) the attention
        layers' KV buffers hold, prompt and generated tokens together; required
        when the model has attention layers. A pure Mamba model ignores it: its
        cache does not grow with the context.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"{batch_size=} must be a positive int")
        cfg = self.config
        if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1):
            raise ValueError(f"{max_length=} must be None or a positive int")
        if cfg.has_attention and max_length is None:
            raise ValueError(
                f"this model has attention layers (attn_layer_idx={cfg.attn_layer_idx}): init_cache needs "
                "max_length, the number of tokens their KV cache holds (prompt + generated)"
            )

        def layer(i):  # called once per layer: no two layers share a buffer
            if cfg.is_attention_layer(i):
                g, p = cfg.resolved_attn_num_heads_kv, cfg.resolved_attn_head_dim
                return AttentionLayerCache.zeros(
                    batch_size, max_length, g, p, self.dtype,
                    qkv_dim=(cfg.attn_num_heads + 2 * g) * p, d_conv=cfg.attn_d_conv,
                )
            if cfg.is_mamba2:
                return mamba2_cache_zeros(cfg, batch_size, self.dtype)
            return MambaLayerCache.zeros(batch_size, cfg.d_inner, cfg.d_state, cfg.d_conv, self.dtype)

        return MambaCache(layers=tuple(layer(i) for i in range(cfg.n_layer)))

    def __call__(
        self,
        input_ids: Int[Array, "b l"],
        cache: MambaCache | None = None,
        mask: Array | None = None,
        seq_idx: Int[Array, "b l"] | None = None,
    ) -> Float[Array, "b l v"] | tuple[Float[Array, "b l v"], MambaCache]:
        """Logits for ``input_ids``; with ``cache``, also the updated cache.

        ``mask`` (b, l) bool, optional: ``False`` marks padding. Padded steps leave
        every layer's state unchanged and feed zeros to the convolutions, and
        attention layers give padded keys no weight and do not count them as
        positions, so with left padding each sequence's real tokens get the
        logits they get alone. The logits at padded positions are meaningless.
        Only left padding is supported: padding after a real token (right or in
        the middle), or at the start of a row whose cache already holds tokens,
        would reach the convolution. Outside ``jit`` such a mask raises a
        ValueError naming the row; inside ``jit`` it is not checked.

        ``seq_idx`` (b, l) int, nondecreasing per row: several documents packed in a
        row; nothing crosses a change of id, so each document gets the logits it gets
        alone. Implemented for Mamba-2 layers (``config.layer="mamba2"``) only so far:
        Mamba-1 and attention layers raise NotImplementedError.
        """
        self._check_input_ids(input_ids, cache)
        if mask is not None:
            if not hasattr(mask, "shape") or tuple(mask.shape) != tuple(input_ids.shape) or mask.dtype != jnp.bool_:
                raise ValueError(
                    f"mask must be a bool array of shape (b, l)={tuple(input_ids.shape)}, "
                    f"got {getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}"
                )
            if not isinstance(mask, jax.core.Tracer):
                _check_left_padding(mask, cache)
        if seq_idx is not None:
            _check_seq_idx(seq_idx, input_ids.shape)
        hidden = self.embedding(input_ids)
        residual = None
        new_layers = []
        if cache is None and (self.config.scan_layers or self.config.remat != "none"):
            hidden, residual = _run_blocks(self.layers, self.config, hidden, mask, seq_idx)
        else:
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else cache.layers[i]
                hidden, residual, layer_cache = layer(hidden, residual, layer_cache, mask, seq_idx)
                new_layers.append(layer_cache)
        residual = residual + hidden.astype(residual.dtype)
        hidden = self.norm_f(residual)
        if self.config.tie_embeddings:
            logits = self.embedding.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        if cache is None:
            return logits
        return logits, MambaCache(layers=tuple(new_layers))

    def _check_input_ids(self, input_ids, cache):
        if not hasattr(input_ids, "dtype") or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise TypeError(f"input_ids must be an integer array of shape (b, l), got {getattr(input_ids, 'dtype', type(input_ids))}")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape (b, l) with l >= 1, got input_ids.shape={tuple(input_ids.shape)}")
        if cache is not None:
            cfg = self.config
            kinds = tuple(AttentionLayerCache if cfg.is_attention_layer(i) else MambaLayerCache for i in range(cfg.n_layer))
            if (
                not isinstance(cache, MambaCache)
                or len(cache.layers) != cfg.n_layer
                or not all(isinstance(c, k) for c, k in zip(cache.layers, kinds))
            ):
                raise TypeError(
                    f"cache must be a MambaCache with {cfg.n_layer} layers of the kinds of this model (see init_cache)"
                )
            if cache.batch_size != input_ids.shape[0]:
                raise ValueError(
                    f"cache has batch size {cache.batch_size} but input_ids.shape={tuple(input_ids.shape)}"
                )
            kv = [c for c in cache.layers if isinstance(c, AttentionLayerCache)]
            if kv:  # before any work (every attention layer has written the same slots)
                kv[0].check_room(input_ids.shape[1])
        if not isinstance(input_ids, jax.core.Tracer):
            lo, hi = int(jnp.min(input_ids)), int(jnp.max(input_ids))
            if lo < 0 or hi >= self.config.padded_vocab_size:
                raise ValueError(
                    f"input_ids must lie in [0, {self.config.padded_vocab_size}), got values in [{lo}, {hi}]"
                )


def _remat_policy(name: str):
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return getattr(jax.checkpoint_policies, name)


def _run_blocks(layers, config: MambaConfig, hidden, mask, seq_idx):
    """The blocks without a cache, rematerialised (``config.remat``) and/or as one
    ``lax.scan`` over their stacked parameters (``config.scan_layers``)."""

    def block(graphdef, state, hidden, residual):
        hidden, residual, _ = nnx.merge(graphdef, state)(hidden, residual, None, mask, seq_idx)
        return hidden, residual

    if config.remat != "none":
        block = jax.checkpoint(block, policy=_remat_policy(config.remat), static_argnums=(0,))
    splits = [nnx.split(layer) for layer in layers]
    if not config.scan_layers:
        residual = None
        for graphdef, state in splits:
            hidden, residual = block(graphdef, state, hidden, residual)
        return hidden, residual
    graphdef = splits[0][0]
    if any(g != graphdef for g, _ in splits):
        raise ValueError("scan_layers needs every block of one structure (the same mixer and MLP in each)")
    # The first block starts from residual None (residual = hidden): it runs before
    # the scan, which carries (hidden, residual) arrays through the others.
    hidden, residual = block(graphdef, splits[0][1], hidden, None)
    if len(splits) > 1:
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(state for _, state in splits[1:]))

        def body(carry, state):
            return block(graphdef, state, *carry), None

        (hidden, residual), _ = jax.lax.scan(body, (hidden, residual), stacked)
    return hidden, residual


def _check_seq_idx(seq_idx, shape) -> None:
    """ValueError unless ``seq_idx`` is an int array of ``shape``, nondecreasing per row
    (the order is checked outside ``jit`` only)."""
    if not hasattr(seq_idx, "shape") or tuple(seq_idx.shape) != tuple(shape) or not jnp.issubdtype(seq_idx.dtype, jnp.integer):
        raise ValueError(
            f"seq_idx must be an integer array of shape (b, l)={tuple(shape)}, "
            f"got {getattr(seq_idx, 'dtype', type(seq_idx))} {tuple(getattr(seq_idx, 'shape', ()))}"
        )
    if not isinstance(seq_idx, jax.core.Tracer):
        s = np.asarray(seq_idx)
        for row in np.flatnonzero((s[:, 1:] < s[:, :-1]).any(axis=1)):
            raise ValueError(f"seq_idx row {row} decreases: document ids must be nondecreasing along each row")


def _check_left_padding(mask, cache: MambaCache | None) -> None:
    """ValueError unless every row of ``mask`` is padding (False) then real tokens (True),
    and rows whose cache already holds tokens start with a real one."""
    m = np.asarray(mask)
    late = m[:, :-1] & ~m[:, 1:]  # a real token followed by padding
    for row in np.flatnonzero(late.any(axis=1)):
        pos = int(np.flatnonzero(late[row])[0]) + 1
        raise ValueError(
            f"mask row {row} is not left padding: position {pos} is padding (False) after a real token; "
            "only left padding is supported (padding after real tokens would reach the convolution)"
        )
    if cache is None or m.all(axis=1).all():
        return
    held = np.zeros(m.shape[0], bool)  # rows whose cache holds tokens already
    for layer in cache.layers:
        if isinstance(layer, AttentionLayerCache):
            held |= np.asarray(layer.lengths) > 0
        else:  # the state of a row that has seen a real token is not exactly zero
            held |= np.asarray(jnp.any(layer.ssm_state != 0, axis=tuple(range(1, layer.ssm_state.ndim))))
    for row in np.flatnonzero(held & ~m[:, 0]):
        raise ValueError(
            f"mask row {row} starts with padding but its cache already holds tokens: the padding would sit "
            "between the cached and the new tokens (pad only a row's first call)"
        )
