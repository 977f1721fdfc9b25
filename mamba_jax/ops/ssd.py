"""Mamba-2's state space duality (SSD) behind one dispatcher, and its decode step.

The Mamba-2 recurrence (arXiv 2405.21060) with one scalar decay per head::

    dt  = clamp(softplus(dt + dt_bias), dt_limit)          (bias, softplus optional)
    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t (outer) B_t       h: (p, n) per head, h_{-1} = initial_state or 0
    y_t = h_t C_t + D x_t ;   y_t *= silu(z_t)
    seq_idx[t] != seq_idx[t-1]  =>  h_{t-1} is replaced by 0 (a new document)

Head ``hh`` uses group ``hh // (h // g)`` of B and C. As in ``mamba_ssm``, the
clamp is applied only when ``dt_limit`` is not the default ``(0, inf)``. The
state and all arithmetic are float32 whatever the input dtype; ``y`` comes back
in ``x.dtype`` and the final state in float32.

Implementations (``impl=``):

* ``"reference"``  ``jax.lax.associative_scan`` over time on all (b, l, h, p, n)
  states: the oracle. O(b l h p n) memory; autodiff through it is the
  reference gradient.
* ``"chunked"``    the chunked SSD algorithm: inside each chunk of ``chunk_size``
  steps a masked matrix product (``C B^T`` times the decay mask, then ``x``),
  chunk states by one contraction over time, a short scan over the l/T chunk
  states, and their contribution to the outputs. A ``custom_vjp`` saves only
  the chunk-boundary states and recomputes inside each chunk in the backward
  pass: training memory O(b (l/T) h p n) plus O(b l T h) for the masks.
* ``"pallas"``     the Pallas kernels of ``pallas_kernels.ssd`` (forward and
  backward; the chunk's matmuls on the matrix units, the state on chip): the
  Mosaic kernel on TPU, the GPU kernel on ``cuda``/``rocm``, and on CPU the TPU
  kernel in interpret mode (slow; for tests). A shape a kernel cannot take
  raises a ``ValueError`` before lowering.
* ``"auto"``       :func:`resolve_ssd_impl`, applied once per platform.

:func:`ssd_step` is the one-token decode update, the recurrence written out in
XLA (as ``mamba_ssm``'s ``selective_state_update`` for Mamba-2).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mamba_jax.typing import Array, Float, Int
from pallas_kernels.selective_scan.reference import check_float, check_shape

SSD_IMPLS = ("reference", "chunked", "pallas")
# Shapes at which impl="auto" may pick a Pallas kernel (see resolve_ssd_impl):
# compiled for every TPU target in both passes and checked in interpret mode.
VERIFIED_SSD = {"tpu": {"state_sizes": (64, 128), "headdims": (64,), "chunk_sizes": (256,)}}
DEFAULT_DT_LIMIT = (0.0, float("inf"))
_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST  # float32 contractions stay float32 on TPU/GPU too
_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


def ssd(
    x: Float[Array, "b l h p"],
    dt: Float[Array, "b l h"],
    A: Float[Array, " h"],
    B: Float[Array, "b l g n"],
    C: Float[Array, "b l g n"],
    chunk_size: int = 256,
    D: Float[Array, " h"] | Float[Array, "h p"] | None = None,
    z: Float[Array, "b l h p"] | None = None,
    dt_bias: Float[Array, " h"] | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
    initial_state: Float[Array, "b h p n"] | None = None,
    seq_idx: Int[Array, "b l"] | None = None,
    return_final_state: bool = False,
    impl: str = "auto",
):
    """Runs the SSD (Mamba-2) scan.

    Args:
      x: input, (b, l, h, p), any float dtype.
      dt: time steps before bias/softplus/clamp, (b, l, h).
      A: one decay rate per head, (h,); negative for a stable scan.
      B, C: input-dependent projections, (b, l, g, n) with ``h % g == 0``; head
        ``hh`` uses group ``hh // (h // g)``.
      chunk_size: at most this many steps per chunk (``impl="chunked"``); the
        length is split into ``ceil(l / chunk_size)`` equal chunks and padded
        at the end with identity steps (dt = 0). ``impl="pallas"``: exactly
        this many steps per chunk (on TPU a multiple of 128 when ``l`` is
        longer than one chunk), time padded to a multiple of it.
      D: optional skip connection, per head (h,) or per channel (h, p).
      z: optional gate, (b, l, h, p); the output is multiplied by ``silu(z)``.
      dt_bias: optional bias added to ``dt`` before the softplus, (h,).
      dt_softplus: apply ``softplus`` to ``dt (+ dt_bias)``.
      dt_limit: ``(lo, hi)`` clamp of the processed ``dt``; not applied at the
        default ``(0, inf)``.
      initial_state: optional state before the first step, (b, h, p, n); it
        belongs to the first document of each row.
      seq_idx: optional document ids, (b, l) integer; where the id changes the
        state is reset to zero, so nothing crosses a document boundary.
      return_final_state: also return the state after the last step.
      impl: ``"auto"`` or one of :data:`SSD_IMPLS`.

    Returns:
      ``y`` of shape (b, l, h, p) in ``x.dtype``; with ``return_final_state`` the
      pair ``(y, final_state)`` where ``final_state`` is (b, h, p, n) float32
      (and differentiable).
    """
    _validate(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, time=True)
    lo, hi = _check_dt_limit(dt_limit)
    if impl not in SSD_IMPLS + ("auto",):
        raise ValueError(f"{impl=} is not one of {('auto',) + SSD_IMPLS}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{chunk_size=} must be a positive int")
    b, l, h, p = x.shape
    n = B.shape[-1]
    arrays = (x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx)
    static = dict(chunk_size=chunk_size, dt_softplus=bool(dt_softplus), dt_limit=(lo, hi))
    from mamba_jax import sharding  # here: sharding.sharded_ssd imports from this module

    if sharding.active_mesh() is not None:  # under jax.set_mesh: shard_map (sharding.sharded_ssd)
        y, final_state = sharding.sharded_ssd(ssd, *arrays, impl=impl, **static)
        return (y, final_state) if return_final_state else y
    if impl in ("auto", "pallas"):
        if impl == "auto":
            pick = lambda pf: resolve_ssd_impl(pf, state_size=n, seq_len=l, headdim=p, chunk_size=chunk_size)
        else:
            pick = lambda pf: "pallas"
        chosen = {pf: pick(pf) for pf in _PLATFORMS}
        if len(set(chosen.values())) == 1 and chosen["cpu"] != "pallas":  # one XLA impl everywhere
            y, final_state = _xla_ssd(chosen["cpu"], *arrays, **static)
        else:
            branch = lambda pf: _impl_fn(chosen[pf], pf, static)
            y, final_state = lax.platform_dependent(
                *arrays, default=branch("cpu"), **{pf: branch(pf) for pf in _PLATFORMS if pf != "cpu"}
            )
    else:
        y, final_state = _xla_ssd(impl, *arrays, **static)
    return (y, final_state) if return_final_state else y


def _impl_fn(impl, platform, static):
    """``impl`` on ``platform`` as ``fn(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx)``.

    ``"pallas"`` runs the platform's kernel, the platform passed down; on CPU
    the TPU kernel in interpret mode. Called while tracing, so a shape the
    kernel cannot take raises here, before lowering.
    """
    if impl != "pallas":
        return lambda *a: _xla_ssd(impl, *a, **static)
    from pallas_kernels.ssd import ssd_pallas

    kernel = {"tpu": "tpu", "cuda": "gpu", "rocm": "gpu"}.get(platform, "tpu")
    interpret = platform not in ("tpu", "cuda", "rocm")

    def run(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx):
        return ssd_pallas(
            x, dt, A, B, C, D, z, dt_bias, static["dt_softplus"], static["dt_limit"], initial_state, seq_idx,
            platform=kernel, chunk_size=static["chunk_size"], interpret=interpret,
        )

    return run


def ssd_step(
    state: Float[Array, "b h p n"],
    x: Float[Array, "b h p"],
    dt: Float[Array, "b h"],
    A: Float[Array, " h"],
    B: Float[Array, "b g n"],
    C: Float[Array, "b g n"],
    D: Float[Array, " h"] | Float[Array, "h p"] | None = None,
    z: Float[Array, "b h p"] | None = None,
    dt_bias: Float[Array, " h"] | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
):
    """One step of the recurrence, for decoding: plain XLA, no loop, no kernel.

    ``h = exp(dt A) h + dt x (outer) B;  y = h C + D x;  y *= silu(z)``.

    Returns:
      ``(y, new_state)``: y (b, h, p) in ``x.dtype``, the state (b, h, p, n) float32.
    """
    _validate(x, dt, A, B, C, D, z, dt_bias, state, None, time=False, state_name="state")
    lo, hi = _check_dt_limit(dt_limit)
    return _step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=bool(dt_softplus), dt_limit=(lo, hi))


def resolve_ssd_impl(
    backend: str,
    state_size: int | None = None,
    seq_len: int | None = None,
    *,
    headdim: int | None = None,
    chunk_size: int | None = None,
) -> str:
    """The ``impl="auto"`` policy of :func:`ssd`, in one place.

    =================  ===========================================================
    backend            auto picks
    =================  ===========================================================
    ``"tpu"``          ``"pallas"`` (the Mosaic kernel) when the state size is in
                       ``VERIFIED_SSD["tpu"]["state_sizes"]``, the head dim (if
                       given) in ``["headdims"]``, the chunk size (if given) in
                       ``["chunk_sizes"]`` and ``seq_len`` is not 1;
                       ``"chunked"`` otherwise
    ``"cpu"``          ``"chunked"``
    ``"cuda"``/``"gpu"``, ``"rocm"``  ``"chunked"``: no GPU kernel has been run
                       on a GPU here, so auto never picks one
    =================  ===========================================================

    The verified TPU shapes are those compiled with libtpu for v4, v5e, v5p and
    v6e, forward and gradient, by ``experiments/tpu_compile_ssd.py`` (checked by
    ``tests/test_tpu_compile.py``), and whose kernel matches the float64 oracle
    in interpret mode (``tests/test_pallas_ssd.py``). A one-token step
    (``seq_len == 1``) is :func:`ssd_step`'s business, never the kernel's.
    ``ssd(impl="auto")`` applies this once for each platform; an explicit
    ``impl=`` is never replaced.
    """
    if backend not in _PLATFORMS + ("gpu",):
        raise ValueError(f"{backend=} is not one of {_PLATFORMS + ('gpu',)}")
    verified = VERIFIED_SSD.get(backend)
    if verified is None or seq_len == 1:
        return "chunked"
    if state_size not in verified["state_sizes"]:
        return "chunked"
    if headdim is not None and headdim not in verified["headdims"]:
        return "chunked"
    if chunk_size is not None and chunk_size not in verified["chunk_sizes"]:
        return "chunked"
    return "pallas"


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _validate(x, dt, A, B, C, D, z, dt_bias, state, seq_idx, *, time, state_name="initial_state"):
    """Checks every argument; errors name the argument and the expected shape.

    ``time=False`` checks the one-step layout of :func:`ssd_step` (no l axis).
    Nothing is broadcast or coerced.
    """
    lead = "(b, l, " if time else "(b, "
    check_float("x", x)
    if x.ndim != (4 if time else 3):
        raise ValueError(f"x must have shape {lead}h, p), got x.shape={tuple(x.shape)}")
    if time and x.shape[1] == 0:
        raise ValueError(f"x has zero length along time (l=0), x.shape={tuple(x.shape)}")
    bl, (h, p) = x.shape[:-2], x.shape[-2:]
    check_shape("dt", dt, (*bl, h), f"{lead}h)")
    check_shape("A", A, (h,), "(h,)")
    check_float("B", B)
    if B.ndim != len(bl) + 2 or tuple(B.shape[:-2]) != tuple(bl):
        raise ValueError(f"B must have shape {lead}g, n) with {lead[1:]}...)={tuple(bl)}, got B.shape={tuple(B.shape)}")
    g, n = B.shape[-2:]
    if g < 1 or h % g:
        raise ValueError(f"number of groups g={g} in B (B.shape={tuple(B.shape)}) must divide the number of heads h={h}")
    check_shape("C", C, B.shape, f"{lead}g, n) like B")
    if D is not None:
        check_float("D", D)
        if tuple(D.shape) not in ((h,), (h, p)):
            raise ValueError(f"D must have shape (h,)=({h},) or (h, p)=({h}, {p}), got D.shape={tuple(D.shape)}")
    if z is not None:
        check_shape("z", z, x.shape, f"{lead}h, p) like x")
    if dt_bias is not None:
        check_shape("dt_bias", dt_bias, (h,), "(h,)")
    if state is not None:
        check_shape(state_name, state, (bl[0], h, p, n), "(b, h, p, n)")
    if seq_idx is not None:
        if not hasattr(seq_idx, "shape") or not hasattr(seq_idx, "dtype"):
            raise TypeError(f"seq_idx must be an array, got {type(seq_idx).__name__}")
        if not jnp.issubdtype(seq_idx.dtype, jnp.integer):
            raise TypeError(f"seq_idx must have an integer dtype (int32), got seq_idx.dtype={seq_idx.dtype}")
        if tuple(seq_idx.shape) != tuple(bl):
            raise ValueError(f"seq_idx must have shape (b, l)={tuple(bl)}, got seq_idx.shape={tuple(seq_idx.shape)}")


def _check_dt_limit(dt_limit):
    try:
        lo, hi = dt_limit
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"dt_limit must be a pair of Python floats (lo, hi), got {dt_limit=}") from None
    if not lo <= hi:
        raise ValueError(f"dt_limit must have lo <= hi, got {dt_limit=}")
    return lo, hi


# --------------------------------------------------------------------------
# Shared ends: dt processing, skip connection and gate
# --------------------------------------------------------------------------


def _process_dt(dt, dt_bias, dt_softplus, dt_limit):
    dt = dt.astype(_F32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(_F32)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    if tuple(dt_limit) != DEFAULT_DT_LIMIT:
        dt = jnp.clip(dt, dt_limit[0], dt_limit[1])
    return dt


def _finish(y, x, D, z):
    """y (float32, x's shape) + D x, gated; back in x.dtype."""
    xf = x.astype(_F32)
    if D is not None:
        Df = D.astype(_F32)
        y = y + xf * (Df[:, None] if D.ndim == 1 else Df)
    if z is not None:
        y = y * jax.nn.silu(z.astype(_F32))
    return y.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("dt_softplus", "dt_limit"))
