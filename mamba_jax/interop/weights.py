"""Weight files of a checkpoint directory: reading them, and clearing stale ones before a save.

Read: ``model.safetensors``, sharded ``model-0000x-of-0000y.safetensors`` with
``model.safetensors.index.json``, ``pytorch_model.bin`` (optionally sharded with
``pytorch_model.bin.index.json``); an index wins over a single file, as in
``transformers``. Safetensors are read with NumPy only
(:mod:`mamba_jax.interop.safetensors_io`); ``pytorch_model.bin`` needs PyTorch,
and a clear error says so when it is missing.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mamba_jax.interop import safetensors_io
from mamba_jax.interop.config import _need, _read_json

__all__ = ["load_state_dict", "weight_files", "remove_foreign_weights", "TORCH_EXTRA_HINT"]

TORCH_EXTRA_HINT = (
    "reading pytorch_model.bin needs PyTorch, which is not installed: install the optional extra "
    "with `pip install 'mamba-jax[torch]'` (or `pip install torch`; on CPU `pip install torch==2.13.0`), "
    "or convert the checkpoint to model.safetensors"
)


def _load_torch_file(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path.name}: {TORCH_EXTRA_HINT}") from None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(sd).__name__}")
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping) and len(sd) <= 3:
        raise ValueError(f"{path}: holds a training checkpoint with a nested 'state_dict'; save the model's state dict")
    out = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            out[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[name] = t.numpy()
    return out


def weight_files(directory: Path) -> list[Path]:
    """The weight files the directory's checkpoint consists of (what both loaders read)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.exists():
            weight_map = _need(_read_json(index), "weight_map", index_name)
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (directory / f).exists()]
            if missing:
                raise FileNotFoundError(f"{index_name} names shard files that are missing: {missing}")
            return [directory / f for f in files]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).exists():
            return [directory / name]
    raise FileNotFoundError(
        f"{directory} has no weights: expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


def load_state_dict(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory, by its checkpoint name, as NumPy arrays."""
    out: dict[str, np.ndarray] = {}
    for f in weight_files(Path(directory)):
        part = safetensors_io.load_file(f) if f.suffix == ".safetensors" else _load_torch_file(f)
        for k, v in part.items():
            if k in out:
                raise ValueError(f"tensor {k!r} appears in more than one weight file ({f.name})")
            out[k] = v
    return out



_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SHARD_RE = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")


def remove_foreign_weights(directory: str | os.PathLike, keep: str = "model.safetensors") -> list[str]:
    """Delete the weight files of ``directory`` other than ``keep`` and return their names.

    These are the index files, the shards they name (and any file named like a
    shard) and ``pytorch_model.bin``: left in place, an index would make
    ``from_pretrained`` and ``transformers`` read the old weights instead of
    ``keep``. Nothing else (tokenizer files, READMEs) is touched, nor anything an
    index names outside the directory.
    """
    directory = Path(directory)
    doomed: set[str] = set()
    for index_name in _INDEX_NAMES:
        index = directory / index_name
        if not index.exists():
            continue
        doomed.add(index_name)
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (json.JSONDecodeError, AttributeError):
            weight_map = {}
        for name in set(weight_map.values()) if isinstance(weight_map, Mapping) else ():
            if isinstance(name, str) and Path(name).name == name and (directory / name).is_file():
                doomed.add(name)
    for p in directory.iterdir():
        if p.is_file() and (_SHARD_RE.match(p.name) or p.name == "pytorch_model.bin"):
            doomed.add(p.name)
    doomed.discard(keep)
    for name in sorted(doomed):
        (directory / name).unlink()
    if doomed:
        warnings.warn(
            f"save_pretrained removed the weight files of the checkpoint previously in {directory}: {sorted(doomed)}",
            stacklevel=3,
        )
    return sorted(doomed)
