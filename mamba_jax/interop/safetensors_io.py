"""Read and write ``.safetensors`` files with NumPy only (no PyTorch).

The format (https://github.com/huggingface/safetensors) is an 8-byte
little-endian header length, a JSON header ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}`` and the raw
little-endian tensor bytes. It is implemented here rather than taken from
``safetensors.numpy`` because NumPy has no bfloat16: that module cannot read
or write the ``BF16`` tensors most released checkpoints use. ``ml_dtypes``
(a JAX dependency) provides the bfloat16 dtype. Files are memory-mapped, so
reading one tensor of a large file does not read the others.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """(tensor entries, ``__metadata__``, byte offset of the data) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: safetensors header length {n} is implausible (corrupted file?)")
        text = f.read(n)
    if len(text) != n:
        raise ValueError(f"{path}: truncated safetensors header ({len(text)} of {n} bytes)")
    header = json.loads(text)
    meta = header.pop("__metadata__", {}) or {}
    return header, meta, 8 + n


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file, as read-only memory-mapped NumPy arrays."""
    header, _, start = read_header(path)
    size = os.path.getsize(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros((0,), np.uint8)
    out = {}
    for name, entry in header.items():
        dtype = entry.get("dtype")
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        dt = _DTYPES[dtype]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if end - begin != nbytes or start + end > size:
            raise ValueError(
                f"{path}: tensor {name!r} {dtype}{list(shape)} needs {nbytes} bytes at [{begin}, {end}) "
                f"but the file has {size - start} data bytes (truncated or corrupted file?)"
            )
        out[name] = mm[start + begin : start + end].view(dt).reshape(shape)
    return out


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None):
    """Write ``tensors`` (C-contiguous copies are made as needed) to ``path`` atomically."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype.newbyteorder("<") not in _NAMES and a.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has dtype {a.dtype} that safetensors cannot store")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False) if a.dtype.byteorder == ">" else a
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)
