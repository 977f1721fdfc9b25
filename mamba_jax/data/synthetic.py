"""Synthetic tasks of the Mamba paper (arXiv 2312.00752, section 4.1), generated on the fly.

Every generator returns a dict of arrays ``inputs`` (b, L) int32, ``targets``
(b, L) int32 and ``weights`` (b, L) float32 (1 where the target is scored).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def selective_copying(key: jax.Array, batch_size: int, seq_len: int, n_tokens: int, vocab_size: int = 16) -> dict:
    """Selective Copying (paper section 4.1.1, Table 1).

    ``n_tokens`` data tokens, drawn from ``1 .. vocab_size - 2``, are placed at
    random (distinct, ordered) positions among ``seq_len`` noise tokens (id 0);
    then ``n_tokens`` marker tokens (id ``vocab_size - 1``) follow. At the i-th
    marker the model must output the i-th data token: remembering *which*
    tokens matter and skipping the noise needs input-dependent (selective)
    dynamics, since the spacing is random.

    Returns arrays of length ``L = seq_len + n_tokens``; ``weights`` is 1 at the
    marker positions only.
    """
    if not 0 < n_tokens <= seq_len:
        raise ValueError(f"need 0 < {n_tokens=} <= {seq_len=}")
    if vocab_size < 3:
        raise ValueError(f"{vocab_size=} must be at least 3 (noise, marker, one data token)")
    k_tok, k_pos = jax.random.split(key)
    tokens = jax.random.randint(k_tok, (batch_size, n_tokens), 1, vocab_size - 1, jnp.int32)
    # Distinct random positions, in increasing order: the first n of a random permutation, sorted.
    scores = jax.random.uniform(k_pos, (batch_size, seq_len))
    positions = jnp.sort(jnp.argsort(scores, axis=1)[:, :n_tokens], axis=1)
    rows = jnp.arange(batch_size)[:, None]
    context = jnp.zeros((batch_size, seq_len), jnp.int32).at[rows, positions].set(tokens)
    markers = jnp.full((batch_size, n_tokens), vocab_size - 1, jnp.int32)
    inputs = jnp.concatenate([context, markers], axis=1)
    targets = jnp.concatenate([jnp.zeros_like(context), tokens], axis=1)
    weights = jnp.concatenate(
        [jnp.zeros((batch_size, seq_len), jnp.float32), jnp.ones((batch_size, n_tokens), jnp.float32)], axis=1
    )
    return {"inputs": inputs, "targets": targets, "weights": weights}