def _step(state, x, dt, A, B, C, D, z, dt_bias, *, dt_softplus, dt_limit):
    b, h, p = x.shape
    g = B.shape[1]
    dt = _process_dt(dt, dt_bias, dt_softplus, dt_limit)  # (b, h)
    heads_B = jnp.repeat(B.astype(_F32), h // g, axis=1)  # (b, h, n): head hh reads group hh // (h // g)
    heads_C = jnp.repeat(C.astype(_F32), h // g, axis=1)
    decay = jnp.exp(dt * A.astype(_F32))[..., None, None]
    new = decay * state.astype(_F32) + (dt[..., None] * x.astype(_F32))[..., None] * heads_B[:, :, None, :]
    y = jnp.einsum("bhpn,bhn->bhp", new, heads_C, precision=_HIGHEST, preferred_element_type=_F32)
    return _finish(y, x, D, z), new


# --------------------------------------------------------------------------
# Dispatch onto the XLA cores
# --------------------------------------------------------------------------


def _document_ids(seq_idx):
    """Documents numbered by counting id changes: 0, 0, 1, 1, 1, 2 ... per row.

    Equal numbers mean "no boundary in between", whatever the ids themselves.
    """
    change = (seq_idx[:, 1:] != seq_idx[:, :-1]).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros_like(change[:, :1]), jnp.cumsum(change, axis=1)], axis=1)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("chunk_size", "dt_softplus", "dt_limit"))
