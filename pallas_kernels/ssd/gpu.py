"""SSD (Mamba-2) on GPU: Pallas kernels (Triton backend), forward and backward.

Status: verified in interpret mode on CPU against the float64 oracle and the
reference, forward and gradients, and lowered for cuda with ``jax.export``
(tests/test_pallas_ssd_gpu.py). It has never run on a GPU, so
``mamba_jax.ops.resolve_ssd_impl`` never picks it: only an explicit call does.

Why Triton: the chunk matmuls want tensor cores on Ampere as well as Hopper,
which the Triton backend reaches with ``tl.dot`` (``jax.lax.dot_general``
inside the kernel); Mosaic GPU targets Hopper and newer only. jax 0.12
deprecates the Pallas Triton backend; this kernel lowers there too while
the backend exists (see the lowering test).

The algorithm (the chunked SSD of arXiv 2405.21060, as the reference's Triton
kernels split it). Per chunk of T steps and head, with the processed step dt_s,
cum_t = sum_{k<=t} dt_k A within the chunk, the chunk's entering state h_in
and same-document masks [.]:

    y_t   = sum_{s<=t} [doc_s = doc_t] exp(cum_t - cum_s) (C_t . B_s) dt_s x_s
            + [doc_t = doc(h_in)] exp(cum_t) C_t h_in                      (+ D x_t, * silu(z_t))
    S     = sum_s [doc_s = doc_end] exp(cum_end - cum_s) dt_s x_s (outer) B_s
    h_in' = [doc_end = doc(h_in)] exp(cum_end) h_in + S                   (the next chunk's h_in)

Forward: the processed dt and its within-chunk cumulative sum (XLA: O(b h L)
elementwise, 1/p of the kernels' traffic), then three Pallas calls whose grids
split time over programs (see :mod:`pallas_kernels.ssd.gpu_kernels`): the
chunk-local states S (grid b, chunk, head), the short pass over chunk states
(grid b, head, state slice; the only sequential walk, over L/T chunks), and the
chunk outputs (grid b, chunk, head, row tile). Only the chunk-entering states
are saved for the backward.

Backward: the state cotangents that each chunk's outputs give its entering
state (one Pallas call, like S), the reverse pass over chunks (dh0 and the
cotangents of every chunk's outgoing state), then the row kernel (dC, dz and
the rows' part of d cum) and the column kernel (dx, dB, d dt and the columns'
part of d cum), both recomputing their decay-masked ``C B^T`` tiles. The
cotangents of dt, dt_bias and A come from ``jax.vjp`` of the same XLA dt
preparation. dB, dC (per head) and dD (per tile) partial sums are reduced in
XLA. Memory arithmetic: :mod:`pallas_kernels.ssd.gpu_blocks`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.ssd.config import SsdKernelConfig
from pallas_kernels.ssd.gpu_blocks import GpuSsdTiles, gpu_tiles, next_pow2
from pallas_kernels.ssd.gpu_kernels import chunk_cols, chunk_outer, chunk_rows, pass_backward, pass_forward

_F32 = jnp.float32
_NO_LIMIT = (0.0, float("inf"))


def ssd_gpu(cfg: SsdKernelConfig, x, dt, A, B, C, D, z, dt_bias, h0, doc):
    """The SSD on padded inputs (see ``pallas_kernels.ssd.ops``); returns ``(y, hT)``.

    x (b, L, h, p); dt (b, L, h) raw; A (h,) float32; B, C (b, L, g, n);
    D (h, p) float32 or None; z like x or None; dt_bias (h,) float32 or None;
    h0 (b, h, p, n) float32 or None; doc (b, L) int32 document indices or None.
    L is a multiple of ``cfg.chunk``; steps t >= ``cfg.length`` are identity
    steps. y (b, L, h, p) in x.dtype, hT (b, h, p, n) float32, both differentiable.
    """
    _check(cfg, x, dt, A, B, C, D, z, dt_bias, h0, doc)
    b, L, h, p = x.shape
    n = B.shape[-1]
    tiles = gpu_tiles(cfg.chunk, p, n, jnp.dtype(x.dtype).itemsize)
    P, N = tiles.P, tiles.N
    pad = lambda v, dims: None if v is None else jnp.pad(v, [(0, want - have) for have, want in zip(v.shape, dims)])
    y, hT = _ssd(
        cfg, tiles,
        pad(x, (b, L, h, P)), dt, A, pad(B, (b, L, B.shape[2], N)), pad(C, (b, L, B.shape[2], N)),
        pad(D, (h, P)), pad(z, (b, L, h, P)), dt_bias, pad(h0, (b, h, P, N)), doc,
    )  # fmt: skip
    return y[..., :p], hT[:, :, :p, :n]


def _check(cfg, x, dt, A, B, C, D, z, dt_bias, h0, doc):
    """The padded layout ``ops.py`` promises; a violation is a bug upstream, named here."""
    if not isinstance(cfg, SsdKernelConfig):
        raise TypeError(f"cfg must be an SsdKernelConfig, got {type(cfg).__name__}")
    if not isinstance(cfg.interpret, bool):
        raise TypeError(f"cfg.interpret={cfg.interpret!r}: the GPU kernel takes interpret=True or False")
    b, L, h, p = x.shape
    if L % cfg.chunk or not 1 <= cfg.length <= L:
        raise ValueError(f"padded length L={L} must be a multiple of cfg.chunk={cfg.chunk} and >= cfg.length={cfg.length}")
    g, n = B.shape[2:]
    expect = {"dt": (dt, (b, L, h)), "A": (A, (h,)), "B": (B, (b, L, g, n)), "C": (C, (b, L, g, n)),
              "D": (D, (h, p)), "z": (z, x.shape), "dt_bias": (dt_bias, (h,)), "h0": (h0, (b, h, p, n)),
              "doc": (doc, (b, L))}  # fmt: skip
    for name, (v, shape) in expect.items():
        if v is not None and tuple(v.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {name}.shape={tuple(v.shape)}")
    if g < 1 or h % g:
        raise ValueError(f"number of groups g={g} must divide the number of heads h={h}")
    if doc is not None and doc.dtype != jnp.int32:
        raise TypeError(f"doc must be int32 document indices, got doc.dtype={doc.dtype}")


# --------------------------------------------------------------------------
# dt preparation (XLA) and the document weights
# --------------------------------------------------------------------------


def _prep(cfg: SsdKernelConfig, dt, A, dt_bias):
    """(dtp, dA, cum), each (b, h, L) float32: the processed dt (0 on padded steps),
    dtp A, and its within-chunk inclusive cumulative sum."""
    b, L, h = dt.shape
    d = dt.astype(_F32)
    if dt_bias is not None:
        d = d + dt_bias.astype(_F32)
    if cfg.softplus:
        d = jax.nn.softplus(d)
    if tuple(cfg.dt_limit) != _NO_LIMIT:
        d = jnp.clip(d, cfg.dt_limit[0], cfg.dt_limit[1])
    if cfg.length < L:
        d = jnp.where(jnp.arange(L)[None, :, None] < cfg.length, d, 0.0)
    dtp = d.transpose(0, 2, 1)
    dA = dtp * A.astype(_F32)[None, :, None]
    return dtp, dA, jnp.cumsum(dA.reshape(b, h, L // cfg.chunk, cfg.chunk), axis=-1).reshape(b, h, L)


def _weights(cfg: SsdKernelConfig, cum, doc):
    """win, vout (b, h, L) and the chunk decays (b, h, c') with c' = next power of two >= c.

    win_t = exp(cum_t) [doc_t = doc(h_in)]: weight of C_t h_in in y_t;
    vout_s = exp(cum_end - cum_s) [doc_s = doc_end]: weight of step s in the
    outgoing state; decay = exp(cum_end) [doc_end = doc(h_in)]. h_in belongs to the
    document of the step before the chunk (the first step's, for h0).
    """
    b, h, L = cum.shape
    T = cfg.chunk
    nc = L // T
    cum_c = cum.reshape(b, h, nc, T)
    end = cum_c[..., -1:]
    win, vout, decay = jnp.exp(cum_c), jnp.exp(end - cum_c), jnp.exp(end[..., 0])
    if doc is not None:
        dc = doc.reshape(b, nc, T)
        d_in = jnp.concatenate([dc[:, :1, 0], dc[:, :-1, -1]], axis=1)  # (b, c)
        d_end = dc[:, :, -1]
        win = win * (dc == d_in[..., None]).astype(_F32)[:, None]
        vout = vout * (dc == d_end[..., None]).astype(_F32)[:, None]
        decay = decay * (d_end == d_in).astype(_F32)[:, None]
    decay = jnp.pad(decay, [(0, 0), (0, 0), (0, next_pow2(nc) - nc)])
    return win.reshape(b, h, L), vout.reshape(b, h, L), decay


# --------------------------------------------------------------------------
# custom_vjp
# --------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ssd(cfg, tiles, x, dt, A, B, C, D, z, dt_bias, h0, doc):
    return _ssd_fwd(cfg, tiles, x, dt, A, B, C, D, z, dt_bias, h0, doc)[0]


def _ssd_fwd(cfg: SsdKernelConfig, tiles: GpuSsdTiles, x, dt, A, B, C, D, z, dt_bias, h0, doc):
    b, L, h, P = x.shape
    N, nc, it = tiles.N, L // cfg.chunk, cfg.interpret
    dtp, _, cum = _prep(cfg, dt, A, dt_bias)
    win, vout, decay = _weights(cfg, cum, doc)
    S = chunk_outer(tiles, x, vout * dtp, B, None, interpret=it)
    h_flat = None if h0 is None else h0.reshape(b, h, P * N)
    hin, hT = pass_forward(tiles, S.reshape(b, nc, h, P * N), decay, h_flat, interpret=it)
    hin = hin.reshape(b, nc, h, P, N)
    y = chunk_rows(tiles, x, dtp, cum, win, B, C, hin, doc, D, z, interpret=it)
    return (y, hT.reshape(b, h, P, N)), (x, dt, A, B, C, D, z, dt_bias, h0, doc, hin)


def _ssd_bwd(cfg: SsdKernelConfig, tiles: GpuSsdTiles, res, cotangents):
    x, dt, A, B, C, D, z, dt_bias, h0, doc, hin = res
    dy, dhT = cotangents
    b, L, h, P = x.shape
    g, N = B.shape[2:]
    T, nc, it = cfg.chunk, L // cfg.chunk, cfg.interpret
    (dtp, _, cum), prep_vjp = jax.vjp(functools.partial(_prep, cfg), dt, A, dt_bias)
    win, vout, decay = _weights(cfg, cum, doc)
    dy = dy.astype(x.dtype)

    # State cotangents: from each chunk's outputs, then passed back over chunks.
    G = chunk_outer(tiles, dy, win, C, z, interpret=it)
    flat = lambda v: v.reshape(b, nc, h, P * N)
    dS, dh0, ddecay = pass_backward(tiles, flat(G), decay, flat(hin), dhT.astype(_F32).reshape(b, h, P * N), interpret=it)
    dS = dS.reshape(b, nc, h, P, N)

    dC_h, dcum_rows, ddA, dz = chunk_rows(tiles, x, dtp, cum, win, B, C, hin, doc, D, z, dy, interpret=it)
    dx, dB_h, ddtp, q, dD_p = chunk_cols(tiles, x, dtp, cum, vout, B, C, dS, doc, D, z, dy, interpret=it)

    # The in-chunk products' decays came as d(dt A) directly (ddA); d cum
    # collects exp(cum_t) in win, exp(cum_end - cum_s) in vout and exp(cum_end)
    # in the chunk decay.
    dcum = (dcum_rows - dtp * q).reshape(b, h, nc, T)
    end = (dtp * q).reshape(b, h, nc, T).sum(-1) + ddecay.sum(2)[..., :nc] * decay[..., :nc]
    dcum = dcum.at[..., -1].add(end).reshape(b, h, L)
    ddt, dA, dbias = prep_vjp((ddtp, ddA, dcum))

    per_group = lambda v, like: v.reshape(b, L, g, h // g, N).sum(3).astype(like.dtype)
    dD = None if D is None else dD_p.sum((0, 1)).astype(D.dtype)
    dh0 = None if h0 is None else dh0.reshape(b, h, P, N).astype(h0.dtype)
    return dx, ddt, dA, per_group(dB_h, B), per_group(dC_h, C), dD, dz, dbias, dh0, None


_ssd.defvjp(_ssd_fwd, _ssd_bwd)
