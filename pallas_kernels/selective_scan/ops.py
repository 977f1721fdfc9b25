"""Public entry point of the Pallas selective scan: padding, platform choice.

``selective_scan_pallas`` takes the user layout (the one of
``mamba_jax.ops.selective_scan``), pads time with identity steps (the kernels
zero the step size of every padded step, which is exact with or without the
softplus) and each group's channels to the channel tile, runs the platform's
kernel (whose ``custom_vjp`` lives beside it in tpu.py / gpu.py) and crops.
Autodiff of the padding and cropping is plain XLA.

Platform choice: with ``platform=None`` one ``jax.lax.platform_dependent``
carries three branches, chosen when the computation is lowered: the Mosaic
kernel on TPU, the Triton kernel on CUDA and ROCm, and on every other platform
(CPU) the TPU kernel in interpret mode. So ``jax.export`` from a CPU machine
for ``platforms=["tpu"]`` or ``["cuda"]`` holds the real kernel.
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
    block_sizes: SelectiveScanBlockSizes | None = None,
    platform: str | None = None,
    interpret=None,
    state_interval: int | None = None,
):
    """Selective scan with the state kept on chip (Pallas kernels).

    Args:
      u, delta: (b, l, d). A: (d, n). B, C: (b, l, n) or grouped (b, l, g, n).
      D, delta_bias: optional (d,). z: optional gate (b, l, d).
      delta_softplus: apply softplus to ``delta + delta_bias`` (in the kernel).
      initial_state: optional (b, d, n).
      block_sizes: tiling; defaults to ``SelectiveScanBlockSizes()``.
      platform: None (choose per platform at lowering time), ``"tpu"`` (the
        Mosaic kernel) or ``"gpu"`` (the Triton kernel).
      interpret: None (interpret only on CPU), or a value passed to
        ``pallas_call(interpret=...)`` of the chosen kernel(s): True, or for
        the TPU kernel a ``pltpu.InterpretParams``.
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
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"{platform=} must be None or one of {PLATFORMS}")
    if B.ndim == 3:
        B = B[:, :, None, :]
    if C.ndim == 3:
        C = C[:, :, None, :]
    b, l, d = u.shape
    n = A.shape[1]
    g = B.shape[2]
    if l < 1:
        raise ValueError(f"u must have at least one time step, got {u.shape=}")
    if d % g:
        raise ValueError(f"the number of groups g={g} of B and C must divide d={d}")
    if n > MAX_STATE_SIZE:
        raise ValueError(f"state size n={n} is larger than the Pallas kernels support ({MAX_STATE_SIZE})")
    if state_interval is not None:
        if not isinstance(state_interval, int) or state_interval < 1:
            raise ValueError(f"{state_interval=} must be a positive int")
        if state_interval % bs.block_l:
            raise ValueError(f"{state_interval=} must be a multiple of block_l={bs.block_l}")
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    kw = dict(bs=bs, softplus=bool(delta_softplus), state_interval=state_interval)
    if platform is not None:
        return _run(platform, interpret or False, *args, **kw)
    return jax.lax.platform_dependent(
        *args,
        tpu=lambda *a: _run("tpu", interpret or False, *a, **kw),
        cuda=lambda *a: _run("gpu", interpret or False, *a, **kw),
        rocm=lambda *a: _run("gpu", interpret or False, *a, **kw),
        default=lambda *a: _run("tpu", True if interpret is None else interpret, *a, **kw),
    )


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("bs", "softplus", "state_interval"))
def _run(platform, interpret, u, delta, A, B, C, D, z, bias, h0, *, bs, softplus, state_interval):
    """Pads, runs one platform's kernel, crops."""
    b, l, d = u.shape
    n, g = A.shape[1], B.shape[2]
    p = d // g
    T = bs.block_l
    if platform == "tpu":
        W = bs.tpu_tile(p)
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
    want_states = state_interval is not None
    if platform == "tpu":
        cfg = TpuScanConfig(l, T, W, P // W, softplus, want_states, interpret)
        out = selective_scan_tpu(cfg, seq(u), seq(delta), state(A.astype(_F32)), Bp, Cp, vec(D), seq(z), vec(bias), h0)
    else:
        cfg = GpuScanConfig(l, T, W, P // W, softplus, want_states, bool(interpret), bs.num_warps)
        out = selective_scan_gpu(cfg, seq(u), seq(delta), state(A.astype(_F32)), Bp, Cp, vec(D), seq(z), vec(bias), h0)

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
