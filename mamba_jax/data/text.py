"""A byte-level text corpus that needs no download: the Python standard library's source.

``ByteCorpus.from_stdlib()`` reads the ``.py`` files of the running Python's
standard library (``sysconfig.get_paths()["stdlib"]``), about 12 MB for
CPython 3.11 without its tests, and Debian's GCIDE dictionary
(``/usr/share/dictd/gcide.dict.dz``, package ``dict-gcide``) when it is
installed. Tokens are bytes (vocabulary 256); documents are joined with the
separator byte ``SEPARATOR`` (0).

The split is by document: a document is held out when a hash of its name (its
path relative to the library root, e.g. ``stdlib/json/decoder.py``) falls
below ``held_out_fraction``, so held-out files never appear in training, and a
document's split does not depend on which other files exist. The corpus is
host-side NumPy: sample batches outside ``jit`` and pass them in.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
import pathlib
import platform
import sysconfig
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np

SEPARATOR = 0  # byte placed between documents
VOCAB_SIZE = 256
GCIDE_PATH = "/usr/share/dictd/gcide.dict.dz"
GCIDE_CHUNK = 1 << 16  # GCIDE is one file: it is cut into documents of about this many bytes, at newlines
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}
_SPLITS = ("train", "held_out")


def held_out_score(name: str) -> float:
    """A deterministic number in [0, 1) from a document's name; below the held-out fraction means held out."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2.0**64


def _stdlib_documents(root: pathlib.Path, include_tests: bool) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, loader) for every ``.py`` file under ``root``, in sorted order of relative path."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and (include_tests or d not in _TEST_DIRS)]
        paths += [pathlib.Path(dirpath, f).relative_to(root).as_posix() for f in filenames if f.endswith(".py")]
    for rel in sorted(paths):
        yield f"stdlib/{rel}", (lambda p=root / rel: p.read_bytes())


