"""Public entry point of the Pallas selective scan: validation, padding, cropping.

``selective_scan_pallas`` takes the user layout (the one of
``mamba_jax.ops.selective_scan``), pads time with identity steps (the kernels
zero the step size of every padded step, which is exact with or without the
softplus) and each group's channels to the channel tile, runs the kernel of
the platform it is given (``tpu.py`` / ``gpu.py``) and crops. Autodiff of the
padding and cropping is plain XLA.

The platform is an argument, never re-derived here: the dispatcher
(``mamba_jax.ops.selective_scan``) decides it once per platform and passes it
down, so a lowered function carries exactly one kernel per platform.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.selective_scan.block_sizes import (
    MAX_STATE_SIZE,
    SelectiveScanBlockSizes,
    _next_pow2,
    _round_up,
)
from pallas_kernels.selective_scan.gpu import GpuScanConfig, selective_scan_gpu
from pallas_kernels.selective_scan.reference import validate
from pallas_kernels.selective_scan.tpu import TpuScanConfig, selective_scan_tpu

_F32 = jnp.float32
PLATFORMS = ("tpu", "gpu")


def selective_scan_pallas(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    *,
    continuation=None,
    platform: str,
    block_sizes: SelectiveScanBlockSizes | None = None,
    interpret=False,
    state_interval: int | None = None,
):
    """Selective scan with the state kept on chip (Pallas kernels).

    Args:
      u, delta: (b, l, d). A: (d, n). B, C: (b, l, n) or grouped (b, l, g, n).
      D, delta_bias: optional (d,). z: optional gate (b, l, d).
      delta_softplus: apply softplus to ``delta + delta_bias`` (in the kernel).
      initial_state: optional (b, d, n).
      continuation: optional (b, l) float mask of packed documents: 0 where a
        new document starts (the state before that step is replaced by zero),
        1 elsewhere; ``mamba_jax.ops.selective_scan(seq_idx=...)`` builds it.
      platform: ``"tpu"`` (the Mosaic kernel) or ``"gpu"`` (the Triton kernel).
      block_sizes: tiling; defaults to ``SelectiveScanBlockSizes()``.
      interpret: passed to ``pallas_call(interpret=...)``: False (compile for the
        hardware), True, or for the TPU kernel a ``pltpu.InterpretParams``.
      state_interval: if set, also return the states after every
        ``state_interval`` steps, (b, l // state_interval, d, n) float32;
        must be a multiple of ``block_sizes.block_l`` (the kernel saves the
        state at every block boundary anyway, so this costs one gather).

    Returns:
      ``(y, final_state)``, or ``(y, final_state, states)`` with
      ``state_interval``; y (b, l, d) in u.dtype, states float32. All are
      differentiable with respect to every input.
    """
    bs = block_sizes if block_sizes is not None else SelectiveScanBlockSizes()
    if not isinstance(bs, SelectiveScanBlockSizes):
        raise TypeError(f"block_sizes must be a SelectiveScanBlockSizes, got {type(bs).__name__}")
    if platform not in PLATFORMS:
        raise ValueError(f"{platform=} must be one of {PLATFORMS}")
    B, C = validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if continuation is not None and tuple(continuation.shape) != tuple(u.shape[:2]):
        raise ValueError(f"continuation must have shape (b, l)={tuple(u.shape[:2])}, got {tuple(continuation.shape)}")
    n, g = A.shape[1], B.shape[2]
    if n > MAX_STATE_SIZE:
        raise ValueError(f"state size n={n} is larger than the Pallas kernels support ({MAX_STATE_SIZE})")
    if platform == "tpu":
        bs.tpu_tile(u.shape[2] // g, n)  # raises here, before lowering, for a tile over the VMEM budget
    if state_interval is not None:
        if not isinstance(state_interval, int) or state_interval < 1:
            raise ValueError(f"{state_interval=} must be a positive int")
        if state_interval % bs.block_l:
            raise ValueError(f"{state_interval=} must be a multiple of block_l={bs.block_l}")
    return _run(
        platform, interpret, u, delta, A, B, C, D, z, delta_bias, initial_state, continuation,
        bs=bs, softplus=bool(delta_softplus), state_interval=state_interval,
    )


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("bs", "softplus", "state_interval"))
def _run(platform, interpret, u, delta, A, B, C, D, z, bias, h0, cont, *, bs, softplus, state_interval):
    """Pads, runs one platform's kernel, crops."""
    b, l, d = u.shape
    n, g = A.shape[1], B.shape[2]
    p = d // g
    T = bs.block_l
    if platform == "tpu":
        W = bs.tpu_tile(p, n)
        N = n
    else:
        W = bs.gpu_tile(p)
        N = _next_pow2(n)  # Triton tensors have power-of-two sizes
    P, L = _round_up(p, W), _round_up(l, T)

    def chan(x, lead_pad=()):  # (..., d) -> (..., g * P)
        x = x.reshape(*x.shape[:-1], g, p)
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, P - p)])
        return x.reshape(*x.shape[:-2], g * P)

    def seq(x):  # (b, l, d) -> (b, L, g * P)
        return None if x is None else jnp.pad(chan(x), [(0, 0), (0, L - l), (0, 0)])

    def state(x):  # (..., d, n) -> (..., g * P, N)
        x = x.reshape(*x.shape[:-2], g, p, n)
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, P - p), (0, N - n)])
        return x.reshape(*x.shape[:-3], g * P, N)

    vec = lambda x: None if x is None else chan(x.astype(_F32))
    Bp = jnp.pad(B, [(0, 0), (0, L - l), (0, 0), (0, N - n)])
    Cp = jnp.pad(C, [(0, 0), (0, L - l), (0, 0), (0, N - n)])
    h0 = None if h0 is None else state(h0.astype(_F32))
    cont = None if cont is None else jnp.pad(cont.astype(_F32), [(0, 0), (0, L - l)], constant_values=1.0)
    want_states = state_interval is not None
    if platform == "tpu":
        cfg = TpuScanConfig(l, T, W, P // W, softplus, want_states, interpret)
        out = selective_scan_tpu(
            cfg, seq(u), seq(delta), state(A.astype(_F32)), Bp, Cp, vec(D), seq(z), vec(bias), h0, cont
        )
    else:
        cfg = GpuScanConfig(l, T, W, P // W, softplus, want_states, bool(interpret), bs.num_warps)
        out = selective_scan_gpu(
            cfg, seq(u), seq(delta), state(A.astype(_F32)), Bp, Cp, vec(D), seq(z), vec(bias), h0, cont
        )

    def crop_state(x):  # (..., g * P, N) -> (..., d, n)
        x = x.reshape(*x.shape[:-2], g, P, N)[..., :p, :n]
        return x.reshape(*x.shape[:-3], d, n)

    y = out[0][:, :l].reshape(b, l, g, P)[..., :p].reshape(b, l, d).astype(u.dtype)
    hT = crop_state(out[1])
    if not want_states:
        return y, hT
    # out[2][:, c] is the state at the start of block c; the state after block c
    # is out[2][:, c + 1] or, after the last block, the final state.
    after = jnp.concatenate([out[2][:, 1:], out[1][:, None]], axis=1)
    k = state_interval // T
    count = l // state_interval
    states = after[:, k - 1 :: k][:, :count]
    return y, hT, crop_state(states)