def _xla_ssd(impl, x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, *, chunk_size, dt_softplus, dt_limit):
    """Float32 preparation -> the reference or chunked core -> skip and gate.

    Jitted so that eager calls compile once; inside an outer jit it is inlined.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    r = h // g  # heads per group
    dtp = _process_dt(dt, dt_bias, dt_softplus, dt_limit).reshape(b, l, g, r)
    xg = x.astype(_F32).reshape(b, l, g, r, p)
    Ag = A.astype(_F32).reshape(g, r)
    Bf, Cf = B.astype(_F32), C.astype(_F32)
    h0 = jnp.zeros((b, g, r, p, n), _F32) if initial_state is None else initial_state.astype(_F32).reshape(b, g, r, p, n)
    doc = None if seq_idx is None else _document_ids(seq_idx)
    if impl == "reference":
        y, hT = _reference_core(xg, dtp, Ag, Bf, Cf, h0, doc)
    else:
        y, hT = _chunked(xg, dtp, Ag, Bf, Cf, h0, doc, chunk_size)
    return _finish(y.reshape(b, l, h, p), x, D, z), hT.reshape(b, h, p, n)


# --------------------------------------------------------------------------
# The reference: every state, one associative scan over time
# --------------------------------------------------------------------------


def _combine(u, v):
    """Composition of two affine maps s -> a s + c (u first, then v)."""
    a1, c1 = u
    a2, c2 = v
    return a1 * a2, a2 * c1 + c2


def _reference_core(x, dt, A, B, C, h0, doc):
    """x (b, l, g, r, p), dt (b, l, g, r), A (g, r), B, C (b, l, g, n), h0 (b, g, r, p, n)."""
    a = jnp.exp(dt * A)
    if doc is not None:  # a new document starts from zero: the previous state is multiplied by 0
        start = jnp.concatenate([jnp.zeros_like(doc[:, :1]), doc[:, 1:] - doc[:, :-1]], axis=1)
        a = a * (start == 0).astype(_F32)[:, :, None, None]
    a = a[..., None, None]  # (b, l, g, r, 1, 1)
    inc = (dt[..., None] * x)[..., None] * B[:, :, :, None, None, :]  # (b, l, g, r, p, n)
    inc = inc.at[:, 0].add(a[:, 0] * h0)
    _, states = lax.associative_scan(_combine, (a, inc), axis=1)
    y = jnp.einsum("blgrpn,blgn->blgrp", states, C, precision=_HIGHEST, preferred_element_type=_F32)
    return y, states[:, -1]


# --------------------------------------------------------------------------
# Chunked SSD
# --------------------------------------------------------------------------
#
# Inside the core, time is split into c chunks of T steps: x (b, c, T, g, r, p),
# dt (b, c, T, g, r), B, C (b, c, T, g, n), doc (b, c, T). Given the state
# h_in entering each chunk, a chunk is independent of the others:
#
#   y_t   = sum_{s<=t} exp(seg[t, s]) (C_t . B_s) dt_s x_s   +   exp(cum_t) C_t . h_in
#   h_out = sum_s exp(seg[T-1, s]) dt_s x_s (outer) B_s      +   exp(cum_{T-1}) h_in
#
# with seg[t, s] = sum_{k=s+1..t} dt_k A (the segment sum, built by a masked
# cumulative sum: no difference of two large cumulative sums) and
# cum_t = sum_{k<=t} dt_k A. Every term whose two ends lie in different
# documents is multiplied by 0. The forward computes the chunk-local parts in
# parallel, runs the short recurrence h_in[c+1] = a_c h_in[c] + S_c over
# chunks and saves h_in; the backward runs the adjoint recurrence over chunks
# and then differentiates the per-chunk function (recomputing its masks and
# products) with those boundary states and state cotangents.


def _chunked(x, dt, A, B, C, h0, doc, chunk_size):
    b, l = x.shape[:2]
    n_chunks = math.ceil(l / chunk_size)
    T = math.ceil(l / n_chunks)  # chunks of at most chunk_size steps, fewer than n_chunks padded steps
    pad = n_chunks * T - l
    if pad:  # identity steps at the end: dt = 0 (decay 1, no input), same document as the last step
        padt = lambda v: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
        x, dt, B, C = padt(x), padt(dt), padt(B), padt(C)
        if doc is not None:
            doc = jnp.pad(doc, [(0, 0), (0, pad)], mode="edge")
    chunks = lambda v: v.reshape(b, n_chunks, T, *v.shape[2:])
    if doc is None:
        masks = None
    else:
        doc = chunks(doc)
        prev = jnp.concatenate([doc[:, :1, 0], doc[:, :-1, -1]], axis=1)  # document of each h_in: (b, c)
        masks = _Masks(
            within=(doc[:, :, :, None] == doc[:, :, None, :]).astype(_F32),  # (b, c, T, T)
            from_in=(doc == prev[:, :, None]).astype(_F32),  # (b, c, T)
        )
    y, hT = _ssd_core(chunks(x), chunks(dt), A, chunks(B), chunks(C), h0, masks)
    return y.reshape(b, n_chunks * T, *y.shape[3:])[:, :l], hT


class _Masks(NamedTuple):
    """Same-document masks (float 0/1): inside a chunk, and from the chunk's entering state."""

    within: jax.Array  # (b, c, T, T)
    from_in: jax.Array  # (b, c, T)


