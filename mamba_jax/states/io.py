"""Saving, loading, batching and unbatching inference states.

A state file (``.npz``) holds every array of a :class:`mamba_jax.MambaCache`
(per layer: a Mamba layer's conv and SSM state, or an attention layer's KV
buffers) as raw bits with their dtype names, and a JSON header with

- the **fingerprint** of the model that made it: a hash of its configuration
  (and the configuration itself, so a mismatch can say which fields differ) and
  a SHA-256 digest of its parameters (one per tensor, so a mismatch names them);
- a **content hash** of the arrays, checked on load (a damaged file is refused);
- the layer kinds, batch size, format version and the caller's ``metadata``
  (e.g. tokens consumed, source-text hash).

:func:`load` refuses a state made by another model: a ``ValueError`` naming the
configuration fields or parameter tensors that differ. States batch and unbatch
like the caches they are: :func:`stack` joins caches along the batch axis,
:func:`select` takes rows, :func:`repeat` broadcasts one state to ``n`` rows
(forks that share a past).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax.cache import AttentionLayerCache, MambaCache, MambaLayerCache

FORMAT = "mamba_jax.states/1"
_KINDS = {"mamba": MambaLayerCache, "attention": AttentionLayerCache}
_HEADER = "__header__"


class StateMismatchError(ValueError):
    """A saved state belongs to another model (configuration or parameters differ)."""


class CorruptStateError(ValueError):
    """A state file is damaged or not a state file."""


# --------------------------------------------------------------------------- fingerprints


def _jsonable(x):
    if isinstance(x, tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return repr(x)
    return x


def config_dict(config) -> dict:
    """The model configuration as a JSON-able dict (tuples as lists, inf as a string)."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config must be a dataclass (MambaConfig), got {type(config).__name__}")
    return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(model) -> dict:
    """``{"config": {...}, "config_hash": sha256, "param_digest": sha256, "params": {path: sha256[:16]}}``.

    The parameter digests are over each tensor's dtype, shape and bytes (on the
    host), so any change to any weight changes them."""
    if not isinstance(model, nnx.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a MambaLM (an nnx.Module with a config), got {type(model).__name__}")
    cfg = config_dict(model.config)
    flat, _ = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    params = {}
    for path, leaf in flat:
        a = np.asarray(jax.device_get(leaf))
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        params[name] = _sha(f"{a.dtype}{a.shape}".encode() + a.tobytes())[:16]
    digest = _sha(json.dumps(params, sort_keys=True).encode())
    return {
        "config": cfg,
        "config_hash": _sha(json.dumps(cfg, sort_keys=True).encode()),
        "param_digest": digest,
        "params": params,
    }


def check_fingerprint(saved: dict, model, *, params: bool = True, what: str = "state") -> None:
    """StateMismatchError unless ``saved`` (a :func:`fingerprint`) is ``model``'s, naming what
    differs: the configuration, and with ``params`` the parameters."""
    mine = fingerprint(model)
    if saved["config_hash"] != mine["config_hash"]:
        a, b = saved["config"], mine["config"]
        diff = [f"{k}: saved {a.get(k)!r}, model {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        raise StateMismatchError(
            f"this {what} was made by a model with another configuration ({'; '.join(diff) or 'hash differs'})"
        )
    if params and saved["param_digest"] != mine["param_digest"]:
        a, b = saved["params"], mine["params"]
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise StateMismatchError(
            f"this {what} was made by a model with the same configuration but other parameters: "
            f"{len(diff)} of {len(b)} tensors differ ({shown}); pass check_params=False to load it anyway"
        )


# --------------------------------------------------------------------------- arrays <-> bits


def _to_bits(x) -> tuple[np.ndarray, str]:
    a = np.asarray(jax.device_get(x))
    name = str(a.dtype)
    if a.dtype == np.bool_:
        return a.astype(np.uint8), name
    size = a.dtype.itemsize
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[size]), name


def _from_bits(bits: np.ndarray, name: str) -> jax.Array:
    if name == "bool":
        return jnp.asarray(bits.astype(np.bool_))
    return jnp.asarray(bits.view(jnp.dtype(name)))


