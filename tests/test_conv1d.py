"""Causal depthwise conv1d: full sequence against NumPy, and streaming continuation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from mamba_jax.ops import causal_conv1d, causal_conv1d_step


def _numpy_conv(x, w, bias):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    b, l, d = x.shape
    k = w.shape[0]
    xp = np.concatenate([np.zeros((b, k - 1, d)), x], axis=1)
    y = np.stack([np.einsum("bkd,kd->bd", xp[:, t : t + k], w) for t in range(l)], axis=1)
    return y + (0.0 if bias is None else np.asarray(bias, np.float64))


@pytest.mark.parametrize("l,k,use_bias", [(1, 4, True), (3, 4, False), (11, 4, True), (9, 2, True)])
def test_full_sequence_matches_numpy(l, k, use_bias):
    ks = jax.random.split(jax.random.key(l * 10 + k), 3)
    x = jax.random.normal(ks[0], (2, l, 5))
    w = jax.random.normal(ks[1], (k, 5))
    bias = jax.random.normal(ks[2], (5,)) if use_bias else None
    assert rel_err(causal_conv1d(x, w, bias), _numpy_conv(x, w, bias)) < 1e-6


def test_streaming_in_uneven_chunks_and_steps_equals_full():
    ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(ks[0], (2, 13, 6))
    w, bias = jax.random.normal(ks[1], (4, 6)), jax.random.normal(ks[2], (6,))
    full = causal_conv1d(x, w, bias)
    state = jnp.zeros((2, 3, 6))
    outs, pos = [], 0
    for size in (2, 5, 1, 4):  # a chunk shorter than k - 1, then longer ones
        y, state = causal_conv1d(x[:, pos : pos + size], w, bias, state)
        outs.append(y)
        pos += size
    y_t, state = causal_conv1d_step(x[:, pos], state, w, bias)
    outs.append(y_t[:, None])
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(state, x[:, -3:])


def test_bad_inputs():
    x = jnp.ones((2, 5, 6))
    with pytest.raises(ValueError, match=r"kernel must have shape \(k, d\) with d=6"):
        causal_conv1d(x, jnp.ones((4, 5)))
    with pytest.raises(ValueError, match=r"conv_state must have shape \(b, k - 1, d\)=\(2, 3, 6\)"):
        causal_conv1d(x, jnp.ones((4, 6)), None, jnp.ones((2, 4, 6)))
    with pytest.raises(ValueError, match=r"bias must have shape \(d,\)"):
        causal_conv1d(x, jnp.ones((4, 6)), jnp.ones((5,)))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        causal_conv1d(jnp.ones((2, 5, 6), jnp.int32), jnp.ones((4, 6)))
    with pytest.raises(ValueError, match=r"x_t must have shape \(b, d\)"):
        causal_conv1d_step(x, jnp.ones((2, 3, 6)), jnp.ones((4, 6)))