def _einsum(spec, *ops):
    return jnp.einsum(spec, *ops, precision=_HIGHEST, preferred_element_type=_F32)


def _segsum(dA):
    """seg[..., t, s] = sum_{k=s+1..t} dA[..., k] for s <= t (0 above the diagonal), over the last axis."""
    T = dA.shape[-1]
    strict = jnp.tril(jnp.ones((T, T), bool), -1)
    tiled = jnp.where(strict, dA[..., :, None], 0.0)  # [t, s] = dA_t where t > s
    return jnp.cumsum(tiled, axis=-2)


def _chunk_parts(x, dt, A, B, C, masks):
    """The chunk-local pieces, in parallel over (b, c).

    Returns ``y_local`` (b, c, T, g, r, p) (the output with h_in = 0), ``S``
    (b, c, g, r, p, n) (the chunk's end state from h_in = 0), ``decay``
    (b, c, g, r) (what multiplies h_in by the chunk's end) and ``w_in``
    (b, c, T, g, r) (what multiplies C_t . h_in in y_t).
    """
    T = x.shape[2]
    dA = jnp.moveaxis(dt * A, 2, -1)  # (b, c, g, r, T)
    seg = _segsum(dA)  # (b, c, g, r, T, T)
    causal = jnp.tril(jnp.ones((T, T), bool))
    L = jnp.where(causal, jnp.exp(seg), 0.0)
    if masks is not None:
        L = L * masks.within[:, :, None, None]
    CB = _einsum("bctgn,bcsgn->bcgts", C, B)  # (b, c, g, T, T)
    xdt = x * dt[..., None]  # (b, c, T, g, r, p)
    y_local = _einsum("bcgrts,bcsgrp->bctgrp", L * CB[:, :, :, None], xdt)
    cum = jnp.cumsum(dA, axis=-1)  # (b, c, g, r, T)
    w_in = jnp.exp(jnp.moveaxis(cum, -1, 2))  # (b, c, T, g, r)
    w_out = jnp.moveaxis(L[..., T - 1, :], -1, 2)  # (b, c, T, g, r): from step s to the chunk's end
    decay = jnp.exp(cum[..., T - 1])
    if masks is not None:
        w_in = w_in * masks.from_in[..., None, None]
        decay = decay * masks.from_in[:, :, T - 1, None, None]
    S = _einsum("bcsgrp,bcsgn->bcgrpn", xdt * w_out[..., None], B)
    return y_local, S, decay, w_in


