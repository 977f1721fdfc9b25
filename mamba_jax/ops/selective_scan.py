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

* ``"reference"``  ``jax.lax.associative_scan`` over time on (b, l, d, n): the oracle
  (``pallas_kernels.selective_scan.reference``).
* ``"step"``       one time step (l = 1) as plain XLA arithmetic, no loop and no
  kernel: :func:`selective_state_update`, as ``mamba_ssm``'s
  ``selective_state_update``. The decode path.
* ``"sequential"`` ``lax.scan`` over time carrying only the (b, d, n) state, with a
  ``custom_vjp`` whose backward, per chunk of ``chunk_size`` steps, recomputes the
  chunk's states from the saved boundary state and then runs one fused reverse
  loop that computes every gradient of a step together: the fastest on CPU (the
  working set stays in cache), O(b * l/T * d * n) training memory.
* ``"chunked"``    sequential over chunks of ``chunk_size`` steps, parallel inside a
  chunk, with a ``custom_vjp`` that saves only the chunk-boundary states and
  recomputes the states inside each chunk in the backward pass: training memory
  O(b * l/T * d * n) instead of O(b * l * d * n).
* ``"cpu"``        the same algorithm as ``"sequential"`` (boundary states every
  ``chunk_size`` steps, recompute and one fused reverse loop in the backward) as
  one native C++ kernel through XLA FFI (``pallas_kernels.selective_scan.cpu``),
  with the bias, softplus, skip and gate (and their gradients) in the same
  passes; built on first use with the system C++ compiler; CPU only.
* ``"pallas"``     the Pallas kernels in ``pallas_kernels.selective_scan``: the Mosaic
  kernel on TPU, the Triton kernel on CUDA, the TPU kernel in interpret mode
  elsewhere (CPU: for tests).
* ``"auto"``       :func:`resolve_impl`, applied once per platform.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from mamba_jax import sharding
from mamba_jax.typing import Array, Float, Int
from pallas_kernels.selective_scan.block_sizes import MAX_STATE_SIZE, SelectiveScanBlockSizes
from pallas_kernels.selective_scan.reference import (
    combine,
    finish,
    prepare,
    selective_scan_reference,
    validate,
)

IMPLS = ("reference", "step", "sequential", "chunked", "cpu", "pallas")
DEFAULT_CHUNK_SIZE = 64
_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST  # float32 contractions stay float32 on TPU too

# State sizes at which impl="auto" runs the Pallas kernel, per platform: exactly
# those verified where the kernel runs. TPU: compiled forward and backward for
# v4, v5e, v5p and v6e at every preset width (tests/test_tpu_compile.py) and
# checked against the reference in interpret mode (tests/test_pallas_selective_scan.py).
# CUDA: run against the reference on an H100 (experiments/results/bench_scan_h100.json),
# lowered for cuda in the tests.
VERIFIED_STATE_SIZES = {"tpu": (16, 64, 128), "cuda": (16,)}
# The Triton backend of Pallas needs an Ampere or newer GPU (compute capability 8.0).
MIN_TRITON_CAPABILITY = 8.0
# Sequences shorter than one time block of the kernels never reach them.
KERNEL_MIN_LENGTH = SelectiveScanBlockSizes().block_l
# The native CPU kernel has no time block: below this length the XLA loop was
# faster forward, from it on the kernel was faster forward and backward (measured
# side by side at b 16, d 256, n 16).
CPU_KERNEL_MIN_LENGTH = 8


