"""MambaLM: embedding, residual Mamba blocks, final norm and the (tied) LM head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.cache import MambaCache, MambaLayerCache
from mamba_jax.config import MambaConfig
from mamba_jax.nn.mamba import MambaBlock, RMSNorm, partitioned
from mamba_jax.typing import Array, DType, Float, Int

_F32 = jnp.float32


class MambaLM(nnx.Module):
    """A Mamba-1 language model (the reference ``MambaLMHeadModel``).

    ``model(input_ids)`` runs the parallel forward: (b, l) int -> logits (b, l, v)
    with ``v = config.padded_vocab_size``. ``model(input_ids, cache=cache)``
    continues from a cache made by :meth:`init_cache` (or returned by an earlier
    call) and returns ``(logits, new_cache)``: a whole prompt, a chunk of one or
    a single token all work and give the same logits as the parallel forward.

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
            [MambaBlock(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(config.n_layer)]
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

    def init_cache(self, batch_size: int) -> MambaCache:
        """An empty cache (zeros) for ``batch_size`` sequences."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{batch_size=} must be a positive int")
        cfg = self.config
        layer = MambaLayerCache.zeros(batch_size, cfg.d_inner, cfg.d_state, cfg.d_conv, self.dtype)
        return MambaCache(layers=tuple(layer for _ in range(cfg.n_layer)))

    def __call__(
        self, input_ids: Int[Array, "b l"], cache: MambaCache | None = None, mask: Array | None = None
    ) -> Float[Array, "b l v"] | tuple[Float[Array, "b l v"], MambaCache]:
        """Logits for ``input_ids``; with ``cache``, also the updated cache.

        ``mask`` (b, l) bool, optional: ``False`` marks padding. Padded steps leave
        every layer's state unchanged and feed zeros to the convolutions, so with
        left padding each sequence's real tokens get the logits they get alone.
        (Padding between real tokens is not supported: the convolution would see
        the zeros.) The logits at padded positions are meaningless.
        """
        self._check_input_ids(input_ids, cache)
        if mask is not None:
            if not hasattr(mask, "shape") or tuple(mask.shape) != tuple(input_ids.shape) or mask.dtype != jnp.bool_:
                raise ValueError(
                    f"mask must be a bool array of shape (b, l)={tuple(input_ids.shape)}, "
                    f"got {getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}"
                )
        hidden = self.embedding(input_ids)
        residual = None
        new_layers = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            hidden, residual, layer_cache = layer(hidden, residual, layer_cache, mask)
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
            if not isinstance(cache, MambaCache) or len(cache.layers) != self.config.n_layer:
                raise TypeError(f"cache must be a MambaCache with {self.config.n_layer} layers (see init_cache)")
            if cache.batch_size != input_ids.shape[0]:
                raise ValueError(
                    f"cache has batch size {cache.batch_size} but input_ids.shape={tuple(input_ids.shape)}"
                )
        if not isinstance(input_ids, jax.core.Tracer):
            lo, hi = int(jnp.min(input_ids)), int(jnp.max(input_ids))
            if lo < 0 or hi >= self.config.padded_vocab_size:
                raise ValueError(
                    f"input_ids must lie in [0, {self.config.padded_vocab_size}), got values in [{lo}, {hi}]"
                )
