"""Causal depthwise 1-D convolution, over a whole sequence or a few new steps.

The kernel is stored as (k, d): ``y[t, c] = bias[c] + sum_j kernel[j, c] * x[t - k + 1 + j, c]``,
which is the reference ``nn.Conv1d(d, d, k, groups=d, padding=k - 1)`` truncated to
the first ``l`` outputs (the reference weight (d, 1, k) transposed).

With ``conv_state`` (the last ``k - 1`` inputs before ``x``, (b, k - 1, d)) the same
function continues a sequence and returns the new state, so a prompt, a chunk of
a prompt and a single decode step all go through one code path.
"""

from __future__ import annotations

import jax.numpy as jnp

from mamba_jax import sharding

from mamba_jax.typing import Array, Float, Int


def _validate(x, kernel, bias, conv_state):
    if x.ndim != 3:
        raise ValueError(f"x must have shape (b, l, d), got x.shape={tuple(x.shape)}")
    b, _, d = x.shape
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must have a floating dtype, got x.dtype={x.dtype}")
    if kernel.ndim != 2 or kernel.shape[1] != d:
        raise ValueError(f"kernel must have shape (k, d) with d={d}, got kernel.shape={tuple(kernel.shape)}")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"bias must have shape (d,)=({d},), got bias.shape={tuple(bias.shape)}")
    k = kernel.shape[0]
    if conv_state is not None and tuple(conv_state.shape) != (b, k - 1, d):
        raise ValueError(
            f"conv_state must have shape (b, k - 1, d)=({b}, {k - 1}, {d}), got conv_state.shape={tuple(conv_state.shape)}"
        )


def causal_conv1d(
    x: Float[Array, "b l d"],
    kernel: Float[Array, "k d"],
    bias: Float[Array, " d"] | None = None,
    conv_state: Float[Array, "b k1 d"] | None = None,
    seq_idx: Int[Array, "b l"] | None = None,
):
    """Causal depthwise convolution of ``x`` with ``kernel``.

    Without ``conv_state`` the sequence starts from zeros and ``y`` (b, l, d) is
    returned. With ``conv_state`` (b, k - 1, d) it returns ``(y, new_state)``,
    where ``new_state`` holds the last ``k - 1`` inputs of ``state ++ x``.
    Computed in ``x.dtype`` (the kernel and bias are cast to it).

    ``seq_idx`` (b, l) int, packed documents: an output sums only inputs of its
    own document. ``conv_state`` then belongs to the first document of each row,
    and the returned state keeps only the last document's inputs (zeros before
    it), so the next call continues that document.
    """
    _validate(x, kernel, bias, conv_state)
    k = kernel.shape[0]
    b, l, d = x.shape
    if seq_idx is not None and (tuple(seq_idx.shape) != (b, l) or not jnp.issubdtype(seq_idx.dtype, jnp.integer)):
        raise ValueError(f"seq_idx must be an int array of shape (b, l)={(b, l)}, got {seq_idx.dtype} {tuple(seq_idx.shape)}")
    kernel = kernel.astype(x.dtype)
    if conv_state is None:
        if sharding.active_mesh() is not None:  # under jax.set_mesh: time split over sequence with a halo
            y = sharding.sharded_causal_conv1d(causal_conv1d, x, kernel, bias, seq_idx)
            if y is not None:
                return y
        xp = jnp.pad(x, ((0, 0), (k - 1, 0), (0, 0)))
    else:
        xp = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1)
    if seq_idx is not None:  # the document of every input in xp (the state's: the first document's)
        docs = jnp.concatenate([jnp.broadcast_to(seq_idx[:, :1], (b, k - 1)), seq_idx], axis=1)
    y = jnp.zeros_like(x)
    for j in range(k):
        tap = xp[:, j : j + l]
        if seq_idx is not None:
            tap = jnp.where((docs[:, j : j + l] == seq_idx)[..., None], tap, jnp.zeros_like(tap))
        y = y + tap * kernel[j]
    if bias is not None:
        y = y + bias.astype(x.dtype)
    if conv_state is None:
        return y
    tail = xp[:, xp.shape[1] - (k - 1) :]
    if seq_idx is not None:
        tail = jnp.where((docs[:, l:] == seq_idx[:, -1:])[..., None], tail, jnp.zeros_like(tail))
    return y, tail.astype(conv_state.dtype)


def causal_conv1d_step(
    x_t: Float[Array, "b d"],
    conv_state: Float[Array, "b k1 d"],
    kernel: Float[Array, "k d"],
    bias: Float[Array, " d"] | None = None,
):
    """One decode step: ``x_t`` (b, d) -> ``(y_t (b, d), new_state (b, k - 1, d))``."""
    if x_t.ndim != 2:
        raise ValueError(f"x_t must have shape (b, d), got x_t.shape={tuple(x_t.shape)}")
    y, state = causal_conv1d(x_t[:, None], kernel, bias, conv_state)
    return y[:, 0], state