# --------------------------------------------------------------------------
# Public entry points
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
    seq_idx: Int[Array, "b l"] | None = None,
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
      impl: ``"auto"`` or one of :data:`IMPLS`.
      chunk_size: time chunk of ``impl="sequential"`` and ``"chunked"`` (default
        64): the backward pass keeps the states every ``chunk_size`` steps and
        recomputes the rest. An error for the other implementations.
      seq_idx: optional document ids (b, l), integer: where ``seq_idx[t] !=
        seq_idx[t - 1]`` the state before step t is replaced by zero, so nothing
        crosses from one packed document to the next (``initial_state`` is the
        state before the first document). The Pallas kernels take it as a
        continuation mask; ``impl="auto"`` gives it to the TPU kernel (compiled
        with libtpu, tests/test_tpu_compile.py) but not to the GPU kernel, whose
        packed-document path has not run on a GPU (``chunked`` there instead).

    Returns:
      ``y`` of shape (b, l, d) in ``u.dtype``; with ``return_final_state`` the
      pair ``(y, final_state)`` where ``final_state`` is (b, d, n) float32 (and
      differentiable).
    """
    B, C = validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if impl not in IMPLS + ("auto",):
        raise ValueError(f"{impl=} is not one of {('auto',) + IMPLS}")
    if chunk_size is not None:
        if impl not in ("sequential", "chunked", "cpu"):
            raise ValueError(f"chunk_size is only used by impl='sequential', 'chunked' or 'cpu', got {impl=}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"{chunk_size=} must be a positive int")
    n, l = A.shape[1], u.shape[1]
    if impl == "pallas" and n > MAX_STATE_SIZE:
        raise ValueError(f"impl='pallas' takes a state size n up to {MAX_STATE_SIZE}, got n={n}")
    if impl == "cpu" and (reason := _cpu_kernel_unavailable()) is not None:
        raise RuntimeError(f"impl='cpu' needs the native CPU kernel, which is unavailable: {reason}")
    if impl == "step" and l != 1:
        raise ValueError(f"impl='step' runs one time step, got u.shape={tuple(u.shape)} with l={l}")
    keep = None if seq_idx is None else _continuation_mask(seq_idx, u.shape[:2])
    args = (u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state, keep)
    if impl in ("auto", "pallas"):
        fn = functools.partial(_per_platform, impl, chunk_size)
    else:
        fn = _impl_fn(impl, chunk_size, "cpu")
    if sharding.active_mesh() is not None:  # a mesh set with jax.set_mesh: shard_map
        y, final_state = sharding.sharded_selective_scan(fn, *args)
    else:
        y, final_state = fn(*args)
    return (y, final_state) if return_final_state else y


def _continuation_mask(seq_idx, shape):
    """float32 (b, l): 0 where a new document starts (``seq_idx[t] != seq_idx[t - 1]``), else 1."""
    if not hasattr(seq_idx, "shape") or tuple(seq_idx.shape) != tuple(shape):
        raise ValueError(f"seq_idx must have shape (b, l)={tuple(shape)}, got {getattr(seq_idx, 'shape', type(seq_idx))}")
    if not jnp.issubdtype(seq_idx.dtype, jnp.integer):
        raise TypeError(f"seq_idx must have an integer dtype, got seq_idx.dtype={seq_idx.dtype}")
    same = seq_idx[:, 1:] == seq_idx[:, :-1]
    return jnp.concatenate([jnp.ones_like(same[:, :1]), same], axis=1).astype(_F32)


def selective_state_update(
    state: Float[Array, "b d n"],
    u: Float[Array, "b d"],
    delta: Float[Array, "b d"],
    A: Float[Array, "d n"],
    B: Float[Array, "b n"] | Float[Array, "b g n"],
    C: Float[Array, "b n"] | Float[Array, "b g n"],
    D: Float[Array, " d"] | None = None,
    z: Float[Array, "b d"] | None = None,
    delta_bias: Float[Array, " d"] | None = None,
    delta_softplus: bool = False,
):
    """One step of the recurrence, for decoding: plain XLA, no loop, no kernel.

    ``h = exp(delta A) h + delta B u;  y = C . h + D u;  y *= silu(z)``, the
    ``selective_state_update`` of ``mamba_ssm`` in channel-last layout.

    Returns:
      ``(y, new_state)``: y (b, d) in ``u.dtype``, the state (b, d, n) float32.
    """
    expand = lambda x: None if x is None else x[:, None]
    y, new_state = selective_scan(
        *(expand(x) for x in (u, delta)), A, expand(B), expand(C), D, expand(z), delta_bias,
        delta_softplus, state, return_final_state=True, impl="step",
    )
    return y[:, 0], new_state


def resolve_impl(backend: str, state_size: int, seq_len: int | None = None, *, compute_capability=None) -> str:
    """The ``impl="auto"`` policy, in one place.

    * ``seq_len == 1`` (a decode step): ``"step"`` on every platform.
    * ``"cpu"``: ``"cpu"``, the native C++ kernel (O(l/T) training memory), from
      ``CPU_KERNEL_MIN_LENGTH`` steps on (or ``seq_len`` unknown) when a C++
      compiler is present to build it; otherwise ``"sequential"`` (without a
      compiler, with a one-time warning that says why).
    * ``seq_len`` below one kernel time block (``KERNEL_MIN_LENGTH``):
      ``"sequential"``, the plain recurrence in XLA, on every other platform.
    * ``"tpu"``: ``"pallas"`` (the Mosaic kernel) for the state sizes in
      ``VERIFIED_STATE_SIZES["tpu"]``, ``"chunked"`` otherwise.
    * ``"cuda"`` (or ``"gpu"``): ``"pallas"`` (the Triton kernel) for the state
      sizes in ``VERIFIED_STATE_SIZES["cuda"]`` on an Ampere or newer GPU
      (``compute_capability`` >= 8.0, or unknown, as when exporting from a
      host without a GPU); ``"chunked"`` otherwise.
    * any other accelerator (e.g. ``"rocm"``): ``"chunked"``.

    ``selective_scan(impl="auto")`` applies this once for each platform with
    ``jax.lax.platform_dependent`` and passes the platform down to the kernel,
    so one jitted (or exported) function runs the right implementation on each
    platform. An explicit ``impl=`` is never replaced.
    """
    backend = "cuda" if backend == "gpu" else backend
    if seq_len is not None and seq_len == 1:
        return "step"
    if backend == "cpu":
        if seq_len is not None and seq_len < CPU_KERNEL_MIN_LENGTH:
            return "sequential"
        reason = _cpu_kernel_unavailable()
        if reason is None:
            return "cpu"
        _warn_cpu_fallback(reason)
        return "sequential"
    if seq_len is not None and seq_len < KERNEL_MIN_LENGTH:
        return "sequential"
    if backend == "tpu" and state_size in VERIFIED_STATE_SIZES["tpu"]:
        return "pallas"
    if backend == "cuda" and state_size in VERIFIED_STATE_SIZES["cuda"]:
        if compute_capability is None or float(compute_capability) >= MIN_TRITON_CAPABILITY:
            return "pallas"
    return "chunked"


@functools.cache
def _cpu_kernel_unavailable() -> str | None:
    from pallas_kernels.selective_scan import cpu

    return cpu.unavailable_reason()


@functools.cache
def _warn_cpu_fallback(reason: str) -> None:
    warnings.warn(f"selective_scan(impl='auto') on CPU runs 'sequential' (XLA) instead of the native kernel: {reason}",
                  RuntimeWarning, stacklevel=3)


def _local_cuda_capability():
    """The smallest compute capability of this host's CUDA devices, or None without one."""
    try:
        devices = jax.devices("cuda")
    except RuntimeError:
        return None
    caps = [float(d.compute_capability) for d in devices if getattr(d, "compute_capability", None)]
    return min(caps) if caps else None