def _chunk_fn(x, dt, A, B, C, h_in, masks):
    """One chunk (all chunks in parallel) given its entering state: (y, h_out)."""
    y_local, S, decay, w_in = _chunk_parts(x, dt, A, B, C, masks)
    y = y_local + _einsum("bctgn,bcgrpn->bctgrp", C, h_in) * w_in[..., None]
    return y, decay[..., None, None] * h_in + S


@jax.custom_vjp
def _ssd_core(x, dt, A, B, C, h0, masks):
    (y, hT), _ = _ssd_core_fwd(x, dt, A, B, C, h0, masks)
    return y, hT


def _ssd_core_fwd(x, dt, A, B, C, h0, masks):
    y_local, S, decay, w_in = _chunk_parts(x, dt, A, B, C, masks)

    def step(h, inputs):  # the short recurrence over chunk states
        a, s = inputs
        return a[..., None, None] * h + s, h

    hT, h_in = lax.scan(step, h0, (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(S, 1, 0)))
    h_in = jnp.moveaxis(h_in, 0, 1)  # (b, c, g, r, p, n): the state entering each chunk
    y = y_local + _einsum("bctgn,bcgrpn->bctgrp", C, h_in) * w_in[..., None]
    return (y, hT), (x, dt, A, B, C, h_in, masks)


