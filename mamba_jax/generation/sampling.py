"""Logit processing and sampling: pure functions, usable on their own and inside the decode loop.

Per step, in this order (as in Hugging Face ``generate``): repetition penalty
(:func:`apply_repetition_penalty`), then greedy ``argmax`` when the temperature
is 0 or ``top_k == 1``; otherwise divide by the temperature, keep the ``top_k``
largest, keep the smallest set of most likely tokens whose probability reaches
``top_p``, drop tokens whose probability is below ``min_p`` times the largest
(:func:`filter_candidates`), and sample (:func:`sample_logits`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mamba_jax.typing import Array, Float, Int

__all__ = ["apply_repetition_penalty", "filter_candidates", "sample_logits"]

_F32 = jnp.float32
_I32 = jnp.int32
_NEG_INF = float("-inf")


def apply_repetition_penalty(
    logits: Float[Array, "b v"], seen: Array, penalty: float | Array
) -> Float[Array, "b v"]:
    """The CTRL / Hugging Face penalty: for tokens already seen, positive logits
    are divided by ``penalty`` and negative ones multiplied by it."""
    penalty = jnp.asarray(penalty, logits.dtype)
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def filter_candidates(
    logits: Float[Array, "b v"],
    *,
    top_k: int = 0,
    top_p: float | Array = 1.0,
    min_p: float | Array = 0.0,
    use_top_p: bool | None = None,
    use_min_p: bool | None = None,
) -> tuple[Float[Array, "b c"], Int[Array, "b c"] | None]:
    """The candidate tokens after top-k, top-p and min-p filtering.

    ``logits`` are already divided by the temperature. Returns ``(values,
    indices)``: with ``top_k > 0`` or top-p, the ``c = top_k`` (or all ``v``)
    largest logits in decreasing order and their token ids; otherwise the
    logits themselves and ``None`` (identity). Filtered-out candidates have
    value ``-inf``; the most likely token is always kept.

    ``use_top_p`` / ``use_min_p`` (static) say whether to apply the filters
    (default: ``top_p < 1`` and ``min_p > 0``, which needs concrete values).
    """
    if use_top_p is None:
        use_top_p = float(top_p) < 1.0
    if use_min_p is None:
        use_min_p = float(min_p) > 0.0
    v = logits.shape[-1]
    logits = logits.astype(_F32)
    if top_k > 0:
        values, indices = lax.top_k(logits, min(top_k, v))
    elif use_top_p:
        values, indices = lax.top_k(logits, v)  # a full sort, largest first
    else:
        values, indices = logits, None
    if use_top_p:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep the smallest prefix whose mass reaches top_p (the first token always).
        keep = mass_before < jnp.asarray(top_p, _F32)
        keep = keep.at[..., 0].set(True)
        values = jnp.where(keep, values, _NEG_INF)
    if use_min_p:
        probs = jax.nn.softmax(values, axis=-1)
        threshold = jnp.asarray(min_p, _F32) * jnp.max(probs, axis=-1, keepdims=True)
        values = jnp.where(probs >= threshold, values, _NEG_INF)
    return values, indices


def sample_logits(
    logits: Float[Array, "b v"],
    key: Array,
    *,
    temperature: float | Array = 1.0,
    top_k: int = 0,
    top_p: float | Array = 1.0,
    min_p: float | Array = 0.0,
    use_top_p: bool | None = None,
    use_min_p: bool | None = None,
) -> Int[Array, " b"]:
    """Samples one token per row from ``softmax(logits / temperature)`` restricted
    by top-k, top-p and min-p (see :func:`filter_candidates`). ``temperature``
    must be positive here; greedy decoding is ``argmax`` (see :func:`generate`)."""
    scaled = logits.astype(_F32) / jnp.asarray(temperature, _F32)
    values, indices = filter_candidates(
        scaled, top_k=top_k, top_p=top_p, min_p=min_p, use_top_p=use_top_p, use_min_p=use_min_p
    )
    choice = jax.random.categorical(key, values, axis=-1).astype(_I32)
    if indices is None:
        return choice
    return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(_I32)