def _layer_kind(layer) -> str:
    for kind, cls in _KINDS.items():
        if isinstance(layer, cls):
            return kind
    raise TypeError(f"cache layers must be MambaLayerCache or AttentionLayerCache, got {type(layer).__name__}")


def _check_cache(cache) -> None:
    if not isinstance(cache, MambaCache):
        raise TypeError(f"cache must be a MambaCache (model.init_cache / model(ids, cache=...)), got {type(cache).__name__}")
    for layer in cache.layers:
        _layer_kind(layer)


def _content_hash(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = arrays[k]
        h.update(f"{k}{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- save / load


def save(path: str | os.PathLike, cache: MambaCache, model, *, metadata: dict | None = None) -> Path:
    """Writes ``cache`` with ``model``'s fingerprint to ``path`` (``.npz`` is appended
    if missing); returns the path. Atomic: a crash leaves the old file or the new one.

    ``metadata``: JSON-able dict stored with it (e.g. ``{"tokens": 1234}``)."""
    _check_cache(cache)
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    arrays, dtypes, kinds = {}, {}, []
    for i, layer in enumerate(cache.layers):
        kinds.append(_layer_kind(layer))
        for f in dataclasses.fields(layer):
            value = getattr(layer, f.name)
            if value is None:  # an optional buffer this layer does not have
                continue
            key = f"layers/{i}/{f.name}"
            arrays[key], dtypes[key] = _to_bits(value)
    header = {
        "format": FORMAT,
        "fingerprint": fingerprint(model),
        "kinds": kinds,
        "batch_size": cache.batch_size,
        "dtypes": dtypes,
        "content_hash": _content_hash(arrays),
        "metadata": metadata or {},
    }
    try:
        text = json.dumps(header)
    except TypeError as e:
        raise TypeError(f"metadata must be JSON-serialisable: {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays, **{_HEADER: np.frombuffer(text.encode(), np.uint8)})
    os.replace(tmp, path)
    return path


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a state file (fingerprint, kinds, batch size, metadata), without loading the arrays."""
    with _open(path) as z:
        return _header(z, path)


def _open(path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no state file at {path}")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip / npz at all
        raise CorruptStateError(f"{path} is not a state file (np.load failed: {e})") from e


def _header(z, path) -> dict:
    if _HEADER not in z.files:
        raise CorruptStateError(f"{path} is not a mamba_jax state file (no header)")
    header = json.loads(z[_HEADER].tobytes().decode())
    if header.get("format") != FORMAT:
        raise CorruptStateError(f"{path} has format {header.get('format')!r}, expected {FORMAT!r}")
    return header


def load(path: str | os.PathLike, model, *, check_params: bool = True) -> MambaCache:
    """The cache saved at ``path``, for ``model``.

    Raises StateMismatchError (a ValueError) when the state was made by a model
    with another configuration, or (unless ``check_params=False``) other
    parameters, naming what differs; CorruptStateError (a ValueError) when the
    file is damaged (content hash) or not a state file; TypeError when its layer
    kinds or shapes do not fit ``model``'s cache."""
    with _open(path) as z:
        header = _header(z, path)
        arrays = {k: z[k] for k in z.files if k != _HEADER}
    if _content_hash(arrays) != header["content_hash"]:
        raise CorruptStateError(f"{path}: the arrays do not match the content hash in the header (damaged file)")
    check_fingerprint(header["fingerprint"], model, params=check_params)
    layers = []
    for i, kind in enumerate(header["kinds"]):
        cls = _KINDS[kind]
        fields = {}
        for f in dataclasses.fields(cls):
            key = f"layers/{i}/{f.name}"
            fields[f.name] = _from_bits(arrays[key], header["dtypes"][key]) if key in arrays else None
        layers.append(cls(**fields))
    cache = MambaCache(layers=tuple(layers))
    _check_fits(cache, model)
    return cache


def _check_fits(cache: MambaCache, model) -> None:
    """TypeError unless ``cache`` has the kinds, shapes and dtypes of ``model.init_cache``."""
    max_length = cache.max_length
    expected = jax.eval_shape(lambda: model.init_cache(cache.batch_size, max_length))
    got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), cache)
    if jax.tree.structure(expected) != jax.tree.structure(got):
        raise TypeError("the saved state's layers do not match this model's cache layers (see model.init_cache)")
    for (p, e), g in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(got)):
        if (e.shape, e.dtype) != (g.shape, g.dtype):
            raise TypeError(
                f"the saved state's {jax.tree_util.keystr(p)} is {g.dtype}{list(g.shape)} but this model's cache "
                f"holds {e.dtype}{list(e.shape)}"
            )


