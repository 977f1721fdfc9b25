"""The Pallas (Triton backend) kernels of the GPU SSD, one ``pallas_call`` builder each.

Used by :mod:`pallas_kernels.ssd.gpu`, which prepares their inputs and combines
their outputs. Layout (padded; ``P``, ``N``, ``T``, ``block_t`` from
:mod:`pallas_kernels.ssd.gpu_blocks`), with c = L / T chunks and r = h / g:

  x, z, dy, y, dx, dz  (b, L, h, P)    B, C (b, L, g, N): head hh reads group hh // r
  dtp, cum, weights    (b, h, L)       float32: processed dt, within-chunk cumsum of dt A
  doc                  (b, L)          int32 document index (same-document masks)
  chunk states         (b, c, h, P, N) float32
  D                    (h, P)          float32

Time is split over programs: every kernel's grid has one axis per chunk (and
per in-chunk tile), and only the state passing walks the c chunks in order.

* :func:`chunk_outer`   sum_t w_t u_t (outer) V_t over each chunk: the
  chunk-local states (u = x, V = B) and the state cotangents coming from the
  outputs (u = dy gated, V = C). Grid (b, c, h).
* :func:`pass_forward` / :func:`pass_backward`  the recurrence over chunk
  states and its adjoint. Grid (b, h, P N / pass_block).
* :func:`chunk_rows`    per tile of output rows t: y_t (forward), or dC_t, dz_t
  and the rows' part of d cum (backward). Grid (b, c, h, T / block_t); each
  program loops over the column tiles s <= t.
* :func:`chunk_cols`    per tile of input columns s (backward): dx_s, dB_s
  and the columns' parts of d dt. Grid (b, c, h, T / block_t); each program
  loops over the row tiles t >= s.

Every matmul accumulates in float32 (``preferred_element_type``); 16-bit
inputs are multiplied in their own dtype as the reference's Triton kernels do,
float32 inputs with three TF32 passes (see :func:`_cdt`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.ssd.gpu_blocks import NUM_WARPS, NUM_WARPS_BACKWARD_TILES, GpuSsdTiles

_F32 = jnp.float32


def _compiler_params(interpret, num_warps):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=2)


def _call(kernel, *, grid, in_specs, outs, interpret, name, num_warps=NUM_WARPS):
    out_specs, out_shape = (list(v) for v in zip(*outs))
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(interpret, num_warps),
        interpret=bool(interpret),
        name=name,
    )


def _mm(a, b, cdt, *, ta=False, tb=False):
    """a @ b (a^T if ta, b^T if tb), float32 accumulation; ``cdt`` = (operand dtype, precision)."""
    dtype, prec = cdt
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a.astype(dtype), b.astype(dtype), dims, precision=prec, preferred_element_type=_F32)


def _cdt(x, interpret):
    """(operand dtype, precision) of the in-kernel matmuls for inputs like ``x``.

    16-bit inputs: their own dtype (tensor cores, as the reference's Triton
    kernels). float32: three TF32 passes (``TF32_TF32_F32_X3``, float32-level
    error on tensor cores) when compiled; IEEE float32 (``tl.dot`` as FMAs)
    spills registers heavily in these tiles (experiments/ssd_gpu_cubin.py).
    Interpret mode (CPU) runs ``HIGHEST``: dot_general on CPU rejects the TF32 algorithms.
    """
    if jnp.dtype(x.dtype).itemsize == 2:
        return x.dtype, None
    return _F32, (lax.Precision.HIGHEST if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3)


def _sigmoid(v):
    return 1.0 / (1.0 + jnp.exp(-v))


def _gated(dy_ref, z_ref, rows):
    """The output cotangent through the gate, dy silu(z), float32 (block_t, P)."""
    dy = dy_ref[rows, :].astype(_F32)
    if z_ref is None:
        return dy
    zz = z_ref[rows, :].astype(_F32)
    return dy * zz * _sigmoid(zz)


def _decay_tile(cum_t, cum_s, t0, s0, doc_t, doc_s, bt, *, by_cols=False):
    """exp(cum_t - cum_s) where s <= t in the same document, else exactly 0.

    Indexed (t, s), or (s, t) with ``by_cols`` (built transposed, not transposed after).
    """
    ax_t, ax_s = (1, 0) if by_cols else (0, 1)
    ex = lambda v, ax: jnp.expand_dims(v, 1 - ax)  # a vector along axis ax of the tile
    t = t0 + lax.broadcasted_iota(jnp.int32, (bt, bt), ax_t)
    s = s0 + lax.broadcasted_iota(jnp.int32, (bt, bt), ax_s)
    keep = t >= s
    if doc_t is not None:
        keep = keep & (ex(doc_t, ax_t) == ex(doc_s, ax_s))
    return jnp.exp(jnp.where(keep, ex(cum_t, ax_t) - ex(cum_s, ax_s), -jnp.inf))


# --------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------


class _Specs:
    """BlockSpecs over a grid whose first three axes are (b, c, h)."""

    def __init__(self, tiles: GpuSsdTiles, r: int, ntiles: int):
        T, P, N = tiles.chunk, tiles.P, tiles.N
        self.seq = pl.BlockSpec((None, T, None, P), lambda i, c, hh, *_: (i, c, hh, 0))
        self.grp = pl.BlockSpec((None, T, None, N), lambda i, c, hh, *_: (i, c, lax.div(hh, r), 0))
        self.vec = pl.BlockSpec((None, None, T), lambda i, c, hh, *_: (i, hh, c))
        self.doc = pl.BlockSpec((None, T), lambda i, c, hh, *_: (i, c))
        self.state = pl.BlockSpec((None, None, None, P, N), lambda i, c, hh, *_: (i, c, hh, 0, 0))
        self.D = pl.BlockSpec((None, P), lambda i, c, hh, *_: (hh, 0))
        bt = tiles.block_t
        # outputs written one tile at a time (grid axis 3 = the tile)
        self.seq_tile = pl.BlockSpec((None, bt, None, P), lambda i, c, hh, j: (i, c * ntiles + j, hh, 0))
        self.head_tile = pl.BlockSpec((None, bt, None, N), lambda i, c, hh, j: (i, c * ntiles + j, hh, 0))
        self.vec_tile = pl.BlockSpec((None, None, bt), lambda i, c, hh, j: (i, hh, c * ntiles + j))
        self.D_tile = pl.BlockSpec((None, None, None, P), lambda i, c, hh, j: (i, c * ntiles + j, hh, 0))


def _pop(rest, present):
    return rest.pop(0) if present else None


# --------------------------------------------------------------------------
# chunk_outer: sum_t w_t u_t (outer) V_t per chunk
# --------------------------------------------------------------------------


def chunk_outer(tiles: GpuSsdTiles, u, w, V, z, *, interpret):
    """(b, c, h, P, N) float32: per chunk, sum_t w[t] u'[t] (outer) V[t], u' = u silu(z) if z given."""
    b, L, h, P = u.shape
    g, N = V.shape[2:]
    T = tiles.chunk
    nc = L // T
    sp = _Specs(tiles, h // g, T // tiles.block_t)
    args, specs = [u, w, V], [sp.seq, sp.vec, sp.grp]
    if z is not None:
        args.append(z)
        specs.append(sp.seq)
    kernel = functools.partial(_outer_kernel, tiles=tiles, gate=z is not None, cdt=_cdt(u, interpret))
    return _call(
        kernel,
        grid=(b, nc, h),
        in_specs=specs,
        outs=[(sp.state, jax.ShapeDtypeStruct((b, nc, h, P, N), _F32))],
        interpret=interpret,
        name="ssd_chunk_outer_gpu",
    )(*args)[0]


def _outer_kernel(u_ref, w_ref, V_ref, *rest, tiles, gate, cdt):
    z_ref = rest[0] if gate else None
    out_ref = rest[-1]
    bt = tiles.block_t

    def body(k, acc):
        rows = pl.ds(pl.multiple_of(k * bt, bt), bt)
        uu = _gated(u_ref, z_ref, rows) * w_ref[rows][:, None]
        return acc + _mm(uu, V_ref[rows, :], cdt, ta=True)

    out_ref[...] = lax.fori_loop(0, tiles.chunk // bt, body, jnp.zeros((tiles.P, tiles.N), _F32))


# --------------------------------------------------------------------------
# State passing over chunks
# --------------------------------------------------------------------------


def _pass_specs(tiles, nc, ncp):
    W = tiles.pass_block
    chunks = pl.BlockSpec((None, nc, None, W), lambda i, hh, j: (i, 0, hh, j))
    state = pl.BlockSpec((None, None, W), lambda i, hh, j: (i, hh, j))
    decay = pl.BlockSpec((None, None, ncp), lambda i, hh, j: (i, hh, 0))
    return chunks, state, decay


def _pick(vec, c):
    """vec[c] for a traced c, as a masked sum (no scalar loads)."""
    return jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, vec.shape, 0) == c, vec, 0.0))


def pass_forward(tiles: GpuSsdTiles, S, decay, h0, *, interpret):
    """States entering each chunk and the final state.

    S (b, c, h, F) chunk-local states, F = P N; decay (b, h, c') float32 with
    c' >= c a power of two (the decay of each whole chunk, 0 across a document
    boundary); h0 (b, h, F) or None. Returns (h_in (b, c, h, F), hT (b, h, F)).
    """
    b, nc, h, F = S.shape
    chunks, state, dspec = _pass_specs(tiles, nc, decay.shape[-1])
    args, specs = [S, decay], [chunks, dspec]
    if h0 is not None:
        args.append(h0)
        specs.append(state)
    kernel = functools.partial(_pass_fwd_kernel, nc=nc, has_h0=h0 is not None)
    return _call(
        kernel,
        grid=(b, h, F // tiles.pass_block),
        in_specs=specs,
        outs=[(chunks, jax.ShapeDtypeStruct(S.shape, _F32)), (state, jax.ShapeDtypeStruct((b, h, F), _F32))],
        interpret=interpret,
        name="ssd_state_pass_fwd_gpu",
    )(*args)


def _pass_fwd_kernel(S_ref, dec_ref, *rest, nc, has_h0):
    rest = list(rest)
    h0_ref = _pop(rest, has_h0)
    hin_ref, hT_ref = rest
    dec = dec_ref[...]

    def body(c, hs):
        hin_ref[c, :] = hs
        return _pick(dec, c) * hs + S_ref[c, :]

    h_init = h0_ref[...] if has_h0 else jnp.zeros(hT_ref.shape, _F32)
    hT_ref[...] = lax.fori_loop(0, nc, body, h_init)


def pass_backward(tiles: GpuSsdTiles, G, decay, hin, dhT, *, interpret):
    """The adjoint of :func:`pass_forward`.

    G (b, c, h, F): the state cotangents each chunk's outputs give its entering
    state. Returns (dS (b, c, h, F): the cotangent of each chunk's outgoing
    state, dh0 (b, h, F), ddecay partial sums (b, h, F / pass_block, c')).
    """
    b, nc, h, F = G.shape
    ncp = decay.shape[-1]
    nblk = F // tiles.pass_block
    chunks, state, dspec = _pass_specs(tiles, nc, ncp)
    part = pl.BlockSpec((None, None, None, ncp), lambda i, hh, j: (i, hh, j, 0))
    return _call(
        _pass_bwd_kernel,
        grid=(b, h, nblk),
        in_specs=[chunks, dspec, chunks, state],
        outs=[
            (chunks, jax.ShapeDtypeStruct(G.shape, _F32)),
            (state, jax.ShapeDtypeStruct((b, h, F), _F32)),
            (part, jax.ShapeDtypeStruct((b, h, nblk, ncp), _F32)),
        ],
        interpret=interpret,
        name="ssd_state_pass_bwd_gpu",
    )(G, decay, hin, dhT)


def _pass_bwd_kernel(G_ref, dec_ref, hin_ref, dhT_ref, dS_ref, dh0_ref, dd_ref):
    nc = G_ref.shape[0]
    dec = dec_ref[...]
    idx = lax.broadcasted_iota(jnp.int32, dec.shape, 0)

    def body(k, carry):
        gs, dd = carry
        c = nc - 1 - k
        dS_ref[c, :] = gs
        dd = dd + jnp.where(idx == c, jnp.sum(gs * hin_ref[c, :]), 0.0)
        return G_ref[c, :] + _pick(dec, c) * gs, dd

    gs, dd = lax.fori_loop(0, nc, body, (dhT_ref[...], jnp.zeros(dec.shape, _F32)))
    dh0_ref[...] = gs
    dd_ref[...] = dd


# --------------------------------------------------------------------------
# Rows: chunk outputs (forward) and the row-indexed cotangents (backward)
# --------------------------------------------------------------------------


def chunk_rows(tiles: GpuSsdTiles, x, dtp, cum, win, B, C, hin, doc, D, z, dy=None, *, interpret):
    """Forward (``dy is None``): y (b, L, h, P) in x.dtype.

    Backward: (dC per head (b, L, h, N) float32, d cum through ``win`` (b, h, L)
    float32, d(dt A) of the in-chunk products (b, h, L) float32, dz (b, L, h, P) or None). ``win`` (b, h, L) is the weight
    exp(cum_t) [doc_t == document of the entering state] of the C_t h_in term.
    """
    b, L, h, P = x.shape
    g, N = B.shape[2:]
    T, bt = tiles.chunk, tiles.block_t
    nc, nt = L // T, T // bt
    sp = _Specs(tiles, h // g, nt)
    args = [x, dtp, cum, win, B, C, hin]
    specs = [sp.seq, sp.vec, sp.vec, sp.vec, sp.grp, sp.grp, sp.state]
    for v, s in ((doc, sp.doc), (D, sp.D), (z, sp.seq), (dy, sp.seq)):
        if v is not None:
            args.append(v)
            specs.append(s)
    bwd = dy is not None
    if not bwd:
        outs = [(sp.seq_tile, jax.ShapeDtypeStruct(x.shape, x.dtype))]
    else:
        dd_spec = pl.BlockSpec((None, None, None, nt, bt), lambda i, c, hh, j: (i, hh, j, c, 0))
        outs = [
            (sp.head_tile, jax.ShapeDtypeStruct((b, L, h, N), _F32)),
            (sp.vec_tile, jax.ShapeDtypeStruct((b, h, L), _F32)),
            (dd_spec, jax.ShapeDtypeStruct((b, h, nt, L // bt, bt), _F32)),
        ]
        if z is not None:
            outs.append((sp.seq_tile, jax.ShapeDtypeStruct(z.shape, z.dtype)))
    has = (doc is not None, D is not None, z is not None, bwd)
    kernel = functools.partial(_rows_kernel, tiles=tiles, has=has, cdt=_cdt(x, interpret))
    res = _call(
        kernel,
        grid=(b, nc, h, nt),
        in_specs=specs,
        outs=outs,
        interpret=interpret,
        name="ssd_chunk_rows_bwd_gpu" if bwd else "ssd_chunk_rows_fwd_gpu",
        num_warps=NUM_WARPS_BACKWARD_TILES if bwd else NUM_WARPS,
    )(*args)
    if not bwd:
        return res[0]
    ddA = res[2].sum(2).reshape(b, h, L)
    return res[0], res[1], ddA, (res[3] if z is not None else None)


def _rows_kernel(x_ref, dtp_ref, cum_ref, win_ref, B_ref, C_ref, hin_ref, *rest, tiles, has, cdt):
    has_doc, has_D, has_z, bwd = has
    rest = list(rest)
    doc_ref, D_ref, z_ref, dy_ref = (_pop(rest, f) for f in has)
    bt = tiles.block_t
    j = pl.program_id(3)
    t0 = pl.multiple_of(j * bt, bt)
    rows = pl.ds(t0, bt)
    Ct = C_ref[rows, :]
    cum_t = cum_ref[rows]
    doc_t = doc_ref[rows] if has_doc else None
    hin = hin_ref[...]
    y_in = _mm(Ct, hin, cdt, tb=True) * win_ref[rows][:, None]  # (bt, P): C_t h_in, weighted
    gy = _gated(dy_ref, z_ref, rows) if bwd else None

    def body(k, carry):
        s0 = pl.multiple_of(k * bt, bt)
        cols = pl.ds(s0, bt)
        Bs, xs, dts = B_ref[cols, :], x_ref[cols, :], dtp_ref[cols]
        doc_s = doc_ref[cols] if has_doc else None
        M = _decay_tile(cum_t, cum_ref[cols], t0, s0, doc_t, doc_s, bt) * dts[None, :]
        CBM = _mm(Ct, Bs, cdt, tb=True) * M
        y_acc = carry[0] + _mm(CBM, xs, cdt)
        if not bwd:
            return (y_acc,)
        _, dC, run, dd = carry
        gyx = _mm(gy, xs, cdt, tb=True)  # gy_t . x_s
        dC = dC + _mm(gyx * M, Bs, cdt)
        # d(dA_k) += sum over t >= k > s of Q[t, s]: an exclusive running sum along s,
        # summed over the rows t >= k (no difference of large terms: stable in bf16).
        Q = gyx * CBM
        excl = run[:, None] + jnp.cumsum(Q, axis=1) - Q
        t = t0 + lax.broadcasted_iota(jnp.int32, (bt, bt), 0)
        kk = s0 + lax.broadcasted_iota(jnp.int32, (bt, bt), 1)
        part = jnp.sum(jnp.where(kk <= t, excl, 0.0), axis=0)
        dd = dd + jnp.where(lax.broadcasted_iota(jnp.int32, dd.shape, 0) == k, part[None, :], 0.0)
        return y_acc, dC, run + jnp.sum(Q, axis=1), dd

    init = (jnp.zeros(y_in.shape, _F32),)
    if bwd:
        dC_in = _mm(gy * win_ref[rows][:, None], hin, cdt)  # dC_t from the C_t h_in term
        init += (dC_in, jnp.zeros((bt,), _F32), jnp.zeros((tiles.chunk // bt, bt), _F32))
    carry = lax.fori_loop(0, j + 1, body, init)  # column tiles s <= t only
    y = carry[0] + y_in
    if has_D:
        y = y + D_ref[...][None, :] * x_ref[rows, :].astype(_F32)
    if not bwd:
        if has_z:
            zz = z_ref[rows, :].astype(_F32)
            y = y * zz * _sigmoid(zz)
        rest[0][...] = y.astype(rest[0].dtype)
        return
    dC_ref, dcum_ref, ddA_ref = rest[:3]
    dC_ref[...] = carry[1]
    dcum_ref[...] = jnp.sum(gy * y_in, axis=1)  # exp(cum_t) in the C_t h_in term
    ddA_ref[...] = carry[3]
    if has_z:
        zz = z_ref[rows, :].astype(_F32)
        sig = _sigmoid(zz)
        dz = dy_ref[rows, :].astype(_F32) * y * sig * (1.0 + zz * (1.0 - sig))
        rest[3][...] = dz.astype(rest[3].dtype)


# --------------------------------------------------------------------------
# Columns (backward): dx, dB and the column parts of d dt
# --------------------------------------------------------------------------


def chunk_cols(tiles: GpuSsdTiles, x, dtp, cum, vout, B, C, dS, doc, D, z, dy, *, interpret):
    """(dx (b, L, h, P) in x.dtype, dB per head (b, L, h, N) float32, ddt_s (b, h, L),
    q_s (b, h, L), dD partial sums (b, L / block_t, h, P) or None).

    ``vout`` (b, h, L) is exp(cum_end - cum_s) [doc_s == document at the chunk's
    end], the weight of step s in the chunk's outgoing state; ``dS`` (b, c, h, P, N)
    the cotangent of that state. ddt_s = x_s . e_s where e_s is the cotangent of
    dt_s x_s; q_s = vout_s x_s . (dS B_s) is the part coming through the state.
    """
    b, L, h, P = x.shape
    g, N = B.shape[2:]
    T, bt = tiles.chunk, tiles.block_t
    nc, nt = L // T, T // bt
    sp = _Specs(tiles, h // g, nt)
    args = [x, dtp, cum, vout, B, C, dS, dy]
    specs = [sp.seq, sp.vec, sp.vec, sp.vec, sp.grp, sp.grp, sp.state, sp.seq]
    for v, s in ((doc, sp.doc), (D, sp.D), (z, sp.seq)):
        if v is not None:
            args.append(v)
            specs.append(s)
    outs = [
        (sp.seq_tile, jax.ShapeDtypeStruct(x.shape, x.dtype)),
        (sp.head_tile, jax.ShapeDtypeStruct((b, L, h, N), _F32)),
        (sp.vec_tile, jax.ShapeDtypeStruct((b, h, L), _F32)),
        (sp.vec_tile, jax.ShapeDtypeStruct((b, h, L), _F32)),
    ]
    if D is not None:
        outs.append((sp.D_tile, jax.ShapeDtypeStruct((b, L // bt, h, P), _F32)))
    has = (doc is not None, D is not None, z is not None)
    kernel = functools.partial(_cols_kernel, tiles=tiles, has=has, cdt=_cdt(x, interpret))
    res = _call(kernel, grid=(b, nc, h, nt), in_specs=specs, outs=outs, interpret=interpret,
                name="ssd_chunk_cols_bwd_gpu", num_warps=NUM_WARPS_BACKWARD_TILES)(*args)
    return res[0], res[1], res[2], res[3], (res[4] if D is not None else None)


def _cols_kernel(x_ref, dtp_ref, cum_ref, vout_ref, B_ref, C_ref, dS_ref, dy_ref, *rest, tiles, has, cdt):
    has_doc, has_D, has_z = has
    rest = list(rest)
    doc_ref, D_ref, z_ref = (_pop(rest, f) for f in has)
    dx_ref, dB_ref, ddt_ref, q_ref = rest[:4]
    bt = tiles.block_t
    j = pl.program_id(3)
    s0 = pl.multiple_of(j * bt, bt)
    cols = pl.ds(s0, bt)
    Bs, cum_s, dts, v = B_ref[cols, :], cum_ref[cols], dtp_ref[cols], vout_ref[cols]
    xs = x_ref[cols, :].astype(_F32)
    doc_s = doc_ref[cols] if has_doc else None
    dS = dS_ref[...]
    through_state = _mm(Bs, dS, cdt, tb=True) * v[:, None]  # (bt, P): vout_s dS B_s
    dB_state = _mm(xs * (v * dts)[:, None], dS, cdt)  # (bt, N)

    def body(k, carry):
        e, dB = carry
        t0 = pl.multiple_of(k * bt, bt)
        rows = pl.ds(t0, bt)
        Ct = C_ref[rows, :]
        gy = _gated(dy_ref, z_ref, rows)
        doc_t = doc_ref[rows] if has_doc else None
        MT = _decay_tile(cum_ref[rows], cum_s, t0, s0, doc_t, doc_s, bt, by_cols=True)  # (s, t)
        e = e + _mm(_mm(Bs, Ct, cdt, tb=True) * MT, gy, cdt)
        RT = _mm(xs, gy, cdt, tb=True) * MT * dts[:, None]
        return e, dB + _mm(RT, Ct, cdt)

    e_intra, dB = lax.fori_loop(j, tiles.chunk // bt, body, (jnp.zeros(xs.shape, _F32), dB_state))  # t >= s
    e = e_intra + through_state
    gy_s = _gated(dy_ref, z_ref, cols)
    dx = dts[:, None] * e
    if has_D:
        dx = dx + D_ref[...][None, :] * gy_s
        rest[4][...] = jnp.sum(gy_s * xs, axis=0)
    dx_ref[...] = dx.astype(dx_ref.dtype)
    dB_ref[...] = dB
    ddt_ref[...] = jnp.sum(xs * e, axis=1)
    q_ref[...] = jnp.sum(xs * through_state, axis=1)
