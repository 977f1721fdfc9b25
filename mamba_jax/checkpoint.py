"""Training checkpoints with Orbax that survive a crash.

One checkpoint per saved step holds, together: the model parameters, the
optimizer state, the training step, the RNG key(s) and the data-iterator
position (any JSON-serialisable dict), plus a fingerprint of every array.

    ckpt = CheckpointManager("runs/exp1", max_to_keep=3)
    for step in range(start, total):
        ...train...
        ckpt.save(step + 1, model, optimizer, rng=key, data_state={"position": pos})
    ckpt.wait_until_finished()

    # resume, without ever allocating a randomly initialised model:
    abstract_model, abstract_opt = nnx.eval_shape(lambda: make(...))   # both from one call
    restored = ckpt.restore(abstract_model, abstract_opt)   # None if there is no checkpoint
    model, optimizer, step = restored.model, restored.optimizer, restored.step

Saving is asynchronous (``ocp.CheckpointManager`` with async checkpointing):
``save`` returns once the arrays are copied off the accelerator and the write
continues in a background thread; ``wait_until_finished`` (or ``close``)
blocks until it is on disk. The last ``max_to_keep`` checkpoints are kept.

Crash safety. Orbax writes each step into ``<step>.orbax-checkpoint-tmp-*``
and renames it to ``<step>`` only when every file is written (on object
stores it writes ``commit_success.txt`` instead); a process killed mid-save
(SIGKILL, preemption) leaves a temporary directory, which is never taken for a
checkpoint: it is reported with a warning and removed when the manager opens
the directory. A finalised checkpoint that was damaged afterwards (a truncated
or corrupted file) is detected on restore, either because Orbax/TensorStore
cannot read it or because the arrays read back do not match the fingerprints
written at save time (two 32-bit hashes of each array's bits, so any flipped
bit is caught). ``restore()`` then warns, moves the bad step aside to
``_corrupted_<step>_<time>`` inside the directory and tries the previous one.
An explicitly requested ``step=`` that is damaged raises
:class:`CorruptCheckpointError` instead.

Failures are classified, never guessed: only damage moves a step aside. Damage
is a fingerprint mismatch, a missing file or unparsable metadata inside a
finalised step, or a read that TensorStore reports as ``DATA_LOSS``,
``OUT_OF_RANGE`` or ``NOT_FOUND`` (a truncated or malformed file). Everything
else propagates unchanged and moves nothing: I/O and permission errors
(``OSError``), ``MemoryError``, TensorStore's transient codes
(``UNAVAILABLE``, ``PERMISSION_DENIED``, ``RESOURCE_EXHAUSTED`` ...), a bad
target sharding, and an error nobody classified. A checkpoint written by
another ``FORMAT_VERSION`` raises :class:`CheckpointVersionError`. An abstract
model or optimizer that does not match what was saved (another config, or a
variable saved but not in the target or the reverse) raises ``ValueError``
before any array is read, and never moves a checkpoint aside.
:meth:`CheckpointManager.damaged_steps` lists what was moved aside.

Every variable of the model is saved, not only its ``nnx.Param`` variables
(``nnx.BatchStat``, counters, RNG keys of its streams ...), and every one is
restored: restoring onto a model whose variables differ from the saved ones is
the ``ValueError`` above, never a silent mix of saved and fresh values.

Sharding. ``restore`` places every array with a target sharding: by default
the sharding carried by the abstract leaves (``nnx.eval_shape`` under a mesh,
e.g. with ``jax.sharding.use_mesh`` and ``nnx.get_named_sharding``) or, when
they carry none, the first local device. Pass ``sharding=`` a
``jax.sharding.Sharding`` for every array, or a function ``(path, leaf) ->
Sharding`` (``path`` a tuple of keys such as ``("model", "layers", 0, "mixer",
"A_log")``), to restore onto a mesh: Orbax reads each shard directly where it
belongs, so a checkpoint saved on one topology restores onto another.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

__all__ = ["CheckpointManager", "Restored", "CorruptCheckpointError", "CheckpointVersionError", "fingerprint"]

# 2: every model variable (not only nnx.Param) is saved; typed PRNG keys as key data.
# 1 (parameters only) is still read: onto a model whose variables are all parameters it is the
# same checkpoint, and onto any other the target mismatch is a ValueError.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_TMP_RE = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
DAMAGED_PREFIX = "_corrupted_"
_DAMAGED_RE = re.compile(rf"^{DAMAGED_PREFIX}(\d+)_\d+$")
# TensorStore status codes of a file that is there but cannot be decoded ...
# (Newer TensorStore reports a chunk that fails to decompress as FAILED_PRECONDITION with
# the codec's "Data corruption detected": the status alone is not damage, the message is.)
_DAMAGE_CODES = re.compile(r"\b(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND)\b|Data corruption detected")
# ... and of a failure that may well succeed on the next try.
_TRANSIENT_CODES = re.compile(
    r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|PERMISSION_DENIED|RESOURCE_EXHAUSTED|ABORTED|CANCELLED|UNAUTHENTICATED)\b"
)


class CorruptCheckpointError(RuntimeError):
    """A finalised checkpoint could not be read back intact."""


class CheckpointVersionError(ValueError):
    """A checkpoint was written by another ``FORMAT_VERSION`` of this module."""


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_damage(err: BaseException) -> bool:
    """Whether ``err`` (raised while reading a finalised step) means the files are damaged.

    Only positive evidence counts: a fingerprint mismatch, a missing file, unparsable
    JSON, or a TensorStore ``DATA_LOSS`` / ``OUT_OF_RANGE`` / ``NOT_FOUND`` status or a
    codec's "Data corruption detected" anywhere in the exception chain. An ``OSError`` other than a missing file, a
    ``MemoryError`` or a transient TensorStore status anywhere in the chain is never
    damage, whatever else the chain says."""
    for e in _chain(err):
        if isinstance(e, MemoryError):
            return False
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.errno != errno.ENOENT:
            return False
        if _TRANSIENT_CODES.search(str(e)):
            return False
    for e in _chain(err):
        if isinstance(e, (CorruptCheckpointError, FileNotFoundError, json.JSONDecodeError)):
            return True
        if _DAMAGE_CODES.search(str(e)):
            return True
    return False


@dataclasses.dataclass
class Restored:
    """What :meth:`CheckpointManager.restore` returns."""

    step: int
    model: nnx.Module
    optimizer: nnx.Module | None
    rng: jax.Array | None
    data_state: dict


# --------------------------------------------------------------------------- fingerprints


def _bits_u32(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def _fingerprint_tree(tree):
    def one(x):
        bits = _bits_u32(x)
        idx = jnp.arange(bits.shape[0], dtype=jnp.uint32)
        weights = idx * jnp.uint32(2654435761) + jnp.uint32(1)  # odd: a flipped bit always changes it
        h1 = jnp.sum(bits, dtype=jnp.uint32)
        h2 = jnp.sum(bits * weights, dtype=jnp.uint32)
        return jnp.stack([h1, h2])

    return jax.tree.map(one, tree)


def fingerprint(tree) -> dict[str, str]:
    """``{"a/b/0": "h1:h2"}``: two wrapping 32-bit hashes of the bits of every array leaf."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    # One jitted call per set of devices (a sharded model and a key on one device
    # cannot meet in one computation).
    groups: dict = {}
    for p, x in flat:
        devices = getattr(x, "sharding", None)
        devices = frozenset(d.id for d in devices.device_set) if devices is not None else None
        groups.setdefault(devices, []).append((p, x))
    out = {}
    for members in groups.values():
        hashes = jax.device_get(_fingerprint_tree([x for _, x in members]))
        out.update({_path_str(p): f"{int(h[0]):08x}:{int(h[1]):08x}" for (p, _), h in zip(members, hashes)})
    return {_path_str(p): out[_path_str(p)] for p, _ in flat}


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    """Asynchronous, crash-safe training checkpoints (see the module docstring).

    Args:
      directory: where the checkpoints live (created if missing).
      max_to_keep: how many of the most recent checkpoints to keep (>= 2 so that a
        damaged latest one has a predecessor to fall back to).
      save_interval_steps: ``save`` only writes steps that are multiples of this.
      async_save: write in a background thread (default) or block in ``save``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        if not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"{max_to_keep=} must be a positive int")
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        for p in sorted(self.directory.iterdir()):
            if _TMP_RE.match(p.name):
                warnings.warn(
                    f"{p}: an unfinished checkpoint (a save was interrupted); it is ignored and removed",
                    stacklevel=2,
                )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("model", "optimizer", "rng", "meta"))

    # ---- queries
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def damaged_steps(self) -> list[Path]:
        """The steps moved aside as damaged (``_corrupted_<step>_<time>`` directories)."""
        return sorted(p for p in self.directory.iterdir() if _DAMAGED_RE.match(p.name))

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- save
    def save(
        self,
        step: int,
        model: nnx.Module,
        optimizer: nnx.Module | None = None,
        *,
        rng: jax.Array | None = None,
        data_state: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Start saving ``step``; returns whether a save was started (see ``save_interval_steps``).

        ``rng``: a JAX key (typed, ``jax.random.key``) or raw ``uint32`` key data, or a
        pytree of them. ``data_state``: JSON-serialisable position of the data iterator.
        """
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"{step=} must be a non-negative int")
        step = int(step)
        if not force and not self._manager.should_save(step):
            return False
        typed_keys = {}
        state = {"model": _keys_to_data(nnx.to_pure_dict(nnx.state(model)), "model", typed_keys)}
        if optimizer is not None:
            state["optimizer"] = _keys_to_data(nnx.to_pure_dict(nnx.state(optimizer)), "optimizer", typed_keys)
        rng_meta = None
        if rng is not None:
            keys, rng_meta = _rng_to_data(rng)
            state["rng"] = {"keys": keys}  # StandardSave wants a container, not a bare array
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "data_state": dict(data_state or {}),
            "rng": rng_meta,
            "has_optimizer": optimizer is not None,
            "typed_keys": typed_keys,
            "fingerprints": fingerprint(state),
            "arrays": _describe(state),
        }
        items = {name: ocp.args.StandardSave(tree) for name, tree in state.items()}
        return self._manager.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)), force=force)

    # ---- restore
    def restore(
        self,
        abstract_model: nnx.Module,
        abstract_optimizer: nnx.Module | None = None,
        *,
        step: int | None = None,
        sharding: jax.sharding.Sharding | Callable | None = None,
    ) -> Restored | None:
        """Restore onto an abstract model (and optimizer) made with ``nnx.eval_shape``.

        Concrete modules work too; their values are replaced. With ``step=None`` the
        latest intact checkpoint is used (damaged ones are reported and moved aside);
        ``None`` is returned when the directory holds no checkpoint, and
        :class:`CorruptCheckpointError` is raised when it held some but none was intact.
        Any failure that is not damage (see the module docstring) propagates unchanged
        and leaves every checkpoint where it is.
        """
        self._manager.wait_until_finished()
        if step is not None:
            return self._restore_step(int(step), abstract_model, abstract_optimizer, sharding)
        steps = sorted(self._manager.all_steps(), reverse=True)
        for s in steps:
            try:
                return self._restore_step(s, abstract_model, abstract_optimizer, sharding)
            except CorruptCheckpointError as err:  # damage only: everything else propagates
                warnings.warn(
                    f"checkpoint step {s} in {self.directory} is unreadable or corrupted "
                    f"({type(err).__name__}: {str(err)[:300]}); moving it aside and falling back "
                    "to the previous checkpoint",
                    stacklevel=2,
                )
                self._quarantine(s)
        if steps:  # there were checkpoints, none intact: starting over must be the caller's decision
            raise CorruptCheckpointError(f"no intact checkpoint in {self.directory}: steps {steps} were all damaged")
        return None

    def _quarantine(self, step: int) -> None:
        src = self.directory / str(step)
        if src.exists():
            dst = self.directory / f"{DAMAGED_PREFIX}{step}_{int(time.time())}"
            shutil.move(str(src), str(dst))
        self._manager.reload()

    def _restore_step(self, step, abstract_model, abstract_optimizer, sharding) -> Restored:
        step_dir = self.directory / str(step)
        if not ocp.path.step.is_checkpoint_finalized(step_dir):
            raise CorruptCheckpointError(f"step {step}: {step_dir} is not finalised (an interrupted save)")
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:
            if is_damage(err):
                raise CorruptCheckpointError(f"step {step}: metadata unreadable: {type(err).__name__}: {err}") from err
            raise
        if not isinstance(meta, Mapping):
            raise CorruptCheckpointError(f"step {step}: metadata is not a JSON object: {type(meta).__name__}")
        if meta.get("format_version") not in _READABLE_VERSIONS:
            raise CheckpointVersionError(
                f"checkpoint step {step} in {self.directory} has format_version={meta.get('format_version')!r}; "
                f"this mamba_jax reads format_version in {_READABLE_VERSIONS} (nothing was moved)"
            )
        if meta["format_version"] == 1:
            meta = {**meta, "typed_keys": {}}  # version 1 saved no typed keys
        missing = [k for k in ("arrays", "fingerprints", "data_state", "rng", "has_optimizer", "typed_keys") if k not in meta]
        if missing:
            raise CorruptCheckpointError(f"step {step}: metadata lacks {missing}")
        if abstract_optimizer is not None and not meta["has_optimizer"]:
            raise ValueError(f"step {step} was saved without an optimizer state")
        m_graph, m_state = nnx.split(abstract_model)
        typed = {}
        target = {"model": _keys_to_data(_abstract(nnx.to_pure_dict(m_state)), "model", typed)}
        if abstract_optimizer is not None:
            o_graph, o_state = nnx.split(abstract_optimizer)
            target["optimizer"] = _keys_to_data(_abstract(nnx.to_pure_dict(o_state)), "optimizer", typed)
        if meta["rng"] is not None:
            target["rng"] = {"keys": jax.tree.map(
                lambda spec: jax.ShapeDtypeStruct(tuple(spec["shape"]), jnp.uint32), meta["rng"],
                is_leaf=lambda x: isinstance(x, dict) and "impl" in x,
            )}
        # A target that does not match what was saved is the caller's error (a different
        # config), not damage: it raises ValueError and never moves a checkpoint aside.
        saved = {k: v for k, v in meta["arrays"].items() if k.split("/")[0] in target}
        want = _describe(target)
        mismatch = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
        saved_keys = {k: v for k, v in meta["typed_keys"].items() if k.split("/")[0] in target}
        mismatch += sorted(
            f"{k} (PRNG key impl)" for k in set(saved_keys) | set(typed) if saved_keys.get(k) != typed.get(k)
        )
        if mismatch:
            details = [f"{k}: saved {saved.get(k)}, target {want.get(k)}" for k in mismatch[:5]]
            raise ValueError(f"the abstract model/optimizer does not match checkpoint step {step}: {details}")
        target = _with_sharding(target, sharding)
        try:
            items = {name: ocp.args.StandardRestore(tree) for name, tree in target.items()}
            result = self._manager.restore(step, args=ocp.args.Composite(**items))
            restored = {name: result[name] for name in target}
        except Exception as err:
            if is_damage(err):
                raise CorruptCheckpointError(f"step {step}: arrays unreadable: {type(err).__name__}: {err}") from err
            raise
        want = meta["fingerprints"]
        got = fingerprint(restored)
        bad = sorted(k for k in got if want.get(k) != got[k])
        if bad:
            raise CorruptCheckpointError(f"step {step}: arrays differ from their save-time fingerprints: {bad[:5]}")
        nnx.replace_by_pure_dict(m_state, _data_to_keys(restored["model"], "model", typed))
        model = nnx.merge(m_graph, m_state)
        optimizer = None
        if abstract_optimizer is not None:
            nnx.replace_by_pure_dict(o_state, _data_to_keys(restored["optimizer"], "optimizer", typed))
            optimizer = nnx.merge(o_graph, o_state)
        rng = None
        if meta["rng"] is not None:
            rng = _rng_from_data(restored["rng"]["keys"], meta["rng"])
        return Restored(step=step, model=model, optimizer=optimizer, rng=rng, data_state=meta["data_state"])


