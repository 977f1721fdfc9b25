"""The selective scan's input validation and its reference oracle, in XLA.

Semantics are ``selective_scan_ref`` of ``mamba_ssm`` in channel-last layout
plus an initial state::

    delta = softplus(delta + delta_bias)            (bias and softplus optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t     h_0 = initial_state or 0
    y_t   = C_t . h_t + D * u_t ;   y_t *= silu(z_t)

The state and all arithmetic are float32 whatever the input dtype. Both entry
points (``mamba_jax.ops.selective_scan`` and ``selective_scan_pallas``) check
their arguments with :func:`validate`; the XLA implementations of the
dispatcher share :func:`prepare` and :func:`finish` with the oracle here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


def check_float(name: str, x) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {name}.dtype={x.dtype}")


def check_shape(name: str, x, expected: tuple, desc: str) -> None:
    check_float(name, x)
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {desc}={tuple(expected)}, got {name}.shape={tuple(x.shape)}")


def validate(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None):
    """Checks every argument and returns B and C in grouped form (b, l, g, n).

    Errors name the argument and the expected shape or dtype; nothing is
    broadcast or coerced.
    """
    check_float("u", u)
    if u.ndim != 3:
        raise ValueError(f"u must have shape (b, l, d), got u.shape={tuple(u.shape)}")
    b, l, d = u.shape
    if l == 0:
        raise ValueError("u has zero length along time (l=0)")
    check_shape("delta", delta, (b, l, d), "(b, l, d)")
    check_float("A", A)
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"A must have shape (d, n) with d={d}, got A.shape={tuple(A.shape)}")
    n = A.shape[1]
    grouped = []
    for name, x in (("B", B), ("C", C)):
        check_float(name, x)
        if x.ndim == 3:
            x = x[:, :, None, :]
        if x.ndim != 4 or x.shape[:2] != (b, l) or x.shape[3] != n:
            raise ValueError(
                f"{name} must have shape (b, l, n)=({b}, {l}, {n}) or (b, l, g, n)=({b}, {l}, g, {n}), "
                f"got {name}.shape={tuple(x.shape)}"
            )
        g = x.shape[2]
        if g < 1 or d % g:
            raise ValueError(f"number of groups g={g} in {name} must divide d={d}")
        grouped.append(x)
    if grouped[0].shape != grouped[1].shape:
        raise ValueError(
            f"B and C must have the same groups, got B.shape={tuple(B.shape)} and C.shape={tuple(C.shape)}"
        )
    if D is not None:
        check_shape("D", D, (d,), "(d,)")
    if z is not None:
        check_shape("z", z, (b, l, d), "(b, l, d)")
    if delta_bias is not None:
        check_shape("delta_bias", delta_bias, (d,), "(d,)")
    if initial_state is not None:
        check_shape("initial_state", initial_state, (b, d, n), "(b, d, n)")
    return grouped[0], grouped[1]


def prepare(u, delta, A, B, C, delta_bias, delta_softplus, initial_state):
    """Float32 arrays in the grouped layout the XLA cores work on.

    Takes validated arguments (B, C grouped) and returns u, dt (b, l, g, p);
    A (g, p, n); B, C (b, l, g, n); h0 (b, g, p, n), where p = d // g and dt
    has the bias and softplus applied.
    """
    b, l, d = u.shape
    g, n = B.shape[2], A.shape[1]
    p = d // g
    dt = delta.astype(_F32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(_F32)
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    h0 = jnp.zeros((b, d, n), _F32) if initial_state is None else initial_state.astype(_F32)
    return (
        u.astype(_F32).reshape(b, l, g, p),
        dt.reshape(b, l, g, p),
        A.astype(_F32).reshape(g, p, n),
        B.astype(_F32),
        C.astype(_F32),
        h0.reshape(b, g, p, n),
    )


def finish(y, hT, u, D, z):
    """From a core's y (b, l, g, p) and final state (b, g, p, n): adds D u, applies
    the gate, returns ``(y, final_state)`` in the user layout, y in ``u.dtype``."""
    b, l, d = u.shape
    y = y.reshape(b, l, d)
    uf = u.astype(_F32)
    if D is not None:
        y = y + uf * D.astype(_F32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(_F32))
    return y.astype(u.dtype), hT.reshape(b, d, hT.shape[-1])


def combine(x, y):
    """Composition of two affine maps h -> a h + b (x first, then y)."""
    a1, b1 = x
    a2, b2 = y
    return a1 * a2, a2 * b1 + b2


def reference_core(u, dt, A, B, C, h0, continuation=None):
    """All (b, l, g, p, n) states by one associative scan over time. ``continuation``
    (b, l) float, optional, multiplies each step's decay (0: the state is dropped)."""
    a = jnp.exp(dt[..., None] * A)
    if continuation is not None:
        a = a * continuation[:, :, None, None, None]
    b = (dt * u)[..., None] * B[:, :, :, None, :]
    b = b.at[:, 0].add(a[:, 0] * h0)
    _, h = lax.associative_scan(combine, (a, b), axis=1)
    return jnp.einsum("blgpn,blgn->blgp", h, C), h[:, -1]


@functools.partial(jax.jit, static_argnames=("delta_softplus",))
def selective_scan_reference(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None, continuation=None
):
    """The oracle: ``(y, final_state)`` by an associative scan over (b, l, d, n).

    O(b l d n) memory; autodiff through it is the reference gradient.
    ``continuation`` (b, l), optional: 0 where a new packed document starts (the
    state carried into that step is dropped), 1 elsewhere.
    """
    B, C = validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    core_in = prepare(u, delta, A, B, C, delta_bias, delta_softplus, initial_state)
    return finish(*reference_core(*core_in, continuation), u, D, z)