def _per_platform(impl, chunk_size, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, keep):
    """``impl`` ("auto" or "pallas") resolved once for each platform by
    ``lax.platform_dependent``; each branch gets its platform passed down."""
    n, l = A.shape[1], u.shape[1]

    def branch(platform):
        if impl == "auto":
            cap = _local_cuda_capability() if platform == "cuda" else None
            chosen = resolve_impl(platform, n, l, compute_capability=cap)
            if keep is not None and chosen == "pallas" and platform != "tpu":
                # Packed documents in the GPU kernel: interpret-tested and lowered, never run on a GPU.
                chosen = "chunked"
        else:
            chosen = "pallas"
        fn = _impl_fn(chosen, chunk_size, platform)
        return lambda *a: fn(*a[:8], delta_softplus, *a[8:])

    arrays = (u, delta, A, B, C, D, z, delta_bias, initial_state, keep)
    return lax.platform_dependent(
        *arrays, default=branch("cpu"), cuda=branch("cuda"), tpu=branch("tpu"), rocm=branch("rocm")
    )


def _impl_fn(impl: str, chunk_size: int | None, platform: str) -> Callable:
    """The implementation as ``fn(u, delta, A, B, C, D, z, bias, softplus, h0, keep)``."""
    if impl == "reference":
        return lambda *a: selective_scan_reference(*a[:10], continuation=a[10])
    if impl == "step":
        return lambda *a: _step(*a[:10])  # one step: no document boundary inside
    if impl == "pallas":
        from pallas_kernels.selective_scan import selective_scan_pallas

        kernel = {"tpu": "tpu", "cuda": "gpu", "rocm": "gpu"}.get(platform, "tpu")
        interpret = platform not in ("tpu", "cuda", "rocm")  # CPU: the TPU kernel, interpreted
        return lambda *a: selective_scan_pallas(*a[:10], continuation=a[10], platform=kernel, interpret=interpret)
    if impl == "cpu":
        return functools.partial(_cpu_selective_scan, chunk_size or DEFAULT_CHUNK_SIZE)
    return functools.partial(_xla_selective_scan, impl, chunk_size or DEFAULT_CHUNK_SIZE)