def _describe(tree) -> dict[str, str]:
    """``{"model/layers/0/mixer/A_log": "float32[128, 16]"}`` for every array leaf."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_str(p): f"{jnp.dtype(x.dtype).name}{list(x.shape)}" for p, x in flat}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _with_sharding(tree, sharding):
    # Leaves without a target sharding (RNG keys, counters) go where the others are:
    # replicated over their mesh when the target is sharded (a multi-process run cannot
    # read into one process's device), else onto the first local device.
    meshes = [x.sharding.mesh for x in jax.tree.leaves(tree) if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)]
    if meshes:
        default = jax.sharding.NamedSharding(meshes[0], jax.sharding.PartitionSpec())
    else:
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def place(path, leaf):
        if sharding is None:
            s = leaf.sharding if isinstance(leaf.sharding, jax.sharding.Sharding) else default
        elif isinstance(sharding, jax.sharding.Sharding):
            s = sharding
        else:
            s = sharding(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path), leaf)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s)

    return jax.tree_util.tree_map_with_path(place, tree)


def _is_typed_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree, prefix: str, impls: dict):
    """Typed PRNG keys (concrete or abstract) -> their uint32 key data; ``impls`` gets
    ``{"prefix/path": impl name}`` for each, so that they are re-wrapped on restore."""

    def one(path, x):
        if not _is_typed_key(x):
            return x
        if isinstance(x, jax.Array):
            impl = str(jax.random.key_impl(x))
        else:  # abstract: jax.random.key_impl takes no ShapeDtypeStruct; the key dtype knows its impl
            impl = str(x.dtype._impl.name)
        impls[f"{prefix}/{_path_str(path)}"] = _impl_name(impl)
        if isinstance(x, jax.ShapeDtypeStruct):
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=None)
        return jax.random.key_data(x)

    return jax.tree_util.tree_map_with_path(one, tree)


def _data_to_keys(tree, prefix: str, impls: dict):
    def one(path, x):
        impl = impls.get(f"{prefix}/{_path_str(path)}")
        return x if impl is None else jax.random.wrap_key_data(x, impl=impl)

    return jax.tree_util.tree_map_with_path(one, tree)


def _rng_to_data(rng):
    leaves = jax.tree.leaves(rng)
    if not leaves:
        raise ValueError("rng has no keys")

    def one(x):
        if _is_typed_key(x):
            return jax.random.key_data(x), {"impl": str(jax.random.key_impl(x)), "shape": list(jax.random.key_data(x).shape)}
        x = jnp.asarray(x)
        if x.dtype != jnp.uint32:
            raise TypeError(f"rng leaves must be JAX keys or uint32 key data, got {x.dtype}")
        return x, {"impl": None, "shape": list(x.shape)}

    pairs = jax.tree.map(one, rng, is_leaf=_is_typed_key)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], dict)
    data = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
    meta = jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)
    return data, meta


def _rng_from_data(data, meta):
    is_spec = lambda x: isinstance(x, dict) and "impl" in x
    return jax.tree.map(
        lambda spec, d: d if spec["impl"] is None else jax.random.wrap_key_data(d, impl=_impl_name(spec["impl"])),
        meta, data, is_leaf=is_spec,
    )


@functools.cache
def _impl_name(text: str) -> str:
    # str(key_impl) is e.g. "PRNGImpl(threefry2x32)" or "threefry2x32"
    m = re.search(r"(threefry2x32|rbg|unsafe_rbg)", text)
    if not m:
        raise ValueError(f"unknown PRNG implementation {text!r}")
    return m.group(1)