def _ssd_core_bwd(res, cotangents):
    x, dt, A, B, C, h_in, masks = res
    dy, dhT = cotangents
    _, _, decay, w_in = _chunk_parts(x, dt, A, B, C, masks)
    # Adjoint over chunks: dh_in[c] = (d y_c / d h_in)^T dy_c + decay_c dh_out[c], dh_out[c] = dh_in[c+1].
    from_y = _einsum("bctgrp,bctgn->bcgrpn", dy * w_in[..., None], C)

    def step(dh_out, inputs):
        a, q = inputs
        return a[..., None, None] * dh_out + q, dh_out

    _, dh_out = lax.scan(step, dhT, (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(from_y, 1, 0)), reverse=True)
    dh_out = jnp.moveaxis(dh_out, 0, 1)
    # With every chunk's entering state and leaving-state cotangent known, the
    # chunks are independent: differentiate the per-chunk function (recomputed).
    _, vjp = jax.vjp(lambda *a: _chunk_fn(*a, masks), x, dt, A, B, C, h_in)
    dx, ddt, dA, dB, dC, dh_in = vjp((dy, dh_out))
    dmasks = None if masks is None else jax.tree_util.tree_map(jnp.zeros_like, masks)
    return dx, ddt, dA, dB, dC, dh_in[:, 0], dmasks


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)
