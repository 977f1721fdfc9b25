"""Selective scan on TPU: Mosaic Pallas kernels, forward and backward.

Layout. Channels are split into tiles of ``block_d = S * 128`` channels held as
(S, 128) vregs, so one time step of u, delta, z or y for a tile is one whole
(S, 128) slab; the state of a tile is (n, S, 128) float32 in VMEM (n vregs when
S = 8); B_t and C_t are read as scalars from SMEM and broadcast for free.

Forward grid ``(b, Dp / block_d, L / block_l)`` with dimension semantics
``("parallel", "parallel", "arbitrary")``: time is last and sequential, the
state lives in a VMEM scratch across the time axis, initialised under
``pl.when(program_id(2) == 0)`` from the optional initial state; the kernel
writes the state at the start of every time block (the backward's
checkpoints) and the final state through an output block whose index map
ignores time.

Backward grid: the same, time reversed through the index maps. Each grid step
recomputes the block's ``block_l`` states from its checkpoint into a VMEM
buffer, then runs the adjoint recurrence in reverse, carrying dh in VMEM
across the time axis. dB_t and dC_t are reduced over the tile's channels and
stored as SMEM scalars (per-tile partials, summed over tiles in XLA); dA, dD
accumulate in VMEM and are written once per tile.

VMEM: the backward's recompute buffer (block_l, n, S, 128) dominates; the
default tile is derived from n against a 12 MiB budget under a 16 MiB
``vmem_limit_bytes`` (the arithmetic is in block_sizes.py), so both passes
compile on v4, v5e, v5p and v6e at n = 16, 64 and 128
(tests/test_tpu_compile.py). Speed on TPU hardware has not been measured.

Inputs of the padded layout (see ops.py): u, delta, z (b, L, Dp) float32;
A (Dp, n); B, C (b, L, g, n); D, delta_bias (Dp,); h0 (b, Dp, n); cont (b, L)
float32, the continuation mask of packed documents (0 where a document starts:
the state before that step is multiplied by 0), read as SMEM scalars like B, C.
bfloat16 inputs are cast to float32 by the wrapper before the kernel (a
single-row bf16 slab is half a packed vreg, whose stores other projects saw
corrupted); that costs an extra pass and is a known limitation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.selective_scan.block_sizes import TPU_VMEM_LIMIT_BYTES
from pallas_kernels.selective_scan.vjp import Present, input_cotangents, scan_outputs, split_cotangents

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TpuScanConfig:
    seq_len: int  # true length l; steps at t >= seq_len are identity steps
    block_l: int
    block_d: int
    blocks_per_group: int  # P // block_d
    softplus: bool
    want_states: bool
    interpret: Any = False  # False, True or a pltpu.InterpretParams


# --------------------------------------------------------------------------
# Public wrapper (padded layout): converts to the tiled layout and back
# --------------------------------------------------------------------------


def selective_scan_tpu(cfg: TpuScanConfig, u, dt, A, B, C, D, z, bias, h0, cont=None):
    """Runs the scan on padded inputs; returns (y, hT) or (y, hT, states).

    ``states`` (b, L / block_l, Dp, n) holds the state at the start of every block.
    """
    b, L, Dp = u.shape
    g, n = B.shape[2], B.shape[3]
    T, W = cfg.block_l, cfg.block_d
    S, nd, nc = W // 128, Dp // W, L // T
    tile = lambda x: None if x is None else x.reshape(*x.shape[:-1], nd, S, 128)
    cast = lambda x: None if x is None else x.astype(_F32)
    # B, C: (b, L, g, n) -> (b, g, nc, 1, T * n) so a time block is one SMEM row.
    flat = lambda x: x.astype(_F32).transpose(0, 2, 1, 3).reshape(b, g, nc, 1, T * n)
    out = _scan(
        cfg,
        tile(cast(u)),
        tile(cast(dt)),
        tile(A.astype(_F32).T),
        flat(B),
        flat(C),
        tile(cast(D)),
        tile(cast(z)),
        tile(cast(bias)),
        None if h0 is None else tile(h0.astype(_F32).transpose(0, 2, 1)),
        None if cont is None else cont.astype(_F32).reshape(b, nc, 1, T),
    )
    y = out[0].reshape(b, L, Dp).astype(u.dtype)
    hT = out[1].reshape(b, n, Dp).transpose(0, 2, 1)
    if not cfg.want_states:
        return y, hT
    st = out[2].reshape(b, nc, n, Dp).transpose(0, 1, 3, 2)
    return y, hT, st


def _reduce_partials(cfg, u, A, B, C, dA_p, dB_p, dC_p):
    """Per-tile partial sums of dA, dB, dC reduced in XLA (everything is float32 here)."""
    b, g, nc = B.shape[:3]
    nd = u.shape[2]
    per_group = lambda x: x.reshape(b, g, nd // g, nc, 1, -1).sum(2)
    return dA_p.sum(0), per_group(dB_p), per_group(dC_p)


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


def _specs(cfg, n, nc, reverse):
    """BlockSpecs over the grid (i = sequence, j = channel tile, c = time block)."""
    T, S, bpg = cfg.block_l, cfg.block_d // 128, cfg.blocks_per_group
    tb = (lambda c: nc - 1 - c) if reverse else (lambda c: c)
    seq = pl.BlockSpec((None, T, None, S, 128), lambda i, j, c: (i, tb(c), j, 0, 0))
    bc = pl.BlockSpec(
        (None, None, None, 1, T * n),
        lambda i, j, c: (i, lax.div(j, bpg), tb(c), 0, 0),
        memory_space=pltpu.SMEM,
    )
    chan = pl.BlockSpec((None, S, 128), lambda i, j, c: (j, 0, 0))
    chan_n = pl.BlockSpec((n, None, S, 128), lambda i, j, c: (0, j, 0, 0))
    state = pl.BlockSpec((None, n, None, S, 128), lambda i, j, c: (i, 0, j, 0, 0))
    states = pl.BlockSpec((None, None, n, None, S, 128), lambda i, j, c: (i, tb(c), 0, j, 0, 0))
    cont = pl.BlockSpec((None, None, 1, T), lambda i, j, c: (i, tb(c), 0, 0), memory_space=pltpu.SMEM)
    return seq, bc, chan, chan_n, state, states, cont


def _compiler_params():
    # The block sizes are derived against this limit (block_sizes.py), which
    # every target has: ask for it explicitly rather than rely on each
    # generation's default scoped VMEM.
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary"),
        vmem_limit_bytes=TPU_VMEM_LIMIT_BYTES,
    )


def _forward_call(cfg, u, dt, A, B, C, D, z, bias, h0, cont):
    b, L, nd, S, _ = u.shape
    n = A.shape[0]
    nc = L // cfg.block_l
    seq, bc, chan, chan_n, state, states, cont_spec = _specs(cfg, n, nc, reverse=False)
    args, specs = [u, dt, A, B, C], [seq, seq, chan_n, bc, bc]
    for x, s in ((D, chan), (z, seq), (bias, chan), (h0, state), (cont, cont_spec)):
        if x is not None:
            args.append(x)
            specs.append(s)
    has = Present.of(D, z, bias, h0, cont)
    kernel = functools.partial(_forward_kernel, cfg=cfg, has=has, n=n)
    return pl.pallas_call(
        kernel,
        grid=(b, nd, nc),
        in_specs=specs,
        out_specs=[seq, states, state],
        out_shape=[
            jax.ShapeDtypeStruct(u.shape, _F32),
            jax.ShapeDtypeStruct((b, nc, n, nd, S, 128), _F32),
            jax.ShapeDtypeStruct((b, n, nd, S, 128), _F32),
        ],
        scratch_shapes=[pltpu.VMEM((n, S, 128), _F32)],
        compiler_params=_compiler_params(),
        interpret=cfg.interpret,
        name="selective_scan_fwd_tpu",
    )(*args)


def _backward_call(cfg, u, dt, A, B, C, D, z, bias, cont, st, dy, dhT, dst):
    b, L, nd, S, _ = u.shape
    n = A.shape[0]
    T = cfg.block_l
    nc = L // T
    seq, bc, chan, chan_n, state, states, cont_spec = _specs(cfg, n, nc, reverse=True)
    args = [u, dt, A, B, C, st, dy, dhT]
    specs = [seq, seq, chan_n, bc, bc, states, seq, state]
    for x, s in ((D, chan), (z, seq), (bias, chan), (dst, states), (cont, cont_spec)):
        if x is not None:
            args.append(x)
            specs.append(s)
    has = Present.of(D, z, bias, dst, cont)
    part_bc = pl.BlockSpec(
        (None, None, None, 1, T * n),
        lambda i, j, c: (i, j, nc - 1 - c, 0, 0),
        memory_space=pltpu.SMEM,
    )
    part_chan = pl.BlockSpec((None, None, S, 128), lambda i, j, c: (i, j, 0, 0))
    outs = [
        (seq, jax.ShapeDtypeStruct(u.shape, _F32)),  # du
        (seq, jax.ShapeDtypeStruct(u.shape, _F32)),  # ddelta (before bias/softplus)
        (state, jax.ShapeDtypeStruct((b, n, nd, S, 128), _F32)),  # dA per sequence
        (part_bc, jax.ShapeDtypeStruct((b, nd, nc, 1, T * n), _F32)),  # dB per tile
        (part_bc, jax.ShapeDtypeStruct((b, nd, nc, 1, T * n), _F32)),  # dC per tile
        (state, jax.ShapeDtypeStruct((b, n, nd, S, 128), _F32)),  # dh0
    ]
    if z is not None:
        outs.append((seq, jax.ShapeDtypeStruct(u.shape, _F32)))  # dz
    if D is not None:
        outs.append((part_chan, jax.ShapeDtypeStruct((b, nd, S, 128), _F32)))  # dD per sequence
    out_specs, out_shape = (list(x) for x in zip(*outs))
    kernel = functools.partial(_backward_kernel, cfg=cfg, has=has, n=n)
    res = pl.pallas_call(
        kernel,
        grid=(b, nd, nc),
        in_specs=specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[
            pltpu.VMEM((n, S, 128), _F32),  # dh carried across time blocks
            pltpu.VMEM((T, n, S, 128), _F32),  # the block's recomputed states
            pltpu.VMEM((n, S, 128), _F32),  # dA accumulator
            pltpu.VMEM((S, 128), _F32),  # dD accumulator
        ],
        compiler_params=_compiler_params(),
        interpret=cfg.interpret,
        name="selective_scan_bwd_tpu",
    )(*args)
    du, ddt, dA_p, dB_p, dC_p, dh0, *rest = res
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


def _step_inputs(cfg, s, t, u_ref, dt_ref, bias):
    """u, effective dt and raw dt (+bias) of block row s (global step t): (S, 128) f32."""
    u = u_ref[s]
    raw = dt_ref[s]
    if bias is not None:
        raw = raw + bias
    dt = _softplus(raw) if cfg.softplus else raw
    if cfg.seq_len % cfg.block_l:
        dt = dt * jnp.where(t < cfg.seq_len, 1.0, 0.0).astype(_F32)  # identity steps
    return u, dt, raw


def _forward_kernel(*refs, cfg, has, n):
    u_ref, dt_ref, A_ref, B_ref, C_ref, *rest = refs
    D_ref = rest.pop(0) if has.D else None
    z_ref = rest.pop(0) if has.z else None
    bias_ref = rest.pop(0) if has.bias else None
    h0_ref = rest.pop(0) if has.state else None
    cont_ref = rest.pop(0) if has.cont else None
    y_ref, st_ref, hT_ref, h_scr = rest
    T = cfg.block_l
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _init():
        h_scr[...] = h0_ref[...] if has.state else jnp.zeros(h_scr.shape, _F32)

    st_ref[...] = h_scr[...]
    A = [A_ref[k] for k in range(n)]
    Dv = D_ref[...] if has.D else None
    bias = bias_ref[...] if has.bias else None

    def step(s, hs):
        t = c * T + s
        u, dt, _ = _step_inputs(cfg, s, t, u_ref, dt_ref, bias)
        dtu = dt * u
        y = Dv * u if has.D else jnp.zeros_like(u)
        keep = cont_ref[0, s] if has.cont else 1.0
        new = []
        for k in range(n):
            hk = jnp.exp(dt * A[k]) * keep * hs[k] + dtu * B_ref[0, s * n + k]
            y = y + hk * C_ref[0, s * n + k]
            new.append(hk)
        if has.z:
            zt = z_ref[s]
            y = y * (zt * _sigmoid(zt))
        y_ref[s] = y
        return tuple(new)

    hs = lax.fori_loop(0, T, step, tuple(h_scr[k] for k in range(n)))
    for k in range(n):
        h_scr[k] = hs[k]

    @pl.when(c == pl.num_programs(2) - 1)
    def _final():
        hT_ref[...] = h_scr[...]


def _backward_kernel(*refs, cfg, has, n):
    u_ref, dt_ref, A_ref, B_ref, C_ref, st_ref, dy_ref, dhT_ref, *rest = refs
    D_ref = rest.pop(0) if has.D else None
    z_ref = rest.pop(0) if has.z else None
    bias_ref = rest.pop(0) if has.bias else None
    dst_ref = rest.pop(0) if has.state else None
    cont_ref = rest.pop(0) if has.cont else None
    du_ref, ddt_ref, dA_ref, dB_ref, dC_ref, dh0_ref, *rest = rest
    dz_ref = rest.pop(0) if has.z else None
    dD_ref = rest.pop(0) if has.D else None
    dh_scr, hbuf, dA_scr, dD_scr = rest
    T = cfg.block_l
    c = pl.program_id(2)
    cr = pl.num_programs(2) - 1 - c  # the time block this step works on

    @pl.when(c == 0)
    def _init():
        dh_scr[...] = dhT_ref[...]
        dA_scr[...] = jnp.zeros(dA_scr.shape, _F32)
        dD_scr[...] = jnp.zeros(dD_scr.shape, _F32)

    A = [A_ref[k] for k in range(n)]
    Dv = D_ref[...] if has.D else None
    bias = bias_ref[...] if has.bias else None

    # 1. Recompute the block's states from its checkpoint, on chip.
    def fwd_step(s, hs):
        t = cr * T + s
        u, dt, _ = _step_inputs(cfg, s, t, u_ref, dt_ref, bias)
        dtu = dt * u
        keep = cont_ref[0, s] if has.cont else 1.0
        new = []
        for k in range(n):
            hk = jnp.exp(dt * A[k]) * keep * hs[k] + dtu * B_ref[0, s * n + k]
            hbuf[s, k] = hk
            new.append(hk)
        return tuple(new)

    lax.fori_loop(0, T, fwd_step, tuple(st_ref[k] for k in range(n)))

    # 2. Adjoint recurrence in reverse time: dh_{t-1} = exp(dt_t A) dh_t (+ C_{t-1} dy_{t-1}).
    def bwd_step(q, dhs):
        s = T - 1 - q
        t = cr * T + s
        u, dt, raw = _step_inputs(cfg, s, t, u_ref, dt_ref, bias)
        dy = dy_ref[s]
        sp = jnp.maximum(s - 1, 0)
        first = jnp.where(s == 0, 1.0, 0.0).astype(_F32)
        h = [hbuf[s, k] for k in range(n)]
        h_prev = [hbuf[sp, k] * (1.0 - first) + st_ref[k] * first for k in range(n)]
        if has.z:
            zt = z_ref[s]
            sig = _sigmoid(zt)
            y_pre = Dv * u if has.D else jnp.zeros_like(u)
            for k in range(n):
                y_pre = y_pre + h[k] * C_ref[0, s * n + k]
            dz_ref[s] = dy * y_pre * sig * (1.0 + zt * (1.0 - sig))
            gy = dy * zt * sig
        else:
            gy = dy
        dtu = dt * u
        ddt = jnp.zeros_like(u)
        dhB = jnp.zeros_like(u)
        keep = cont_ref[0, s] if has.cont else 1.0  # d(keep exp(dt A))/d dt = A (keep exp(dt A))
        new = []
        for k in range(n):
            dC_ref[0, s * n + k] = jnp.sum(gy * h[k])
            dhk = dhs[k] + gy * C_ref[0, s * n + k]
            decay = jnp.exp(dt * A[k]) * keep
            dh_decay = dhk * h_prev[k] * decay
            ddt = ddt + dh_decay * A[k]
            dhB = dhB + dhk * B_ref[0, s * n + k]
            dB_ref[0, s * n + k] = jnp.sum(dhk * dtu)
            dA_scr[k] = dA_scr[k] + dh_decay * dt
            new.append(dhk * decay)
        ddt = ddt + dhB * u
        du = dhB * dt
        if has.D:
            du = du + gy * Dv
            dD_scr[...] = dD_scr[...] + gy * u
        if cfg.seq_len % cfg.block_l:
            ddt = ddt * jnp.where(t < cfg.seq_len, 1.0, 0.0).astype(_F32)
        if cfg.softplus:
            ddt = ddt * _sigmoid(raw)
        du_ref[s] = du
        ddt_ref[s] = ddt
        return tuple(new)

    dhs = lax.fori_loop(0, T, bwd_step, tuple(dh_scr[k] for k in range(n)))
    for k in range(n):
        dh_scr[k] = dhs[k] + dst_ref[k] if has.state else dhs[k]

    @pl.when(c == pl.num_programs(2) - 1)
    def _final():
        dh0_ref[...] = dh_scr[...]
        dA_ref[...] = dA_scr[...]
        if has.D:
            dD_ref[...] = dD_scr[...]

