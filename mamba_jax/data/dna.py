"""Real DNA without a dataset hub: bacterial genomes from Debian packages.

``kleborate-examples`` ships four complete *Klebsiella pneumoniae* assemblies
(``/usr/share/doc/kleborate/examples/data/*.fna.xz``: each a ~5.3 M base
chromosome plus its plasmids), and ``kaptive-data`` ~11 M bases of capsule and
O-antigen loci (1-40 kb each, GenBank files under
``/usr/share/kaptive/reference_database``). :func:`fetch_packages` gets them
without root and without touching the system: ``apt-get download`` into a
cache directory, then ``dpkg-deb -x`` there.

Tokens: ``A C G T N`` are 0-4 (:data:`BASES`); lower case is folded to upper
case; every other IUPAC letter (R, Y, K, M, S, W, B, D, H, V) becomes ``N``,
and :meth:`DnaCorpus.describe` counts how many did. Records (one chromosome,
plasmid or locus each) are kept apart: a training window never spans two.

The split is by assembly: one whole genome (all its records) is held out for
evaluation, the others train. Kaptive loci, when included, are training
records only; they are shorter than most contexts, and a window is drawn only
from records at least ``seq_len + 1`` bases long, so they take part only at
contexts shorter than themselves. Host-side NumPy: sample outside ``jit``.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import lzma
import os
import pathlib
import shutil
import subprocess
from collections.abc import Iterator

import numpy as np

BASES = "ACGTN"
VOCAB_SIZE = len(BASES)
N_TOKEN = BASES.index("N")
IUPAC_AMBIGUOUS = "RYKMSWBDHV"
KLEBORATE_PACKAGE = "kleborate-examples"
KAPTIVE_PACKAGE = "kaptive-data"
KLEBORATE_DIR = "usr/share/doc/kleborate/examples/data"
KAPTIVE_DIR = "usr/share/kaptive/reference_database"
DEFAULT_CACHE = pathlib.Path(os.environ.get("MAMBA_JAX_DNA_CACHE", pathlib.Path.home() / ".cache" / "mamba_jax" / "dna"))
DEFAULT_HELD_OUT = "NTUH-K2044"

_TABLE = np.full(256, 255, np.uint8)  # 255: not a nucleotide letter
for _i, _b in enumerate(BASES):
    _TABLE[ord(_b)] = _TABLE[ord(_b.lower())] = _i
for _b in IUPAC_AMBIGUOUS:
    _TABLE[ord(_b)] = _TABLE[ord(_b.lower())] = N_TOKEN


def encode(sequence: bytes | str) -> tuple[np.ndarray, int]:
    """``(tokens, ambiguous)``: uint8 tokens 0-4 for a nucleotide string, and how many
    IUPAC ambiguity letters (other than N) became N. Whitespace and digits are dropped
    (GenBank's ORIGIN layout); any other character is a ValueError naming it."""
    raw = np.frombuffer(sequence.encode() if isinstance(sequence, str) else sequence, np.uint8)
    raw = raw[~np.isin(raw, np.frombuffer(b" \t\r\n0123456789", np.uint8))]
    tokens = _TABLE[raw]
    bad = tokens == 255
    if bad.any():
        chars = sorted({chr(c) for c in raw[bad][:1000]})
        raise ValueError(f"not a nucleotide letter: {chars} (allowed: {BASES} and IUPAC {IUPAC_AMBIGUOUS})")
    upper = raw & 0xDF  # ASCII upper case
    ambiguous = int(np.isin(upper, np.frombuffer(IUPAC_AMBIGUOUS.encode(), np.uint8)).sum())
    return tokens, ambiguous


def decode(tokens: np.ndarray) -> str:
    """The letters of ``tokens`` (0-4)."""
    return np.frombuffer(BASES.encode(), np.uint8)[np.asarray(tokens)].tobytes().decode()


def _read_bytes(path: pathlib.Path) -> bytes:
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes())
    return path.read_bytes()


