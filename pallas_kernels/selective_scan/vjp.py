"""Pieces shared by the TPU and GPU kernels' ``custom_vjp`` (each platform file
defines its own ``_scan`` / ``_scan_fwd`` / ``_scan_bwd``; these keep the
bookkeeping that does not depend on the platform in one place)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


class Present(NamedTuple):
    """Which optional operands a kernel call has (static: each combination is its own kernel)."""

    D: bool
    z: bool
    bias: bool
    state: bool  # the initial state in the forward, the saved states' cotangent in the backward
    cont: bool = False  # the continuation mask of packed documents (0 where a document starts)

    @classmethod
    def of(cls, D, z, bias, state, cont=None) -> "Present":
        return cls(D is not None, z is not None, bias is not None, state is not None, cont is not None)


def scan_outputs(want_states: bool, y, hT, states):
    """The primal outputs: ``(y, hT)``, or ``(y, hT, states)`` when the caller asked for the
    block-boundary states (which the forward saves for the backward anyway)."""
    return (y, hT, states) if want_states else (y, hT)


def split_cotangents(want_states: bool, cotangents):
    """``(dy, dhT, dstates)``; ``dstates`` is None when the states were not an output."""
    if want_states:
        return cotangents
    dy, dhT = cotangents
    return dy, dhT, None


def input_cotangents(D, bias, h0, du, ddt, dA, dB, dC, dD_partial, dz, dh0):
    """Cotangents of ``(u, dt, A, B, C, D, z, bias, h0)`` from the backward kernel's
    outputs: sums dD over sequences and d(bias) over (b, l); None for absent inputs."""
    dD = None if D is None else dD_partial.sum(0).astype(D.dtype)
    dbias = None if bias is None else ddt.astype(jnp.float32).sum((0, 1)).astype(bias.dtype)
    dh0 = None if h0 is None else dh0.astype(h0.dtype)
    return du, ddt, dA, dB, dC, dD, dz, dbias, dh0
