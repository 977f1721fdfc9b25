"""Snapshots: the model's state every ``every`` tokens of a prefill.

:func:`prefill_snapshots` runs the prompt through the model chunk by chunk with
the cache (``model(chunk, cache=cache)``, each chunk through the parallel scan)
inside one ``lax.scan`` over the chunks, and keeps the cache after each chunk:
the states at positions ``every, 2 * every, ...``. The cost over a plain
prefill is the smaller chunks (more, shorter scans) and the memory of the
snapshots, ``L / every`` states; measured against ``every`` in
``experiments/05_states_snapshots.py``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.cache import AttentionLayerCache, MambaCache


@dataclasses.dataclass(frozen=True)
class Snapshots:
    """States taken during a prefill.

    Attributes:
      positions: tuple of ints, the number of tokens consumed at each snapshot.
      states: a MambaCache whose leaves have a leading snapshot axis (s, b, ...).
      final: the cache after the whole prompt (also the last snapshot when the
        length is a multiple of ``every``).
    """

    positions: tuple[int, ...]
    states: MambaCache
    final: MambaCache

    def __len__(self) -> int:
        return len(self.positions)

    def at(self, i: int) -> MambaCache:
        """Snapshot ``i`` as an ordinary cache (b, ...)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"snapshot {i} out of range: there are {len(self)}")
        return jax.tree.map(lambda x: x[i], self.states)

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.states))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _scan_chunks(graphdef, state, cache, chunks):
    model = nnx.merge(graphdef, state)

    def body(c, ids):
        _, c = model(ids, cache=c)
        return c, c

    return jax.lax.scan(body, cache, chunks)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _run(graphdef, state, cache, ids):
    model = nnx.merge(graphdef, state)
    return model(ids, cache=cache)


def run(model, input_ids, cache: MambaCache):
    """``model(input_ids, cache=cache)`` jitted (one compilation per shape): (logits, new cache)."""
    graphdef, state = nnx.split(model)
    return _run(graphdef, state, cache, jnp.asarray(input_ids))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _scan_chunks_final(graphdef, state, cache, chunks):
    model = nnx.merge(graphdef, state)

    def body(c, ids):
        return model(ids, cache=c)[1], None

    return jax.lax.scan(body, cache, chunks)[0]


def prefill_chunked(model, input_ids, chunk: int, cache: MambaCache | None = None) -> MambaCache:
    """The cache after ``input_ids`` (b, l), prefilled ``chunk`` tokens at a time in one
    ``lax.scan`` (the same schedule as :func:`prefill_snapshots`, keeping only the end)."""
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"{chunk=} must be a positive int")
    b, l = input_ids.shape
    if cache is None:
        cache = model.init_cache(b)
    graphdef, state = nnx.split(model)
    n = l // chunk
    if n == 0:
        return _run(graphdef, state, cache, input_ids)[1]
    chunks = jnp.swapaxes(input_ids[:, : n * chunk].reshape(b, n, chunk), 0, 1)
    last = _scan_chunks_final(graphdef, state, cache, chunks)
    return last if n * chunk == l else _run(graphdef, state, last, input_ids[:, n * chunk :])[1]


def prefill_snapshots(model, input_ids, every: int, cache: MambaCache | None = None) -> Snapshots:
    """Prefills ``input_ids`` (b, l) and returns the states every ``every`` tokens.

    ``cache``: start from this cache instead of an empty one (``init_cache(b)``;
    models with attention layers need a given cache with room for ``l`` more
    tokens). The snapshots are the caches after tokens ``every, 2 * every, ...``
    (a remainder shorter than ``every`` is prefilled after the last one and is
    in ``final`` only).
    """
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"{every=} must be a positive int")
    if not hasattr(input_ids, "ndim") or input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be an int array of shape (b, l), got {getattr(input_ids, 'shape', type(input_ids))}")
    b, l = input_ids.shape
    if every > l:
        raise ValueError(f"{every=} is longer than the prompt (l={l}): no snapshot would be taken")
    if cache is None:
        cache = model.init_cache(b)
    elif any(isinstance(x, AttentionLayerCache) for x in cache.layers):
        cache.layers[[isinstance(x, AttentionLayerCache) for x in cache.layers].index(True)].check_room(l)
    graphdef, state = nnx.split(model)
    n = l // every
    chunks = jnp.swapaxes(input_ids[:, : n * every].reshape(b, n, every), 0, 1)  # (n, b, every)
    last, states = _scan_chunks(graphdef, state, cache, chunks)
    final = last if n * every == l else _run(graphdef, state, last, input_ids[:, n * every :])[1]
    return Snapshots(positions=tuple(every * (i + 1) for i in range(n)), states=states, final=final)


def along_sequence(snaps: Snapshots, row: int = 0) -> MambaCache:
    """The snapshots of batch row ``row`` as one cache whose batch axis is time (s, ...):
    e.g. for probes over positions. Mamba layers only (an attention cache's
    slot index is shared by its rows)."""
    if any(isinstance(x, AttentionLayerCache) for x in snaps.states.layers):
        raise ValueError("along_sequence takes the states of Mamba layers only; this cache has attention layers")
    b = snaps.states.layers[0].ssm_state.shape[1]
    if not -b <= row < b:
        raise IndexError(f"{row=} out of range for batch size {b}")
    return jax.tree.map(lambda x: x[:, row], snaps.states)
