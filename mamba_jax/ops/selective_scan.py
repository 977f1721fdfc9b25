"""Selective scan (Mamba's S6 recurrence) behind one dispatcher.

Semantics are those of ``selective_scan_ref`` in the reference implementation
(``mamba_ssm/ops/selective_scan_interface.py``) in channel-last layout, plus an
initial state::

    delta = softplus(delta + delta_bias)            (bias and softplus optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t     h_0 = initial_state or 0
    y_t   = C_t . h_t + D * u_t ;   y_t *= silu(z_t)

The state and all arithmetic are float32 whatever the input dtype; ``y`` comes
back in ``u.dtype`` and the final state in float32.

Implementations (``impl=``):

* ``"reference"``  ``jax.lax.associative_scan`` over time on (b, l, d, n): the oracle.
* ``"sequential"`` ``lax.scan`` over time carrying only the (b, d, n) state, with a
  ``custom_vjp`` whose backward recomputes the states of each chunk of
  ``chunk_size`` steps from saved boundary states, step by step: the fastest
  on CPU (the working set stays in cache), O(b * l/T * d * n) training memory.
* ``"chunked"``    sequential over chunks of ``chunk_size`` steps, parallel inside a
  chunk, with a ``custom_vjp`` that saves only the chunk-boundary states and
  recomputes the states inside each chunk in the backward pass: training memory
  O(b * l/T * d * n) instead of O(b * l * d * n).
* ``"pallas"``     the Pallas kernels in ``pallas_kernels.selective_scan``.
* ``"auto"``       resolved by :func:`resolve_impl` (one documented policy): the
  Pallas kernels on TPU and GPU, chosen per platform at lowering time by
  ``jax.lax.platform_dependent``; sequential on CPU.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from mamba_jax.typing import Array, Float

IMPLS = ("reference", "sequential", "chunked", "pallas")
DEFAULT_CHUNK_SIZE = 64
_F32 = jnp.float32


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def selective_scan(
    u: Float[Array, "b l d"],
    delta: Float[Array, "b l d"],
    A: Float[Array, "d n"],
    B: Float[Array, "b l n"] | Float[Array, "b l g n"],
    C: Float[Array, "b l n"] | Float[Array, "b l g n"],
    D: Float[Array, " d"] | None = None,
    z: Float[Array, "b l d"] | None = None,
    delta_bias: Float[Array, " d"] | None = None,
    delta_softplus: bool = False,
    initial_state: Float[Array, "b d n"] | None = None,
    return_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int | None = None,
):
    """Runs the selective scan.

    Args:
      u: input, (b, l, d), any float dtype.
      delta: time steps before bias/softplus, (b, l, d).
      A: state matrix (diagonal per channel), (d, n); negative for a stable scan.
      B, C: input-dependent projections, (b, l, n) or grouped (b, l, g, n) with
        ``d % g == 0``; channel ``c`` uses group ``c // (d // g)``.
      D: optional skip connection, (d,).
      z: optional gate, (b, l, d); the output is multiplied by ``silu(z)``.
      delta_bias: optional bias added to ``delta`` before the softplus, (d,).
      delta_softplus: apply ``softplus`` to ``delta (+ delta_bias)``.
      initial_state: optional state before the first step, (b, d, n).
      return_final_state: also return the state after the last step.
      impl: ``"auto"``, ``"reference"``, ``"sequential"``, ``"chunked"`` or ``"pallas"``.
      chunk_size: time chunk of ``impl="sequential"`` and ``"chunked"`` (default
        64): the backward pass keeps the states every ``chunk_size`` steps and
        recomputes the rest. An error for the other implementations.

    Returns:
      ``y`` of shape (b, l, d) in ``u.dtype``; with ``return_final_state`` the
      pair ``(y, final_state)`` where ``final_state`` is (b, d, n) float32 (and
      differentiable).
    """
    B, C = _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if impl not in IMPLS + ("auto",):
        raise ValueError(f"{impl=} is not one of {('auto',) + IMPLS}")
    if chunk_size is not None:
        if impl not in ("sequential", "chunked"):
            raise ValueError(f"chunk_size is only used by impl='sequential' or 'chunked', got {impl=}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"{chunk_size=} must be a positive int")
    fn = _impl_fn(impl, chunk_size)
    y, final_state = fn(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state)
    return (y, final_state) if return_final_state else y


def resolve_impl(backend: str, state_size: int) -> str:
    """The ``impl="auto"`` policy, in one place.

    * ``"cpu"`` (and any backend without kernels, e.g. ``"rocm"``):
      ``"sequential"`` at every length: the fastest on CPU forward and backward
      (``experiments/bench_scan.py``), O(l/T) training memory, no padding for
      decode steps.
    * ``"tpu"`` and ``"cuda"``: ``"pallas"``, the kernels that keep the state on
      chip, when they support the state size (``n`` up to
      ``pallas_kernels.selective_scan.block_sizes.MAX_STATE_SIZE``); the CPU
      choice otherwise.

    ``selective_scan(impl="auto")`` applies this to every platform at once with
    ``jax.lax.platform_dependent``, so one jitted (or exported) function runs the
    right implementation on each platform. An explicit ``impl=`` is never replaced.
    """
    from pallas_kernels.selective_scan.block_sizes import MAX_STATE_SIZE

    if backend in ("tpu", "cuda") and state_size <= MAX_STATE_SIZE:
        return "pallas"
    return "sequential"


def _auto_fn(chunk_size: int | None) -> Callable:
    def auto(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
        def branch(platform):
            fn = _impl_fn(resolve_impl(platform, A.shape[1]), chunk_size)
            return lambda *a: fn(*a[:8], delta_softplus, a[8])

        arrays = (u, delta, A, B, C, D, z, delta_bias, initial_state)
        return lax.platform_dependent(*arrays, default=branch("cpu"), cuda=branch("cuda"), tpu=branch("tpu"))

    return auto


def _impl_fn(impl: str, chunk_size: int | None) -> Callable:
    if impl == "auto":
        return _auto_fn(chunk_size)
    if impl == "pallas":
        from pallas_kernels.selective_scan import selective_scan_pallas

        return selective_scan_pallas
    return functools.partial(_xla_selective_scan, impl, chunk_size or DEFAULT_CHUNK_SIZE)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _check_float(name: str, x) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {name}.dtype={x.dtype}")


def _check_shape(name: str, x, expected: tuple, desc: str) -> None:
    _check_float(name, x)
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {desc}={tuple(expected)}, got {name}.shape={tuple(x.shape)}")


def _validate(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """Checks every argument and returns B and C in grouped form (b, l, g, n)."""
    _check_float("u", u)
    if u.ndim != 3:
        raise ValueError(f"u must have shape (b, l, d), got u.shape={tuple(u.shape)}")
    b, l, d = u.shape
    if l == 0:
        raise ValueError("u has zero length along time (l=0)")
    _check_shape("delta", delta, (b, l, d), "(b, l, d)")
    _check_float("A", A)
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"A must have shape (d, n) with d={d}, got A.shape={tuple(A.shape)}")
    n = A.shape[1]
    grouped = []
    for name, x in (("B", B), ("C", C)):
        _check_float(name, x)
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
        _check_shape("D", D, (d,), "(d,)")
    if z is not None:
        _check_shape("z", z, (b, l, d), "(b, l, d)")
    if delta_bias is not None:
        _check_shape("delta_bias", delta_bias, (d,), "(d,)")
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (b, d, n), "(b, d, n)")
    return grouped[0], grouped[1]


# --------------------------------------------------------------------------
# XLA implementations
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 10))
def _xla_selective_scan(impl, chunk_size, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    """Pre/post-processing shared by the XLA implementations (autodiff handles it).

    Jitted so that eager calls compile once; inside an outer jit it is inlined.
    The core (``_reference_core``, or ``_padded`` for sequential/chunked) works on float32 arrays in the grouped layout:
    u, dt (b, l, g, p); A (g, p, n); B, C (b, l, g, n); h0 (b, g, p, n), where
    p = d // g; it returns y (b, l, g, p) and the final state (b, g, p, n).
    """
    b, l, d = u.shape
    g, n = B.shape[2], A.shape[1]
    p = d // g
    uf = u.astype(_F32)
    dt = delta.astype(_F32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(_F32)
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    h0 = jnp.zeros((b, d, n), _F32) if initial_state is None else initial_state.astype(_F32)
    core = _reference_core if impl == "reference" else functools.partial(_padded, impl, chunk_size=chunk_size)
    y, hT = core(
        uf.reshape(b, l, g, p),
        dt.reshape(b, l, g, p),
        A.astype(_F32).reshape(g, p, n),
        B.astype(_F32),
        C.astype(_F32),
        h0.reshape(b, g, p, n),
    )
    y = y.reshape(b, l, d)
    if D is not None:
        y = y + uf * D.astype(_F32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(_F32))
    return y.astype(u.dtype), hT.reshape(b, d, n)


def _combine(x, y):
    """Composition of two affine maps h -> a h + b (x first, then y)."""
    a1, b1 = x
    a2, b2 = y
    return a1 * a2, a2 * b1 + b2


def _reference_core(u, dt, A, B, C, h0):
    """All (b, l, d, n) states by one associative scan over time: the oracle."""
    a = jnp.exp(dt[..., None] * A)
    b = (dt * u)[..., None] * B[:, :, :, None, :]
    b = b.at[:, 0].add(a[:, 0] * h0)
    _, h = lax.associative_scan(_combine, (a, b), axis=1)
    return jnp.einsum("blgpn,blgn->blgp", h, C), h[:, -1]


# --------------------------------------------------------------------------
# Sequential and chunked: save chunk-boundary states, recompute in the backward
# --------------------------------------------------------------------------
#
# Both save only the states at chunk boundaries (every T steps) in the forward
# pass and recompute the states of a chunk in the backward pass, so training
# memory is O(b * l/T * d * n) plus one chunk. They share the backward below and
# differ only in how a chunk's linear recurrences are run: "sequential" walks
# the steps one at a time (small working set; the fast choice on CPU),
# "chunked" runs associative scans over the chunk (parallel in time).
# Inside the core, arrays are time-major per chunk: (l/T, T, b, g, p[, n]).


def _recurrence_sequential(a, b, h0, reverse=False):
    """h_t = a_t h_{t-1} + b_t over axis 0, from h0; returns every h_t."""

    def step(h, x):
        h = x[0] * h + x[1]
        return h, h

    return lax.scan(step, h0, (a, b), reverse=reverse)[1]


def _recurrence_parallel(a, b, h0, reverse=False):
    """The same recurrence by associative scan."""
    edge = -1 if reverse else 0
    b = b.at[edge].add(a[edge] * h0)
    return lax.associative_scan(_combine, (a, b), axis=0, reverse=reverse)[1]


_RECURRENCES = {"sequential": _recurrence_sequential, "chunked": _recurrence_parallel}


def _padded(mode, u, dt, A, B, C, h0, *, chunk_size):
    """Pads time to a multiple of the chunk with identity steps (dt = 0) and runs the core."""
    l = u.shape[1]
    n_chunks = -(-l // chunk_size)
    T = -(-l // n_chunks)  # chunks of at most chunk_size steps, padding fewer than n_chunks steps
    pad = n_chunks * T - l
    if pad:
        padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        u, dt, B, C = padt(u), padt(dt), padt(B), padt(C)
    chunks = lambda x: jnp.moveaxis(x.reshape(x.shape[0], -1, T, *x.shape[2:]), 0, 2)  # (l/T, T, b, ...)
    y, hT = _chunked_core(*(chunks(x) for x in (u, dt)), A, *(chunks(x) for x in (B, C)), h0, mode)
    y = jnp.moveaxis(y, 2, 0).reshape(u.shape)
    return y[:, :l], hT


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _chunked_core(u, dt, A, B, C, h0, mode):
    (y, hT), _ = _chunked_fwd(u, dt, A, B, C, h0, mode)
    return y, hT


def _chunked_fwd(u, dt, A, B, C, h0, mode):
    if mode == "sequential":  # one fused step at a time: the inference path on CPU

        def step(h, xs):
            u_t, dt_t, B_t, C_t = xs
            h = jnp.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * B_t[:, :, None, :]
            return h, jnp.einsum("bgpn,bgn->bgp", h, C_t)

        chunk = lambda h_in, xs: lax.scan(step, h_in, xs)
    else:

        def chunk(h_in, xs):
            u_c, dt_c, B_c, C_c = xs
            a = jnp.exp(dt_c[..., None] * A)
            h = _recurrence_parallel(a, (dt_c * u_c)[..., None] * B_c[:, :, :, None, :], h_in)
            return h[-1], jnp.einsum("tbgpn,tbgn->tbgp", h, C_c)

    def outer(h_in, xs):
        h_out, y = chunk(h_in, xs)
        return h_out, (y, h_in)

    hT, (y, starts) = lax.scan(outer, h0, (u, dt, B, C))
    return (y, hT), (u, dt, A, B, C, starts)


def _chunked_bwd(mode, res, cotangents):
    u, dt, A, B, C, starts = res
    dy, dhT = cotangents
    recurrence = _RECURRENCES[mode]

    def chunk(carry, xs):
        dh_out, dA_acc = carry  # dh_out: gradient reaching the chunk's last state from later steps
        u_c, dt_c, B_c, C_c, dy_c, h_in = xs
        a = jnp.exp(dt_c[..., None] * A)  # (T, b, g, p, n)
        h = recurrence(a, (dt_c * u_c)[..., None] * B_c[:, :, :, None, :], h_in)  # recomputed, never stored
        # Adjoint in reverse time: G_t = exp(dt_{t+1} A) G_{t+1} + C_t dy_t, G_{T-1} += dh_out.
        a_next = jnp.concatenate([a[1:], jnp.ones_like(a[:1])], axis=0)
        G = recurrence(a_next, dy_c[..., None] * C_c[:, :, :, None, :], dh_out, reverse=True)
        h_prev = jnp.concatenate([h_in[None], h[:-1]], axis=0)
        Gha = G * h_prev * a  # gradient through the decay exp(dt A)
        GB = jnp.einsum("tbgpn,tbgn->tbgp", G, B_c)
        du = GB * dt_c
        ddt = jnp.einsum("tbgpn,gpn->tbgp", Gha, A) + GB * u_c
        dB = jnp.einsum("tbgpn,tbgp->tbgn", G, dt_c * u_c)
        dC = jnp.einsum("tbgp,tbgpn->tbgn", dy_c, h)
        # (einsum for the contractions over n or p, a plain sum over (t, b): the
        # faster form of each on XLA:CPU, measured.)
        dA_acc = dA_acc + jnp.sum(Gha * dt_c[..., None], axis=(0, 1))
        return (a[0] * G[0], dA_acc), (du, ddt, dB, dC)

    (dh0, dA), (du, ddt, dB, dC) = lax.scan(
        chunk, (dhT, jnp.zeros_like(A)), (u, dt, B, C, dy, starts), reverse=True
    )
    return du, ddt, dA, dB, dC, dh0


_chunked_core.defvjp(_chunked_fwd, _chunked_bwd)
