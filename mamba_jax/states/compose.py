"""Combining states: convex mixtures, per-layer selection, and decay-corrected composition.

For one Mamba layer the state after a segment ``B`` is affine in the state it
started from, with a diagonal map: ``h_after = P_B * h_before + h_B`` where
``P_B`` is the product of the per-step decays ``exp(delta_t A)`` over ``B``
(elementwise over (d, n) for Mamba-1; one scalar per head for Mamba-2) and
``h_B`` is the state ``B`` reaches from zero. ``P_B`` and ``h_B`` depend only on
the layer's inputs during ``B``, so :func:`segment` computes them once
(``h_B`` from a zero state; ``P_B`` as the difference of the states reached
from a state of ones and from zero, which is exact for an affine map) and
:func:`compose` applies them to any state ``A``.

For the first layer this is exact provided the convolution saw ``A``'s last
``d_conv - 1`` inputs (pass ``start=`` the cache after ``A`` to :func:`segment`:
its conv states are kept, its SSM states replaced by zeros). Deeper layers'
inputs during ``B`` depend on ``A`` through the layers below, so composition is
an approximation there; ``experiments/07_states_composition.py`` measures it.
Attention layers' KV caches do not compose this way: these functions raise a
ValueError for caches with attention layers.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from mamba_jax.cache import AttentionLayerCache, MambaCache, MambaLayerCache
from mamba_jax.states.snapshots import run


def _mamba_only(cache: MambaCache, what: str) -> None:
    if not isinstance(cache, MambaCache):
        raise TypeError(f"{what} must be a MambaCache, got {type(cache).__name__}")
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, AttentionLayerCache):
            raise ValueError(f"{what}: layer {i} is an attention layer; its KV cache cannot be mixed or composed")


@dataclasses.dataclass(frozen=True)
class Segment:
    """A segment's effect on every Mamba layer's state.

    Attributes:
      decay: per layer, the product of the segment's decays, shaped like the SSM state (b, ...).
      from_zero: the cache after the segment when every SSM state started at zero
        (and the conv states at ``start``'s, or zero).
      length: tokens in the segment.
    """

    decay: tuple[jax.Array, ...]
    from_zero: MambaCache
    length: int


def _with_ssm(cache: MambaCache, values: dict[int, jax.Array] | None, default) -> MambaCache:
    layers = []
    for i, layer in enumerate(cache.layers):
        v = values.get(i) if values else None
        ssm = v if v is not None else default(layer.ssm_state)
        layers.append(MambaLayerCache(conv_state=layer.conv_state, ssm_state=ssm))
    return MambaCache(layers=tuple(layers))


def segment(model, input_ids, start: MambaCache | None = None) -> Segment:
    """The decay products and from-zero states of ``input_ids`` (b, l) for every layer.

    ``start``: the cache the segment will follow, whose conv states (the last
    inputs) the segment's first steps see; its SSM states are not used. ``None``:
    zero conv states (the segment computed on its own). Costs ``n_layer + 1``
    prefills of the segment (one from zero, one per layer with that layer's
    state set to ones)."""
    input_ids = jnp.asarray(input_ids)
    base = model.init_cache(input_ids.shape[0]) if start is None else start
    _mamba_only(base, "start")
    zero = _with_ssm(base, None, jnp.zeros_like)
    _, from_zero = run(model, input_ids, zero)
    decays = []
    for i, layer in enumerate(zero.layers):
        ones = _with_ssm(zero, {i: jnp.ones_like(layer.ssm_state)}, lambda x: x)
        _, after = run(model, input_ids, ones)
        decays.append(after.layers[i].ssm_state - from_zero.layers[i].ssm_state)
    return Segment(decay=tuple(decays), from_zero=from_zero, length=int(input_ids.shape[1]))


def compose(before: MambaCache, seg: Segment) -> MambaCache:
    """The state after ``before``'s context followed by ``seg``'s tokens:
    ``P_B * h_before + h_B`` per layer; the conv states are the segment's."""
    _mamba_only(before, "before")
    if len(before.layers) != len(seg.decay):
        raise ValueError(f"before has {len(before.layers)} layers but the segment {len(seg.decay)}")
    layers = []
    for layer, p, after in zip(before.layers, seg.decay, seg.from_zero.layers):
        if layer.ssm_state.shape != p.shape:
            raise ValueError(f"state shape {layer.ssm_state.shape} does not match the segment's {p.shape}")
        layers.append(MambaLayerCache(conv_state=after.conv_state, ssm_state=p * layer.ssm_state + after.ssm_state))
    return MambaCache(layers=tuple(layers))


def mix(caches: Sequence[MambaCache], weights: Sequence[float]) -> MambaCache:
    """The weighted sum ``sum_i w_i * cache_i`` of every state (SSM and conv), layer by layer."""
    caches = list(caches)
    w = [float(x) for x in weights]
    if not caches or len(w) != len(caches):
        raise ValueError(f"mix needs as many weights as caches, got {len(w)} weights for {len(caches)} caches")
    for i, c in enumerate(caches):
        _mamba_only(c, f"caches[{i}]")
    if any(jax.tree.structure(c) != jax.tree.structure(caches[0]) for c in caches):
        raise ValueError("mix: the caches come from models with different layers")
    return jax.tree.map(lambda *xs: sum(wi * x.astype(jnp.float32) for wi, x in zip(w, xs)).astype(xs[0].dtype), *caches)


def take_layers(base: MambaCache, donor: MambaCache, layers: Sequence[int]) -> MambaCache:
    """``base`` with the states of ``layers`` (indices) taken from ``donor``."""
    _mamba_only(base, "base")
    _mamba_only(donor, "donor")
    n = len(base.layers)
    chosen = set(int(i) for i in layers)
    if any(not 0 <= i < n for i in chosen) or len(donor.layers) != n:
        raise ValueError(f"layers {sorted(chosen)} must lie in [0, {n}) and both caches must have {n} layers")
    return MambaCache(layers=tuple(donor.layers[i] if i in chosen else base.layers[i] for i in range(n)))


def layer_errors(approx: MambaCache, exact: MambaCache) -> list[float]:
    """Relative error ``||approx - exact|| / ||exact||`` of each layer's SSM state."""
    out = []
    for a, e in zip(approx.layers, exact.layers):
        d = jnp.linalg.norm((a.ssm_state - e.ssm_state).ravel())
        out.append(float(d / jnp.maximum(jnp.linalg.norm(e.ssm_state.ravel()), 1e-30)))
    return out