def read_fasta(path: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """``(header, sequence)`` per record of a FASTA file (plain, ``.gz`` or ``.xz``); the
    header without ``>``, the sequence with its line breaks removed."""
    path = pathlib.Path(path)
    text = _read_bytes(path)
    if not text.lstrip().startswith(b">"):
        raise ValueError(f"{path} is not FASTA: it does not start with '>'")
    for chunk in text.split(b"\n>"):
        header, _, body = chunk.lstrip(b">").partition(b"\n")
        yield header.decode().strip(), body.replace(b"\n", b"").replace(b"\r", b"")


def read_genbank(path: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """``(locus name, sequence)`` per record of a GenBank flat file: the ``ORIGIN`` block
    of each ``LOCUS ... //`` record (numbers and spaces left in; :func:`encode` drops them)."""
    path = pathlib.Path(path)
    name, seq, in_origin = None, [], False
    for line in _read_bytes(path).splitlines():
        if line.startswith(b"LOCUS"):
            name, seq, in_origin = line.split()[1].decode(), [], False
        elif line.startswith(b"ORIGIN"):
            in_origin = True
        elif line.startswith(b"//"):
            if name is None:
                raise ValueError(f"{path}: a record ends ('//') before any LOCUS line")
            yield name, b"".join(seq)
            name, seq, in_origin = None, [], False
        elif in_origin:
            seq.append(line)


def fetch_packages(cache_dir: str | os.PathLike = DEFAULT_CACHE,
                   packages: tuple[str, ...] = (KLEBORATE_PACKAGE, KAPTIVE_PACKAGE)) -> pathlib.Path:
    """``apt-get download`` each package into ``cache_dir`` and ``dpkg-deb -x`` it into
    ``cache_dir/root``; returns that root. Already extracted packages are not fetched again
    (a ``.<package>.done`` marker). Needs neither root nor network once cached. A failure
    is a RuntimeError naming the package, the command and its output."""
    cache = pathlib.Path(cache_dir)
    root = cache / "root"
    root.mkdir(parents=True, exist_ok=True)
    for package in packages:
        marker = cache / f".{package}.done"
        if marker.exists():
            continue
        for tool in ("apt-get", "dpkg-deb"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not on PATH: cannot fetch Debian package {package!r} "
                                   f"(on a non-Debian system, extract {package}'s .deb into {root} by hand)")
        debs_before = set(cache.glob(f"{package}_*.deb"))
        _run(["apt-get", "download", package], cache, package)
        debs = sorted(set(cache.glob(f"{package}_*.deb")) | debs_before)
        if not debs:
            raise RuntimeError(f"apt-get download {package} (in {cache}) left no {package}_*.deb")
        _run(["dpkg-deb", "-x", str(debs[-1]), str(root)], cache, package)
        marker.write_text(debs[-1].name + "\n")
    return root


def _run(cmd: list[str], cwd: pathlib.Path, package: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"fetching Debian package {package!r}: `{' '.join(cmd)}` failed: {e}") from e
    if proc.returncode != 0:
        raise RuntimeError(f"fetching Debian package {package!r}: `{' '.join(cmd)}` exited with "
                           f"{proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


@dataclasses.dataclass(frozen=True, eq=False)
class DnaCorpus:
    """Genomes as token records, split by assembly, with window and evaluation batches.

    Attributes:
      train: training records (uint8 tokens 0-4), one per chromosome, plasmid or locus.
      held_out: the held-out assembly's records, same format.
      train_names: ``"<assembly>/<record id>"`` of each training record.
      held_out_names: the same for the held-out records.
      sources: what was read, one JSON-ready dict per file (path, records, bases, split,
        ambiguous letters mapped to N).
    """

    train: tuple[np.ndarray, ...]
    held_out: tuple[np.ndarray, ...]
    train_names: tuple[str, ...]
    held_out_names: tuple[str, ...]
    sources: tuple[dict, ...]

    vocab_size = VOCAB_SIZE

    @classmethod
    def from_packages(cls, cache_dir: str | os.PathLike = DEFAULT_CACHE, held_out: str = DEFAULT_HELD_OUT,
                      include_kaptive: bool = False) -> DnaCorpus:
        """The kleborate-examples genomes (``held_out`` names the assembly held out, by file
        stem), plus kaptive-data's loci as training records when ``include_kaptive``."""
        root = fetch_packages(cache_dir, (KLEBORATE_PACKAGE, KAPTIVE_PACKAGE) if include_kaptive
                              else (KLEBORATE_PACKAGE,))
        genomes = sorted((root / KLEBORATE_DIR).glob("*.fna*"))
        if not genomes:
            raise RuntimeError(f"{KLEBORATE_PACKAGE}: no *.fna* under {root / KLEBORATE_DIR}")
        loci = sorted((root / KAPTIVE_DIR).glob("*.gbk")) if include_kaptive else []
        return cls.from_files(genomes, held_out=held_out, loci=loci)

    @classmethod
    def from_files(cls, genomes, held_out: str, loci=()) -> DnaCorpus:
        """Assemblies from FASTA files (the one whose stem, before ``.fna``/``.fa``, equals
        ``held_out`` is held out) and training loci from GenBank files."""
        parts = {"train": ([], []), "held_out": ([], [])}
        sources = []
        stems = [pathlib.Path(p).name.split(".")[0] for p in genomes]
        if held_out not in stems:
            raise ValueError(f"{held_out=} is not one of the assemblies {stems}")
        for path, stem in zip(genomes, stems):
            split = "held_out" if stem == held_out else "train"
            sources.append(cls._add(parts[split], read_fasta(path), stem, path, split))
        for path in loci:
            sources.append(cls._add(parts["train"], read_genbank(path), pathlib.Path(path).stem, path, "train"))
        if not parts["train"][0]:
            raise ValueError("no training records: every assembly is held out")
        return cls(train=tuple(parts["train"][0]), held_out=tuple(parts["held_out"][0]),
                   train_names=tuple(parts["train"][1]), held_out_names=tuple(parts["held_out"][1]),
                   sources=tuple(sources))

    @staticmethod
    def _add(part, records, stem: str, path, split: str) -> dict:
        n_records = n_bases = n_ambiguous = 0
        for header, seq in records:
            tokens, ambiguous = encode(seq)
            if tokens.size == 0:
                continue
            part[0].append(tokens)
            part[1].append(f"{stem}/{header.split()[0]}")
            n_records, n_bases, n_ambiguous = n_records + 1, n_bases + tokens.size, n_ambiguous + ambiguous
        return {"path": str(path), "split": split, "records": n_records, "bases": n_bases,
                "ambiguous_to_n": n_ambiguous}

    # ------------------------------------------------------------------ facts

    def split(self, split: str) -> tuple[np.ndarray, ...]:
        if split not in ("train", "held_out"):
            raise ValueError(f"{split=} must be 'train' or 'held_out'")
        return self.train if split == "train" else self.held_out

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 of every record of both splits with its name: equal means equal data."""
        h = hashlib.sha256()
        for names, recs in ((self.train_names, self.train), (self.held_out_names, self.held_out)):
            for name, r in zip(names, recs):
                h.update(name.encode() + b"\0" + r.size.to_bytes(8, "little"))
                h.update(r.tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        """A JSON-ready record of the corpus for experiment results."""
        return {
            "vocab": BASES, "iupac_to_n": IUPAC_AMBIGUOUS,
            "train_bases": int(sum(r.size for r in self.train)),
            "held_out_bases": int(sum(r.size for r in self.held_out)),
            "train_records": len(self.train), "held_out_records": list(self.held_out_names),
            "longest_train_record": int(max(r.size for r in self.train)),
            "sources": list(self.sources), "fingerprint": self.fingerprint,
        }

    # ------------------------------------------------------------------ batches

    def sample_batch(self, rng: np.random.Generator, batch_size: int, seq_len: int, split: str = "train") -> dict:
        """Random windows inside single records: ``inputs = rec[t:t+L]``, ``targets = rec[t+1:t+L+1]``.

        A start is uniform over every full window of every record long enough
        (``>= seq_len + 1`` bases), so records weigh by their number of windows.
        Deterministic in ``rng`` (pass ``np.random.default_rng([seed, step])``).
        Returns int32 inputs/targets and float32 weights (ones), each (batch_size, seq_len).
        """
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"{batch_size=} and {seq_len=} must be positive")
        records = self.split(split)
        starts_per = np.array([max(r.size - seq_len, 0) for r in records], np.int64)
        total = int(starts_per.sum())
        if total == 0:
            raise ValueError(f"{seq_len=} is longer than every {split} record "
                             f"(longest {max(r.size for r in records)} bases)")
        flat = rng.integers(0, total, size=batch_size)
        bounds = np.cumsum(starts_per)
        which = np.searchsorted(bounds, flat, side="right")
        offsets = flat - (bounds[which] - starts_per[which])
        windows = np.stack([records[w][o : o + seq_len + 1] for w, o in zip(which, offsets)]).astype(np.int32)
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:],
                "weights": np.ones((batch_size, seq_len), np.float32)}

    def eval_batches(self, seq_len: int, batch_size: int, num_targets: int, split: str = "held_out") -> list[dict]:
        """The first ``num_targets`` targets of the longest ``split`` record (its chromosome),
        scored once each by contiguous non-overlapping windows of ``seq_len``; the same bases
        at every context length when ``num_targets`` is a multiple of each ``seq_len``."""
        if num_targets % seq_len:
            raise ValueError(f"{num_targets=} must be a multiple of {seq_len=}")
        record = max(self.split(split), key=lambda r: r.size)
        if num_targets + 1 > record.size:
            raise ValueError(f"{num_targets=} exceeds the held-out record's {record.size - 1} targets")
        windows = num_targets // seq_len
        if windows % batch_size:
            raise ValueError(f"{num_targets=} / {seq_len=} = {windows} windows, not a multiple of {batch_size=}")
        inputs = record[:num_targets].astype(np.int32).reshape(windows, seq_len)
        targets = record[1 : num_targets + 1].astype(np.int32).reshape(windows, seq_len)
        return [{"inputs": inputs[i : i + batch_size], "targets": targets[i : i + batch_size],
                 "weights": np.ones((batch_size, seq_len), np.float32)} for i in range(0, windows, batch_size)]
