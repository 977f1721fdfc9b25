"""The ``custom_vjp`` wiring shared by the TPU and GPU kernels.

Each platform module supplies its two ``pallas_call`` builders and the XLA
reduction of its per-tile partial sums; everything else (what the forward
saves, the optional state output, the reductions common to both) lives here.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Present(NamedTuple):
    """Which optional operands a kernel call has (static: each combination is its own kernel)."""

    D: bool
    z: bool
    bias: bool
    state: bool  # the initial state in the forward, the saved states' cotangent in the backward

    @classmethod
    def of(cls, D, z, bias, state) -> "Present":
        return cls(D is not None, z is not None, bias is not None, state is not None)


def kernel_scan(forward_call: Callable, backward_call: Callable, reduce_partials: Callable) -> Callable:
    """Builds ``scan(cfg, u, dt, A, B, C, D, z, bias, h0)`` with a recomputing backward.

    * ``forward_call(cfg, u, dt, A, B, C, D, z, bias, h0) -> (y, states, hT)``: the
      block-boundary ``states`` are saved for the backward (and returned when
      ``cfg.want_states``).
    * ``backward_call(cfg, u, dt, A, B, C, D, z, bias, states, dy, dhT, dstates)
      -> (du, ddt, dz, dA_partial, dB_partial, dC_partial, dD_partial, dh0)``.
    * ``reduce_partials(cfg, u, A, B, C, dA_partial, dB_partial, dC_partial) -> (dA, dB, dC)``.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def scan(cfg, u, dt, A, B, C, D, z, bias, h0):
        out, _ = scan_fwd(cfg, u, dt, A, B, C, D, z, bias, h0)
        return out

    def scan_fwd(cfg, u, dt, A, B, C, D, z, bias, h0):
        y, states, hT = forward_call(cfg, u, dt, A, B, C, D, z, bias, h0)
        out = (y, hT, states) if cfg.want_states else (y, hT)
        return out, (u, dt, A, B, C, D, z, bias, h0, states)

    def scan_bwd(cfg, res, cotangents):
        u, dt, A, B, C, D, z, bias, h0, states = res
        if cfg.want_states:
            dy, dhT, dstates = cotangents
        else:
            (dy, dhT), dstates = cotangents, None
        du, ddt, dz, dA_p, dB_p, dC_p, dD_p, dh0 = backward_call(
            cfg, u, dt, A, B, C, D, z, bias, states, dy, dhT, dstates
        )
        dA, dB, dC = reduce_partials(cfg, u, A, B, C, dA_p, dB_p, dC_p)
        dD = None if D is None else dD_p.sum(0).astype(D.dtype)
        dbias = None if bias is None else ddt.astype(jnp.float32).sum((0, 1)).astype(bias.dtype)
        dh0 = None if h0 is None else dh0.astype(h0.dtype)
        return du, ddt, dA, dB, dC, dD, dz, dbias, dh0

    scan.defvjp(scan_fwd, scan_bwd)
    return scan
