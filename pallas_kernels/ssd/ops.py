"""Public entry point of the Pallas SSD: validation, padding, cropping.

``ssd_pallas`` takes the layout of ``mamba_jax.ops.ssd``, pads time to a
multiple of the chunk (the kernels force the processed dt of every padded
step to 0: identity steps, exact with any bias or softplus), numbers the
documents of ``seq_idx`` (0, 1, 2, ... per row, padded steps in the row's last
document), broadcasts a per-head D to (h, p), runs the kernel of the platform
it is given (``tpu.ssd_tpu`` / ``gpu.ssd_gpu``) and crops. Autodiff of the
padding, casts and cropping is plain XLA.

The platform is an argument, never re-derived here: the dispatcher
(``mamba_jax.ops.ssd``) decides it once per platform and passes it down.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.selective_scan.reference import check_float, check_shape
from pallas_kernels.ssd.block_sizes import check_tpu_vmem
from pallas_kernels.ssd.config import SsdKernelConfig

_F32 = jnp.float32
PLATFORMS = ("tpu", "gpu")
NO_LIMIT = (0.0, float("inf"))
# A TPU kernel with more than one chunk reads dt as (1, T) lane-major blocks:
# T must be a multiple of the 128 lanes (a single chunk is the whole array).
TPU_CHUNK_MULTIPLE = 128


def ssd_pallas(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    dt_limit=NO_LIMIT,
    initial_state=None,
    seq_idx=None,
    *,
    platform: str,
    chunk_size: int = 256,
    interpret=False,
):
    """The SSD scan (see ``mamba_jax.ops.ssd``) with Pallas kernels.

    Args:
      x, z: (b, l, h, p). dt: (b, l, h). A, dt_bias: (h,). B, C: (b, l, g, n).
      D: (h,) or (h, p). initial_state: (b, h, p, n). seq_idx: (b, l) integer.
      dt_softplus, dt_limit: the dt processing, fused in the kernels.
      platform: ``"tpu"`` (Mosaic) or ``"gpu"``.
      chunk_size: steps per chunk. On TPU a sequence longer than one chunk
        needs a multiple of 128; a shorter one runs as one chunk of l rounded
        up to 8 steps.
      interpret: passed to ``pallas_call(interpret=...)``: False, True, or
        for the TPU kernel a ``pltpu.InterpretParams``.

    Returns:
      ``(y, final_state)``: y (b, l, h, p) in x.dtype, final_state (b, h, p, n)
      float32; both differentiable with respect to every float input.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"{platform=} must be one of {PLATFORMS}")
    _validate(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx)
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise ValueError(f"dt_limit must be a pair of floats (lo, hi), got {dt_limit=}") from None
    if not lo <= hi:
        raise ValueError(f"dt_limit must have lo <= hi, got {dt_limit=}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{chunk_size=} must be a positive int")
    l, p, n = x.shape[1], x.shape[3], B.shape[3]
    T = kernel_chunk(platform, l, chunk_size)
    if platform == "tpu":
        if T < l and T % TPU_CHUNK_MULTIPLE and interpret is False:
            raise ValueError(
                f"{chunk_size=} must be a multiple of {TPU_CHUNK_MULTIPLE} for the TPU kernel when the "
                f"sequence (l={l}) is longer than one chunk"
            )
        check_tpu_vmem(T, p, n)
    cfg = SsdKernelConfig(length=l, chunk=T, softplus=bool(dt_softplus), dt_limit=(lo, hi), interpret=interpret)
    return _run(platform, cfg, x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx)


def kernel_chunk(platform: str, length: int, chunk_size: int) -> int:
    """Steps per kernel chunk: ``chunk_size``, or on TPU one chunk of ``length``
    rounded up to 8 when the sequence fits in a single chunk."""
    if platform == "tpu" and length <= chunk_size:
        return -(-length // 8) * 8
    return chunk_size


def _validate(x, dt, A, B, C, D, z, dt_bias, h0, seq_idx):
    """Checks every argument; errors name it and the expected shape. Nothing is coerced."""
    check_float("x", x)
    if x.ndim != 4 or x.shape[1] == 0:
        raise ValueError(f"x must have shape (b, l, h, p) with l >= 1, got x.shape={tuple(x.shape)}")
    b, l, h, p = x.shape
    check_shape("dt", dt, (b, l, h), "(b, l, h)")
    check_shape("A", A, (h,), "(h,)")
    check_float("B", B)
    if B.ndim != 4 or tuple(B.shape[:2]) != (b, l) or B.shape[2] < 1 or h % B.shape[2]:
        raise ValueError(f"B must have shape (b, l, g, n) with (b, l)={(b, l)} and g dividing h={h}, got B.shape={tuple(B.shape)}")
    check_shape("C", C, B.shape, "(b, l, g, n) like B")
    if D is not None:
        check_float("D", D)
        if tuple(D.shape) not in ((h,), (h, p)):
            raise ValueError(f"D must have shape (h,)=({h},) or (h, p)=({h}, {p}), got D.shape={tuple(D.shape)}")
    if z is not None:
        check_shape("z", z, x.shape, "(b, l, h, p) like x")
    if dt_bias is not None:
        check_shape("dt_bias", dt_bias, (h,), "(h,)")
    if h0 is not None:
        check_shape("initial_state", h0, (b, h, p, B.shape[3]), "(b, h, p, n)")
    if seq_idx is not None:
        if not hasattr(seq_idx, "dtype") or not jnp.issubdtype(seq_idx.dtype, jnp.integer):
            raise TypeError(f"seq_idx must be an integer (int32) array, got {getattr(seq_idx, 'dtype', type(seq_idx))}")
        if tuple(seq_idx.shape) != (b, l):
            raise ValueError(f"seq_idx must have shape (b, l)={(b, l)}, got seq_idx.shape={tuple(seq_idx.shape)}")


def _document_numbers(seq_idx):
    """0, 0, 1, 1, 2 ...: the number of id changes so far in each row."""
    change = (seq_idx[:, 1:] != seq_idx[:, :-1]).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros_like(change[:, :1]), jnp.cumsum(change, axis=1)], axis=1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run(platform, cfg, x, dt, A, B, C, D, z, dt_bias, h0, seq_idx):
    """Pads, runs one platform's kernel, crops."""
    b, l, h, p = x.shape
    L = -(-l // cfg.chunk) * cfg.chunk

    def pad(v, mode="constant"):
        return None if v is None else jnp.pad(v, [(0, 0), (0, L - l)] + [(0, 0)] * (v.ndim - 2), mode=mode)

    doc = None if seq_idx is None else pad(_document_numbers(seq_idx), mode="edge")
    if D is not None:
        D = jnp.broadcast_to(D.astype(_F32)[:, None], (h, p)) if D.ndim == 1 else D.astype(_F32)
    args = (
        pad(x), pad(dt), A.astype(_F32), pad(B), pad(C), D, pad(z),
        None if dt_bias is None else dt_bias.astype(_F32),
        None if h0 is None else h0.astype(_F32),
        doc,
    )
    if platform == "tpu":
        from pallas_kernels.ssd.tpu import ssd_tpu

        y, hT = ssd_tpu(cfg, *args)
    else:
        from pallas_kernels.ssd.gpu import ssd_gpu  # helper module of the GPU kernel

        y, hT = ssd_gpu(cfg, *args)
    return y[:, :l], hT