# --------------------------------------------------------------------------
# XLA implementations
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(8,))
def _step(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    """One time step (l = 1): the recurrence written out, differentiable by autodiff."""
    u_, dt, A_, B_, C_, h0 = prepare(u, delta, A, B, C, delta_bias, delta_softplus, initial_state)
    h = jnp.exp(dt[:, 0, ..., None] * A_) * h0 + (dt[:, 0] * u_[:, 0])[..., None] * B_[:, 0, :, None, :]
    y = jnp.einsum("bgpn,bgn->bgp", h, C_[:, 0], precision=_HIGHEST)
    return finish(y[:, None], h, u, D, z)


@functools.partial(jax.jit, static_argnums=(0, 1, 10))
def _xla_selective_scan(impl, chunk_size, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, keep):
    """``prepare`` -> the sequential/chunked core -> ``finish`` (autodiff handles both ends).

    Jitted so that eager calls compile once; inside an outer jit it is inlined.
    """
    core_in = prepare(u, delta, A, B, C, delta_bias, delta_softplus, initial_state)
    return finish(*_padded(impl, *core_in, keep, chunk_size=chunk_size), u, D, z)


@functools.partial(jax.jit, static_argnums=(0, 9))
def _cpu_selective_scan(chunk_size, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, keep):
    """The native CPU kernel (``pallas_kernels.selective_scan.cpu``): bias, softplus,
    skip and gate included; only the float32 casts stay in XLA."""
    from pallas_kernels.selective_scan import cpu

    b, l, d = u.shape
    f32 = lambda x: None if x is None else x.astype(_F32)
    h0 = jnp.zeros((b, d, A.shape[1]), _F32) if initial_state is None else initial_state.astype(_F32)
    y, hT = cpu.selective_scan(
        f32(u), f32(delta), f32(A), f32(B), f32(C), f32(D), f32(z), f32(delta_bias), h0, keep,
        delta_softplus=delta_softplus, chunk=chunk_size,
    )
    return y.astype(u.dtype), hT


# --------------------------------------------------------------------------
# Sequential and chunked: save chunk-boundary states, recompute in the backward
# --------------------------------------------------------------------------
#
# Both save only the states at chunk boundaries (every T steps) in the forward
# pass and recompute the states of a chunk in the backward pass, so training
# memory is O(b * l/T * d * n) plus one chunk. "chunked" (below) runs a chunk's
# two linear recurrences (states, adjoints) as associative scans, parallel in
# time, then the gradients as contractions over the chunk; "sequential" has its
# own core (the next section), one fused step per loop iteration. Mode
# "sequential_v0" of the core below is the previous sequential backward (the
# same two recurrences as lax.scan loops), kept only so that
# experiments/bench_train_step.py can time it beside the current one.
# Inside the cores, arrays are time-major per chunk: (l/T, T, b, g, p[, n]).


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
    return lax.associative_scan(combine, (a, b), axis=0, reverse=reverse)[1]


_RECURRENCES = {"sequential": _recurrence_sequential, "chunked": _recurrence_parallel}


def _padded(mode, u, dt, A, B, C, h0, keep, *, chunk_size):
    """Pads time to a multiple of the chunk with identity steps (dt = 0) and runs the core.

    ``keep`` (b, l) float or None multiplies the decay of each step: 0 drops the
    state carried into that step (the start of a packed document)."""
    l = u.shape[1]
    n_chunks = -(-l // chunk_size)
    T = -(-l // n_chunks)  # chunks of at most chunk_size steps, padding fewer than n_chunks steps
    pad = n_chunks * T - l
    if pad:
        padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        u, dt, B, C = padt(u), padt(dt), padt(B), padt(C)
        keep = None if keep is None else jnp.pad(keep, [(0, 0), (0, pad)], constant_values=1.0)
    chunks = lambda x: None if x is None else jnp.moveaxis(x.reshape(x.shape[0], -1, T, *x.shape[2:]), 0, 2)
    core = _sequential_core if mode == "sequential" else (lambda *a: _chunked_core(*a, mode))
    y, hT = core(*(chunks(x) for x in (u, dt)), A, *(chunks(x) for x in (B, C)), h0, chunks(keep))
    y = jnp.moveaxis(y, 2, 0).reshape(u.shape)
    return y[:, :l], hT


def _decay(dt, A, keep):
    """exp(dt A) for time-major dt (..., b, g, p), times the continuation mask (..., b)."""
    a = jnp.exp(dt[..., None] * A)
    return a if keep is None else a * keep[..., None, None, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _chunked_core(u, dt, A, B, C, h0, keep, mode):
    (y, hT), _ = _chunked_fwd(u, dt, A, B, C, h0, keep, mode)
    return y, hT


def _chunked_fwd(u, dt, A, B, C, h0, keep, mode):
    if mode.startswith("sequential"):  # one fused step at a time: the inference path on CPU

        def step(h, xs):
            u_t, dt_t, B_t, C_t, keep_t = xs
            h = _decay(dt_t, A, keep_t) * h + (dt_t * u_t)[..., None] * B_t[:, :, None, :]
            return h, jnp.einsum("bgpn,bgn->bgp", h, C_t, precision=_HIGHEST)

        chunk = lambda h_in, xs: lax.scan(step, h_in, xs)
    else:

        def chunk(h_in, xs):
            u_c, dt_c, B_c, C_c, keep_c = xs
            a = _decay(dt_c, A, keep_c)
            h = _recurrence_parallel(a, (dt_c * u_c)[..., None] * B_c[:, :, :, None, :], h_in)
            return h[-1], jnp.einsum("tbgpn,tbgn->tbgp", h, C_c, precision=_HIGHEST)

    def outer(h_in, xs):
        h_out, y = chunk(h_in, xs)
        return h_out, (y, h_in)

    hT, (y, starts) = lax.scan(outer, h0, (u, dt, B, C, keep))
    return (y, hT), (u, dt, A, B, C, keep, starts)


def _chunked_bwd(mode, res, cotangents):
    u, dt, A, B, C, keep, starts = res
    dy, dhT = cotangents
    recurrence = _RECURRENCES[mode.removesuffix("_v0")]

    def chunk(carry, xs):
        dh_out, dA_acc = carry  # dh_out: gradient reaching the chunk's last state from later steps
        u_c, dt_c, B_c, C_c, keep_c, dy_c, h_in = xs
        a = _decay(dt_c, A, keep_c)  # (T, b, g, p, n)
        h = recurrence(a, (dt_c * u_c)[..., None] * B_c[:, :, :, None, :], h_in)  # recomputed, never stored
        # Adjoint in reverse time: G_t = a_{t+1} G_{t+1} + C_t dy_t, G_{T-1} += dh_out.
        a_next = jnp.concatenate([a[1:], jnp.ones_like(a[:1])], axis=0)
        G = recurrence(a_next, dy_c[..., None] * C_c[:, :, :, None, :], dh_out, reverse=True)
        h_prev = jnp.concatenate([h_in[None], h[:-1]], axis=0)
        Gha = G * h_prev * a  # gradient through the decay exp(dt A) (times the mask: d a / d dt = A a)
        GB = jnp.einsum("tbgpn,tbgn->tbgp", G, B_c, precision=_HIGHEST)
        du = GB * dt_c
        ddt = jnp.einsum("tbgpn,gpn->tbgp", Gha, A, precision=_HIGHEST) + GB * u_c
        dB = jnp.einsum("tbgpn,tbgp->tbgn", G, dt_c * u_c, precision=_HIGHEST)
        dC = jnp.einsum("tbgp,tbgpn->tbgn", dy_c, h, precision=_HIGHEST)
        # (einsum for the contractions over n or p, a plain sum over (t, b): the
        # faster form of each on XLA:CPU, measured.)
        dA_acc = dA_acc + jnp.sum(Gha * dt_c[..., None], axis=(0, 1))
        return (a[0] * G[0], dA_acc), (du, ddt, dB, dC)

    (dh0, dA), (du, ddt, dB, dC) = lax.scan(
        chunk, (dhT, jnp.zeros_like(A)), (u, dt, B, C, keep, dy, starts), reverse=True
    )
    dkeep = None if keep is None else jnp.zeros_like(keep)  # a mask of document ids: no gradient
    return du, ddt, dA, dB, dC, dh0, dkeep


_chunked_core.defvjp(_chunked_fwd, _chunked_bwd)


# --------------------------------------------------------------------------
# Sequential: one time step per loop iteration, forward and backward
# --------------------------------------------------------------------------
#
# The state is kept as (b, g, n, p), channels innermost: every per-step
# elementwise operation runs along contiguous channels and every contraction
# (over n for y, du, ddt; over p for dB, dC) is a sum of whole rows or of the
# channels of a row, the forms XLA:CPU runs fastest inside a loop. Measured
# (experiments/bench_train_step.py): a lone reduction inside the loop becomes a
# YNNPACK library call per step on XLA:CPU (jax 0.10), several times slower than
# the variadic reduction and the unrolled sum used here; loop unrolling and
# other chunk sizes did not help.


def _swap(x):
    return jnp.swapaxes(x, -1, -2)


def _sums(xs, axis):
    """``tuple(jnp.sum(x, axis) for x in xs)`` as one variadic reduction: one pass
    over the operands, and XLA:CPU's own loop instead of a library call per sum."""
    zeros = tuple(jnp.zeros((), x.dtype) for x in xs)
    return lax.reduce(tuple(xs), zeros, lambda a, b: tuple(x + y for x, y in zip(a, b)), (axis,))


def _contract_n(h, C_t):
    """``sum_n h C_t`` for h (b, g, n, p), C_t (b, g, n): written as n row
    products added up, one elementwise loop (a lone reduction over n would
    become a library call per step on XLA:CPU)."""
    terms = [h[:, :, k] * C_t[:, :, k, None] for k in range(h.shape[2])]
    while len(terms) > 1:  # pairwise
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def _decay_np(dt_t, At, keep_t):
    """exp(dt A) for one step: dt_t (b, g, p), At (g, n, p), keep_t (b,) or None -> (b, g, n, p)."""
    a = jnp.exp(dt_t[:, :, None, :] * At)
    return a if keep_t is None else a * keep_t[:, None, None, None]


@jax.custom_vjp
def _sequential_core(u, dt, A, B, C, h0, keep):
    (y, hT), _ = _sequential_fwd(u, dt, A, B, C, h0, keep)
    return y, hT


def _sequential_fwd(u, dt, A, B, C, h0, keep):
    At = _swap(A)

    def step(h, xs):
        u_t, dt_t, B_t, C_t, keep_t = xs
        h = _decay_np(dt_t, At, keep_t) * h + B_t[..., None] * (dt_t * u_t)[:, :, None, :]
        return h, _contract_n(h, C_t)

    def outer(h_in, xs):
        h_out, y = lax.scan(step, h_in, xs)
        return h_out, (y, h_in)

    hT, (y, starts) = lax.scan(outer, _swap(h0), (u, dt, B, C, keep))
    return (y, _swap(hT)), (u, dt, At, B, C, keep, starts)


def _sequential_bwd(res, cotangents):
    """Per chunk, last first: one loop recomputes the states before each step
    (from the saved boundary state), then one reverse loop computes all the
    gradients of a step together, carrying the (b, g, n, p) adjoint. Memory: the
    boundary states and one chunk of states."""
    u, dt, At, B, C, keep, starts = res
    dy, dhT = cotangents

    def states(h, xs):  # emits the state before each step
        u_t, dt_t, B_t, keep_t = xs
        return _decay_np(dt_t, At, keep_t) * h + B_t[..., None] * (dt_t * u_t)[:, :, None, :], h

    def step(carry, xs):
        dh, dA = carry  # dh: the gradient reaching this step's state from later steps
        u_t, dt_t, B_t, C_t, keep_t, dy_t, h_prev = xs
        a = _decay_np(dt_t, At, keep_t)
        dtu = dt_t * u_t
        G = dh + C_t[..., None] * dy_t[:, :, None, :]  # gradient of this step's state
        Gha = G * h_prev * a  # through the decay: d a / d dt = A a (the mask included)
        h = a * h_prev + B_t[..., None] * dtu[:, :, None, :]
        GB, GhaA = _sums((G * B_t[..., None], Gha * At), 2)
        dB, dC = _sums((G * dtu[:, :, None, :], h * dy_t[:, :, None, :]), 3)
        dA = dA + Gha * dt_t[:, :, None, :]  # summed over b once, after the loops
        return (a * G, dA), (GB * dt_t, GhaA + GB * u_t, dB, dC)

    def chunk(carry, xs):
        u_c, dt_c, B_c, C_c, keep_c, dy_c, h_in = xs
        _, h_prev = lax.scan(states, h_in, (u_c, dt_c, B_c, keep_c))
        return lax.scan(step, carry, (u_c, dt_c, B_c, C_c, keep_c, dy_c, h_prev), reverse=True)

    (dh0, dAt), (du, ddt, dB, dC) = lax.scan(
        chunk, (_swap(dhT), jnp.zeros_like(starts[0])), (u, dt, B, C, keep, dy, starts), reverse=True
    )
    dkeep = None if keep is None else jnp.zeros_like(keep)  # a mask of document ids: no gradient
    return du, ddt, _swap(jnp.sum(dAt, axis=0)), dB, dC, _swap(dh0), dkeep


_sequential_core.defvjp(_sequential_fwd, _sequential_bwd)
