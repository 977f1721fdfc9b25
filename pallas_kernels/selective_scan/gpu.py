"""Selective scan on GPU: Pallas kernels (Triton backend), forward and backward.

The GPU plan (what ``mamba_jax.ops.resolve_impl`` enforces):

* Ampere or newer (compute capability >= 8.0): this Triton kernel, for the
  state sizes it has been run at on a GPU (n = 16, an H100), while jax keeps
  the Pallas Triton backend. jax 0.12 deprecates that backend in favour of
  Mosaic GPU, which targets Hopper and newer; a Mosaic GPU port is the plan
  for Hopper+ but does not exist yet (it needs a GPU to write and verify).
* Older GPUs (T4, compute capability 7.5, as Colab offers) and state sizes not
  run on a GPU: ``impl="auto"`` gives the ``chunked`` XLA scan, never a kernel
  that cannot run there.

Why Triton here and not Mosaic GPU: the scan is a long chain of per-time-step
elementwise updates of a (channels, n) float32 state with one cross-``n``
reduction per step and dynamically indexed single-row loads. Mosaic GPU is
built around warpgroup-wide arrays with fixed register layouts, TMA-pipelined
tiles and wgmma, on Hopper and newer only. The Triton backend expresses this
kernel directly (a ``fori_loop`` over time with the state as a loop carry,
i.e. in registers) and works on Ampere as well as Hopper.

Layout (all padded by :mod:`pallas_kernels.selective_scan.ops`):
  u, delta, z, y:  (b, L, Dp)   L = time padded to ``block_l``; Dp = g * P,
                                 P = channels of a group padded to ``block_d``
  A:               (Dp, N)       float32, N = n padded to a power of two
  B, C:            (b, L, g, N)
  D, delta_bias:   (Dp,)         float32
  h0:              (b, Dp, N)    float32
  cont:            (b, L, 1)     float32, continuation mask of packed documents
                                 (0 where a document starts: the state before
                                 that step is multiplied by 0)
Grid ``(b, Dp / block_d)``: one program per (sequence, channel tile) walks the
whole sequence with the float32 state (block_d, N) in registers and writes the
state at every chunk boundary (``block_l`` steps) for the backward pass. Steps
are unrolled in groups of ``UNROLL`` whose row loads are issued together.

The backward grid is the same; each program walks the chunks in reverse,
recomputes the chunk's states from its saved boundary state into a
per-program scratch buffer (block_l * block_d * N float32) and runs the
adjoint recurrence in registers, producing du, ddelta, dz and per-tile partial
sums of dA, dB, dC, dD that the wrapper reduces in XLA. The memory arithmetic
(registers, scratch, the dB/dC partials that dominate at large d and n) is in
block_sizes.py.

Speed: each program walks all l steps one after another, so the forward is
latency bound, far below the copy bandwidth
(experiments/results/bench_scan_h100.json). The next step is a chunk-parallel
scan (local chunk scans in parallel, a short sequential pass over chunk
boundaries, a parallel fix-up), as the CUDA reference does inside a thread
block; it needs GPU time to build and measure.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.selective_scan.vjp import Present, input_cotangents, scan_outputs, split_cotangents

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GpuScanConfig:
    seq_len: int  # true length l; steps at t >= seq_len are identity steps
    block_l: int
    block_d: int
    blocks_per_group: int  # P // block_d
    softplus: bool
    want_states: bool
    interpret: bool = False
    num_warps: int = 4


# --------------------------------------------------------------------------
# Public wrapper (padded layout) with custom_vjp
# --------------------------------------------------------------------------


def selective_scan_gpu(cfg: GpuScanConfig, u, dt, A, B, C, D, z, bias, h0, cont=None):
    """Runs the scan on padded inputs; returns (y, hT) or (y, hT, states).

    ``states`` (b, L / block_l, Dp, N) holds the state at the start of every chunk.
    ``cont`` (b, L): the continuation mask of packed documents, or None.
    """
    cont = None if cont is None else cont.astype(_F32)[..., None]
    return _scan(cfg, u, dt, A, B, C, D, z, bias, h0, cont)


def _reduce_partials(cfg, u, A, B, C, dA_p, dB_p, dC_p):
    """Per-tile partial sums of dA, dB, dC reduced in XLA."""
    b, L, Dp = u.shape
    g, N = B.shape[2], B.shape[3]
    nd = Dp // cfg.block_d
    per_group = lambda x: x.reshape(b, g, nd // g, L, N).sum(2).transpose(0, 2, 1, 3)
    return dA_p.sum(0).astype(A.dtype), per_group(dB_p).astype(B.dtype), per_group(dC_p).astype(C.dtype)


# --------------------------------------------------------------------------
# custom_vjp: the forward saves the block-boundary states, the backward kernel
# recomputes each block from them
# --------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(cfg, u, dt, A, B, C, D, z, bias, h0, cont):
    return _scan_fwd(cfg, u, dt, A, B, C, D, z, bias, h0, cont)[0]


def _scan_fwd(cfg, u, dt, A, B, C, D, z, bias, h0, cont):
    y, states, hT = _forward_call(cfg, u, dt, A, B, C, D, z, bias, h0, cont)
    return scan_outputs(cfg.want_states, y, hT, states), (u, dt, A, B, C, D, z, bias, h0, cont, states)


def _scan_bwd(cfg, res, cotangents):
    u, dt, A, B, C, D, z, bias, h0, cont, states = res
    dy, dhT, dstates = split_cotangents(cfg.want_states, cotangents)
    du, ddt, dz, dA_p, dB_p, dC_p, dD_p, dh0 = _backward_call(
        cfg, u, dt, A, B, C, D, z, bias, cont, states, dy, dhT, dstates
    )
    dA, dB, dC = _reduce_partials(cfg, u, A, B, C, dA_p, dB_p, dC_p)
    dcont = None if cont is None else jnp.zeros_like(cont)  # a mask: no cotangent
    return (*input_cotangents(D, bias, h0, du, ddt, dA, dB, dC, dD_p, dz, dh0), dcont)


_scan.defvjp(_scan_fwd, _scan_bwd)


# --------------------------------------------------------------------------
# pallas_call builders
# --------------------------------------------------------------------------


def _compiler_params(cfg):
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1)


def _specs(cfg, L, N, T=None):
    """BlockSpecs shared by the forward and backward calls."""
    W, bpg = cfg.block_d, cfg.blocks_per_group
    seq = pl.BlockSpec((None, L, W), lambda i, j: (i, 0, j))
    bc = pl.BlockSpec((None, L, None, N), lambda i, j: (i, 0, lax.div(j, bpg), 0))
    chan = pl.BlockSpec((W,), lambda i, j: (j,))
    chan_n = pl.BlockSpec((W, N), lambda i, j: (j, 0))
    state = pl.BlockSpec((None, W, N), lambda i, j: (i, j, 0))
    cont = pl.BlockSpec((None, L, 1), lambda i, j: (i, 0, 0))
    return seq, bc, chan, chan_n, state, cont


def _forward_call(cfg, u, dt, A, B, C, D, z, bias, h0, cont):
    b, L, Dp = u.shape
    N = A.shape[1]
    W, T = cfg.block_d, cfg.block_l
    nc = L // T
    seq, bc, chan, chan_n, state, cont_spec = _specs(cfg, L, N)
    states = pl.BlockSpec((None, nc, W, N), lambda i, j: (i, 0, j, 0))
    args = [u, dt, A, B, C]
    specs = [seq, seq, chan_n, bc, bc]
    for x, s in ((D, chan), (z, seq), (bias, chan), (h0, state), (cont, cont_spec)):
        if x is not None:
            args.append(x)
            specs.append(s)
    has = Present.of(D, z, bias, h0, cont)
    kernel = functools.partial(_forward_kernel, cfg=cfg, has=has, num_chunks=nc)
    return pl.pallas_call(
        kernel,
        grid=(b, Dp // W),
        in_specs=specs,
        out_specs=[seq, states, state],
        out_shape=[
            jax.ShapeDtypeStruct((b, L, Dp), u.dtype),
            jax.ShapeDtypeStruct((b, nc, Dp, N), _F32),
            jax.ShapeDtypeStruct((b, Dp, N), _F32),
        ],
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="selective_scan_fwd_gpu",
    )(*args)


def _backward_call(cfg, u, dt, A, B, C, D, z, bias, cont, st, dy, dhT, dst):
    b, L, Dp = u.shape
    N = A.shape[1]
    W, T = cfg.block_d, cfg.block_l
    nc, nd = L // T, Dp // W
    seq, bc, chan, chan_n, state, cont_spec = _specs(cfg, L, N)
    states = pl.BlockSpec((None, nc, W, N), lambda i, j: (i, 0, j, 0))
    args = [u, dt, A, B, C, st, dy, dhT]
    specs = [seq, seq, chan_n, bc, bc, states, seq, state]
    for x, s in ((D, chan), (z, seq), (bias, chan), (dst, states), (cont, cont_spec)):
        if x is not None:
            args.append(x)
            specs.append(s)
    has = Present.of(D, z, bias, dst, cont)
    part_seq = pl.BlockSpec((None, None, L, N), lambda i, j: (i, j, 0, 0))
    part_chan = pl.BlockSpec((None, W), lambda i, j: (i, j))
    part_chan_n = pl.BlockSpec((None, W, N), lambda i, j: (i, j, 0))
    scratch = pl.BlockSpec((None, None, T, W, N), lambda i, j: (i, j, 0, 0, 0))
    outs = [
        (seq, jax.ShapeDtypeStruct((b, L, Dp), u.dtype)),  # du
        (seq, jax.ShapeDtypeStruct((b, L, Dp), dt.dtype)),  # ddelta (before bias/softplus)
        (part_chan_n, jax.ShapeDtypeStruct((b, Dp, N), _F32)),  # dA per sequence
        (part_seq, jax.ShapeDtypeStruct((b, nd, L, N), _F32)),  # dB per channel tile
        (part_seq, jax.ShapeDtypeStruct((b, nd, L, N), _F32)),  # dC per channel tile
        (state, jax.ShapeDtypeStruct((b, Dp, N), _F32)),  # dh0
        (scratch, jax.ShapeDtypeStruct((b, nd, T, W, N), _F32)),  # per-program state scratch
    ]
    if z is not None:
        outs.append((seq, jax.ShapeDtypeStruct((b, L, Dp), z.dtype)))  # dz
    if D is not None:
        outs.append((part_chan, jax.ShapeDtypeStruct((b, Dp), _F32)))  # dD per sequence
    out_specs, out_shape = (list(x) for x in zip(*outs))
    kernel = functools.partial(_backward_kernel, cfg=cfg, has=has, num_chunks=nc)
    res = pl.pallas_call(
        kernel,
        grid=(b, nd),
        in_specs=specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="selective_scan_bwd_gpu",
    )(*args)
    du, ddt, dA_p, dB_p, dC_p, dh0, _, *rest = res
    dz = rest.pop(0) if z is not None else None
    dD_p = rest.pop(0) if D is not None else None
    return du, ddt, dz, dA_p, dB_p, dC_p, dD_p, dh0


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


def _softplus(x):
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _dt_of(cfg, t, raw, bias):
    """Effective dt_t and raw dt_t (+bias), float32 (W,), from the stored row."""
    raw = raw.astype(_F32)
    if bias is not None:
        raw = raw + bias
    dt = _softplus(raw) if cfg.softplus else raw
    if cfg.seq_len % cfg.block_l:
        dt = jnp.where(t < cfg.seq_len, dt, 0.0)  # identity steps in the padded tail
    return dt, raw


# Steps are unrolled in groups of UNROLL inside each chunk: the group's row
# loads are all issued before its first step, so one memory round trip is
# paid per group instead of one per step (one step of arithmetic is far
# shorter than a DRAM round trip, and a loop-carried prefetch would wait for
# its loads at every iteration).
UNROLL = 8
UNROLL_INTERPRET = 2  # interpret mode (CPU tests): same code paths, smaller programs to compile


def _unroll(cfg) -> int:
    return math.gcd(cfg.block_l, UNROLL_INTERPRET if cfg.interpret else UNROLL)


def _forward_kernel(*refs, cfg, has, num_chunks):
    u_ref, dt_ref, A_ref, B_ref, C_ref, *rest = refs
    D_ref = rest.pop(0) if has.D else None
    z_ref = rest.pop(0) if has.z else None
    bias_ref = rest.pop(0) if has.bias else None
    h0_ref = rest.pop(0) if has.state else None
    cont_ref = rest.pop(0) if has.cont else None
    y_ref, st_ref, hT_ref = rest
    T = cfg.block_l
    G = _unroll(cfg)

    A = A_ref[...].astype(_F32)
    Dv = D_ref[...].astype(_F32) if has.D else None
    bias = bias_ref[...].astype(_F32) if has.bias else None
    h = h0_ref[...].astype(_F32) if has.state else jnp.zeros(A.shape, _F32)
    row_refs = [u_ref, dt_ref, B_ref, C_ref] + ([z_ref] if has.z else []) + ([cont_ref] if has.cont else [])

    def chunk(c, h):
        st_ref[c, :, :] = h

        def group(q, h):
            t0 = c * T + q * G
            rows = [[r[t0 + k, :] for r in row_refs] for k in range(G)]  # loads first
            for k in range(G):
                t = t0 + k
                u, raw, Bt, Ct = (x.astype(_F32) for x in rows[k][:4])
                dt, _ = _dt_of(cfg, t, raw, bias)
                decay = jnp.exp(dt[:, None] * A)
                if has.cont:  # (1,): 0 where a packed document starts
                    decay = decay * rows[k][-1].astype(_F32)[:, None]
                h = decay * h + (dt * u)[:, None] * Bt[None, :]
                y = jnp.sum(h * Ct[None, :], axis=1)
                if has.D:
                    y = y + Dv * u
                if has.z:
                    zt = rows[k][4].astype(_F32)
                    y = y * (zt * _sigmoid(zt))
                y_ref[t, :] = y.astype(y_ref.dtype)
            return h

        return lax.fori_loop(0, T // G, group, h)

    h = lax.fori_loop(0, num_chunks, chunk, h)
    hT_ref[...] = h


def _backward_kernel(*refs, cfg, has, num_chunks):
    u_ref, dt_ref, A_ref, B_ref, C_ref, st_ref, dy_ref, dhT_ref, *rest = refs
    D_ref = rest.pop(0) if has.D else None
    z_ref = rest.pop(0) if has.z else None
    bias_ref = rest.pop(0) if has.bias else None
    dst_ref = rest.pop(0) if has.state else None
    cont_ref = rest.pop(0) if has.cont else None
    du_ref, ddt_ref, dA_ref, dB_ref, dC_ref, dh0_ref, hbuf_ref, *rest = rest
    dz_ref = rest.pop(0) if has.z else None
    dD_ref = rest.pop(0) if has.D else None
    T = cfg.block_l
    G = _unroll(cfg)

    A = A_ref[...].astype(_F32)
    Dv = D_ref[...].astype(_F32) if has.D else None
    bias = bias_ref[...].astype(_F32) if has.bias else None
    W = A.shape[0]
    fwd_refs = [u_ref, dt_ref, B_ref] + ([cont_ref] if has.cont else [])
    bwd_refs = [u_ref, dt_ref, B_ref, C_ref, dy_ref] + ([z_ref] if has.z else []) + ([cont_ref] if has.cont else [])

    def chunk(r, carry):
        dh, dA_acc, dD_acc = carry
        c = num_chunks - 1 - r
        h_start = st_ref[c, :, :]

        # 1. Recompute the chunk's states from its boundary state.
        def fwd_group(q, h):
            s0 = q * G
            rows = [[x[c * T + s0 + k, :] for x in fwd_refs] for k in range(G)]
            for k in range(G):
                t = c * T + s0 + k
                u, raw, Bt = (x.astype(_F32) for x in rows[k][:3])
                dt, _ = _dt_of(cfg, t, raw, bias)
                decay = jnp.exp(dt[:, None] * A)
                if has.cont:
                    decay = decay * rows[k][3].astype(_F32)[:, None]
                h = decay * h + (dt * u)[:, None] * Bt[None, :]
                hbuf_ref[s0 + k, :, :] = h
            return h

        lax.fori_loop(0, T // G, fwd_group, h_start)

        # 2. Adjoint recurrence in reverse time, a group of steps at a time.
        def bwd_group(q, carry):
            dh, dA_acc, dD_acc = carry
            s0 = T - G - q * G  # first step of the group; the steps run s0+G-1 .. s0
            rows = [[x[c * T + s0 + k, :] for x in bwd_refs] for k in range(G)]
            hs = [hbuf_ref[s0 + k, :, :] for k in range(G)]
            h_before = hbuf_ref[jnp.maximum(s0 - 1, 0), :, :]
            h_before = jnp.where(s0 > 0, h_before, h_start)
            for k in reversed(range(G)):
                t = c * T + s0 + k
                h = hs[k]
                h_prev = hs[k - 1] if k > 0 else h_before
                u, raw, Bt, Ct, dy = (x.astype(_F32) for x in rows[k][:5])
                dt, raw = _dt_of(cfg, t, raw, bias)
                if has.z:
                    zt = rows[k][5].astype(_F32)
                    sig = _sigmoid(zt)
                    y_pre = jnp.sum(h * Ct[None, :], axis=1)
                    if has.D:
                        y_pre = y_pre + Dv * u
                    dz = dy * y_pre * sig * (1.0 + zt * (1.0 - sig))
                    dz_ref[t, :] = dz.astype(dz_ref.dtype)
                    gy = dy * zt * sig
                else:
                    gy = dy
                dC_ref[t, :] = jnp.sum(gy[:, None] * h, axis=0)
                dh = dh + gy[:, None] * Ct[None, :]
                decay = jnp.exp(dt[:, None] * A)
                if has.cont:  # d(keep exp(dt A))/d dt = A (keep exp(dt A))
                    decay = decay * rows[k][-1].astype(_F32)[:, None]
                dh_decay = dh * h_prev * decay
                dhB = jnp.sum(dh * Bt[None, :], axis=1)
                ddt = jnp.sum(dh_decay * A, axis=1) + dhB * u
                du = dhB * dt
                if has.D:
                    du = du + gy * Dv
                    dD_acc = dD_acc + gy * u
                dB_ref[t, :] = jnp.sum(dh * (dt * u)[:, None], axis=0)
                dA_acc = dA_acc + dh_decay * dt[:, None]
                if cfg.seq_len % cfg.block_l:
                    ddt = jnp.where(t < cfg.seq_len, ddt, 0.0)
                if cfg.softplus:
                    ddt = ddt * _sigmoid(raw)
                du_ref[t, :] = du.astype(du_ref.dtype)
                ddt_ref[t, :] = ddt.astype(ddt_ref.dtype)
                dh = dh * decay
            return dh, dA_acc, dD_acc

        dh, dA_acc, dD_acc = lax.fori_loop(0, T // G, bwd_group, (dh, dA_acc, dD_acc))
        if has.state:
            dh = dh + dst_ref[c, :, :]
        return dh, dA_acc, dD_acc

    dh = dhT_ref[...].astype(_F32)
    zeros = jnp.zeros(A.shape, _F32)
    dh, dA_acc, dD_acc = lax.fori_loop(0, num_chunks, chunk, (dh, zeros, jnp.zeros((W,), _F32)))
    dh0_ref[...] = dh
    dA_ref[...] = dA_acc
    if has.D:
        dD_ref[...] = dD_acc