# --------------------------------------------------------------------------- batch / unbatch


def _batched_leaves(layer) -> dict[str, Any]:
    """The fields of a layer cache that carry the batch axis first (not an attention cache's
    ``index``, nor optional buffers the layer does not have)."""
    return {
        f.name: getattr(layer, f.name)
        for f in dataclasses.fields(layer)
        if f.name != "index" and getattr(layer, f.name) is not None
    }


def stack(caches: Sequence[MambaCache]) -> MambaCache:
    """Joins caches of one model along the batch axis (rows in order). Attention
    layers must have written the same number of slots (``index``)."""
    caches = list(caches)
    if not caches:
        raise ValueError("stack needs at least one cache")
    for c in caches:
        _check_cache(c)
    first = caches[0]
    for i, c in enumerate(caches[1:], 1):
        if jax.tree.structure(c) != jax.tree.structure(first):
            raise ValueError(f"stack: cache {i} has other layer kinds than cache 0 (another model?)")
        for a, b in zip(jax.tree.leaves(c), jax.tree.leaves(first)):
            if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                raise ValueError(
                    f"stack: cache {i} holds a {a.dtype}{list(a.shape)} array where cache 0 holds "
                    f"{b.dtype}{list(b.shape)}: per-row shapes and dtypes must agree (another model?)"
                )
    layers = []
    for li, layer in enumerate(first.layers):
        fields = {k: jnp.concatenate([_batched_leaves(c.layers[li])[k] for c in caches], 0) for k in _batched_leaves(layer)}
        if isinstance(layer, AttentionLayerCache):
            idx = [int(c.layers[li].index) for c in caches]
            if len(set(idx)) != 1:
                raise ValueError(f"stack: attention layer {li} has written {idx} slots in the caches; they must be equal")
            fields["index"] = layer.index
        layers.append(type(layer)(**fields))
    return MambaCache(layers=tuple(layers))


def select(cache: MambaCache, rows) -> MambaCache:
    """The rows ``rows`` (an int, a sequence of ints or an int array) of a batched cache.
    An int keeps a batch axis of 1."""
    _check_cache(cache)
    b = cache.batch_size
    idx = np.atleast_1d(np.asarray(rows))
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or idx.size == 0:
        raise ValueError(f"rows must be an int or a non-empty 1-d sequence of ints, got {rows!r}")
    if idx.min() < -b or idx.max() >= b:
        raise IndexError(f"rows {idx.tolist()} out of range for a cache of batch size {b}")
    idx = jnp.asarray(idx % b)
    layers = []
    for layer in cache.layers:
        fields = {k: v[idx] for k, v in _batched_leaves(layer).items()}
        if isinstance(layer, AttentionLayerCache):
            fields["index"] = layer.index
        layers.append(type(layer)(**fields))
    return MambaCache(layers=tuple(layers))


def unstack(cache: MambaCache) -> list[MambaCache]:
    """One batch-1 cache per row."""
    return [select(cache, i) for i in range(cache.batch_size)]


def repeat(cache: MambaCache, n: int) -> MambaCache:
    """Each row repeated ``n`` times (row-major): forks of one state, independent buffers."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{n=} must be a positive int")
    return select(cache, np.repeat(np.arange(cache.batch_size), n))


def nbytes_per_row(cache: MambaCache) -> int:
    """Bytes of one row of the cache (what storing one state costs)."""
    _check_cache(cache)
    return cache.nbytes() // cache.batch_size