def _gcide_documents(path: pathlib.Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """GCIDE cut into chunks of about ``GCIDE_CHUNK`` bytes at newlines, named ``gcide/00000`` ..."""
    with gzip.open(path, "rb") as f:  # dictzip (.dz) is gzip-compatible
        text = f.read()
    start, i = 0, 0
    while start < len(text):
        cut = text.find(b"\n", start + GCIDE_CHUNK)
        end = len(text) if cut < 0 else cut + 1
        yield f"gcide/{i:05d}", (lambda chunk=text[start:end]: chunk)
        start, i = end, i + 1


@dataclasses.dataclass(frozen=True, eq=False)
class ByteCorpus:
    """Train and held-out byte streams with random-window and evaluation batches.

    Attributes:
      train: the training bytes, np.uint8, documents joined with ``SEPARATOR``.
      held_out: the held-out bytes, same format, from documents disjoint from ``train``'s.
      sources: what was read, one JSON-ready dict per source (name, path,
        version, documents and bytes per split).
      held_out_fraction: the fraction of documents (by name hash) held out.
      train_names: the names of the training documents, in order.
      held_out_names: the names of the held-out documents, in order.
    """

    train: np.ndarray
    held_out: np.ndarray
    sources: tuple[dict, ...]
    held_out_fraction: float
    train_names: tuple[str, ...]
    held_out_names: tuple[str, ...]

    vocab_size = VOCAB_SIZE

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_stdlib(
        cls,
        max_bytes: int | None = None,
        held_out_fraction: float = 0.05,
        include_gcide: bool = True,
        *,
        include_tests: bool = False,
        stdlib_path: str | os.PathLike | None = None,
        gcide_path: str | os.PathLike = GCIDE_PATH,
    ) -> ByteCorpus:
        """The Python standard library's ``.py`` files, then GCIDE if present.

        Skipped: ``site-packages`` / ``dist-packages`` (third-party code, and
        huge under pyenv) and, unless ``include_tests``, directories named
        ``test``, ``tests`` or ``idle_test`` (CPython's test suite is larger
        than the library and full of deliberately odd data). Files are read in
        sorted order of relative path. GCIDE is used when ``include_gcide`` and
        ``gcide_path`` exists; its absence is silent (``sources`` tells).

        ``max_bytes`` caps the corpus: the held-out split gets
        ``round(held_out_fraction * max_bytes)`` bytes and training the rest,
        each filled with its documents in order (the last one cut short), so
        both splits stay non-empty for any cap large enough to hold a byte of each.
        """
        root = pathlib.Path(stdlib_path or sysconfig.get_paths()["stdlib"])
        stdlib = {"name": "python-stdlib", "path": str(root), "version": platform.python_version()}
        groups = [({**stdlib, "include_tests": include_tests}, _stdlib_documents(root, include_tests))]
        if include_gcide and pathlib.Path(gcide_path).is_file():
            groups.append(({"name": "gcide", "path": str(gcide_path)}, _gcide_documents(pathlib.Path(gcide_path))))
        return cls._build(groups, max_bytes, held_out_fraction)

    @classmethod
    def from_documents(
        cls,
        documents: Iterable[tuple[str, bytes]],
        max_bytes: int | None = None,
        held_out_fraction: float = 0.05,
        source: str = "documents",
    ) -> ByteCorpus:
        """A corpus from ``(name, bytes)`` pairs, split by name hash like ``from_stdlib``."""
        docs = ((name, (lambda data=data: data)) for name, data in documents)
        return cls._build([({"name": source}, docs)], max_bytes, held_out_fraction)

    @classmethod
    def _build(cls, groups, max_bytes: int | None, held_out_fraction: float) -> ByteCorpus:
        if not 0.0 <= held_out_fraction < 1.0:
            raise ValueError(f"{held_out_fraction=} must be in [0, 1)")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"{max_bytes=} must be positive (or None for everything)")
        budget = {"train": float("inf"), "held_out": float("inf")}
        if max_bytes is not None:
            budget["held_out"] = round(held_out_fraction * max_bytes)
            budget["train"] = max_bytes - budget["held_out"]
        parts = {s: [] for s in _SPLITS}  # byte strings, separators included
        names = {s: [] for s in _SPLITS}
        size = dict.fromkeys(_SPLITS, 0)
        sources = []
        for info, docs in groups:
            if all(size[s] >= budget[s] for s in _SPLITS):
                break
            counts = {f"{s}_{k}": 0 for s in _SPLITS for k in ("documents", "bytes")}
            for name, load in docs:
                if all(size[s] >= budget[s] for s in _SPLITS):
                    break
                split = "held_out" if held_out_score(name) < held_out_fraction else "train"
                room = budget[split] - size[split]
                if room <= 0:
                    continue
                data = load()
                if not data:
                    continue
                if parts[split]:
                    data = bytes([SEPARATOR]) + data
                data = data[: room if room != float("inf") else None]
                parts[split].append(data)
                names[split].append(name)
                size[split] += len(data)
                counts[f"{split}_documents"] += 1
                counts[f"{split}_bytes"] += len(data)
            if any(counts.values()):
                sources.append({**info, **counts})
        arrays = {s: np.frombuffer(b"".join(parts[s]), np.uint8) for s in _SPLITS}
        return cls(
            train=arrays["train"],
            held_out=arrays["held_out"],
            sources=tuple(sources),
            held_out_fraction=held_out_fraction,
            train_names=tuple(names["train"]),
            held_out_names=tuple(names["held_out"]),
        )

    # ------------------------------------------------------------------ facts

    @property
    def num_bytes(self) -> int:
        """Bytes in both splits together."""
        return int(self.train.size + self.held_out.size)

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of both splits, with their lengths: equal fingerprints mean equal data."""
        h = hashlib.sha256()
        for data in (self.train, self.held_out):
            h.update(data.size.to_bytes(8, "little"))
            h.update(data.tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        """A JSON-ready record of the corpus for experiment results."""
        return {
            "vocab_size": VOCAB_SIZE,
            "train_bytes": int(self.train.size),
            "held_out_bytes": int(self.held_out.size),
            "held_out_fraction": self.held_out_fraction,
            "sources": list(self.sources),
            "fingerprint": self.fingerprint,
        }

    def split(self, split: str) -> np.ndarray:
        """The bytes of ``split`` ("train" or "held_out")."""
        if split not in _SPLITS:
            raise ValueError(f"{split=} must be one of {_SPLITS}")
        return self.train if split == "train" else self.held_out

    # ------------------------------------------------------------------ batches

    def sample_batch(
        self, key: jax.Array | np.random.Generator, batch_size: int, seq_len: int, split: str = "train",
        packed: bool = False,
    ) -> dict:
        """Random windows: ``inputs = bytes[t:t+L]``, ``targets = bytes[t+1:t+L+1]``, ``weights`` ones.

        ``packed=True`` also returns ``seq_idx`` (int32, (batch_size, seq_len)): the
        number of ``SEPARATOR`` bytes in the window up to each position, so every
        separator starts a new document (it plays the part of a beginning-of-document
        token) and the model (``model(inputs, seq_idx=...)``, the ``Trainer``) lets no
        state cross from one document to the next.

        Starts ``t`` are uniform over every full window, drawn from a
        ``jax.random`` key (deterministic in the key) or a
        ``numpy.random.Generator``. Host-side: returns NumPy arrays
        (int32, int32, float32), each (batch_size, seq_len); call it outside ``jit``.
        """
        data = self.split(split)
        if batch_size < 1:
            raise ValueError(f"{batch_size=} must be positive")
        if not 1 <= seq_len < data.size:
            raise ValueError(f"{seq_len=} must be in [1, {data.size}) for {split=} of {data.size} bytes")
        num_starts = data.size - seq_len  # t in [0, num_starts): t + seq_len + 1 <= size
        if isinstance(key, np.random.Generator):
            starts = key.integers(0, num_starts, size=batch_size)
        else:
            starts = np.asarray(jax.random.randint(key, (batch_size,), 0, num_starts))
        windows = np.lib.stride_tricks.sliding_window_view(data, seq_len + 1)[starts].astype(np.int32)
        batch = {
            "inputs": windows[:, :-1],
            "targets": windows[:, 1:],
            "weights": np.ones((batch_size, seq_len), np.float32),
        }
        if packed:
            batch["seq_idx"] = np.cumsum(batch["inputs"] == SEPARATOR, axis=1, dtype=np.int32)
        return batch

    def eval_batches(
        self, seq_len: int, batch_size: int, split: str = "held_out", max_batches: int | None = None
    ) -> Iterator[dict]:
        """Contiguous, non-overlapping windows over ``split``, in order, every target byte scored once.

        Window ``i`` has ``inputs = bytes[i*L : (i+1)*L]`` and ``targets`` the
        same shifted by one, so the windows together score ``bytes[1:]``
        exactly once. The last window and the last batch are padded to full
        shape with zeros of weight 0 (one shape, one compilation); the sum of
        ``weights`` over all batches is ``len(bytes) - 1``. ``max_batches``
        stops early (then only a prefix is covered).
        """
        data = self.split(split)
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"{seq_len=} and {batch_size=} must be positive")
        if max_batches is not None and max_batches < 0:
            raise ValueError(f"{max_batches=} must be non-negative")
        if data.size < 2:
            raise ValueError(f"{split=} has {data.size} bytes: nothing to score")
        num_targets = data.size - 1
        num_windows = -(-num_targets // seq_len)
        num_batches = -(-num_windows // batch_size)
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        per_batch = batch_size * seq_len
        for i in range(num_batches):
            lo = i * per_batch
            n = min(per_batch, num_targets - lo)
            inputs = np.zeros(per_batch, np.int32)
            targets = np.zeros(per_batch, np.int32)
            weights = np.zeros(per_batch, np.float32)
            inputs[:n] = data[lo : lo + n]
            targets[:n] = data[lo + 1 : lo + n + 1]
            weights[:n] = 1.0
            shape = (batch_size, seq_len)
            yield {k: v.reshape(shape) for k, v in (("inputs", inputs), ("targets", targets), ("weights", weights))}
