"""The one name table between checkpoint keys and :class:`MambaLM` parameters.

Name table (``{i}`` is the layer index; "T" = transposed, torch ``Linear.weight``
is (out, in), Flax ``Linear.kernel`` is (in, out)):

==========================================  ==========================================  ==========
checkpoint key                              MambaLM parameter                           layout
==========================================  ==========================================  ==========
backbone.embeddings.weight (HF)             embedding.embedding                         (v, e)
backbone.embedding.weight (mamba_ssm)       embedding.embedding                         (v, e)
backbone.layers.{i}.norm.weight             layers.{i}.norm.weight                      (e,)
backbone.layers.{i}.mixer.in_proj.weight    layers.{i}.mixer.in_proj.kernel             T (2d, e)
backbone.layers.{i}.mixer.in_proj.bias      layers.{i}.mixer.in_proj.bias               (2d,)
backbone.layers.{i}.mixer.conv1d.weight     layers.{i}.mixer.conv1d.kernel              (d, 1, k) -> (k, d)
backbone.layers.{i}.mixer.conv1d.bias       layers.{i}.mixer.conv1d.bias                (d,)
backbone.layers.{i}.mixer.x_proj.weight     layers.{i}.mixer.x_proj.kernel              T (r+2n, d)
backbone.layers.{i}.mixer.dt_proj.weight    layers.{i}.mixer.dt_proj.kernel             T (d, r)
backbone.layers.{i}.mixer.dt_proj.bias      layers.{i}.mixer.dt_proj.bias               (d,)
backbone.layers.{i}.mixer.A_log             layers.{i}.mixer.A_log                      (d, n)
backbone.layers.{i}.mixer.D                 layers.{i}.mixer.D                          (d,)
backbone.layers.{i}.mixer.out_proj.weight   layers.{i}.mixer.out_proj.kernel            T (e, d)
backbone.layers.{i}.mixer.out_proj.bias     layers.{i}.mixer.out_proj.bias              (e,)
backbone.layers.{i}.mixer.dt_bias           layers.{i}.mixer.dt_bias (Mamba-2)          (h,)
backbone.layers.{i}.mixer.norm.weight       layers.{i}.mixer.norm.weight (Mamba-2)      (d_ssm,)
backbone.norm_f.weight                      norm_f.weight                               (e,)
lm_head.weight                              lm_head.kernel (untied only)                T (v, e)
==========================================  ==========================================  ==========

With tied embeddings a checkpoint may still carry ``lm_head.weight`` (PyTorch
``state_dict`` files do); it must then equal the embedding, and is not loaded
twice. Any other key, a missing key or a wrong shape is an error naming it.

The hybrid blocks of mamba_ssm's ``MixerModel`` add ``backbone.layers.{i}.norm2.weight``
and ``mlp.fc1.weight`` / ``mlp.fc2.weight`` (T, the gated MLP); an attention layer's
``mixer.in_proj`` (fused q/k/v) and ``mixer.out_proj`` (weights and biases) use the
mixer rows above.

Mamba-2 (``Mamba2ForCausalLM``, mamba_ssm ``Mamba2``) uses the same keys with
its own shapes: ``in_proj`` (2 d_mlp + 2 d_ssm + 2 g n + h, e), ``conv1d``
over ``xBC`` (d_ssm + 2 g n, 1, k), ``A_log`` (h,), ``D`` (h,) or (d_ssm,),
``dt_bias`` (h,), the gated norm ``norm.weight`` (d_ssm,), ``out_proj`` (e, d).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx

from mamba_jax.config import MambaConfig

__all__ = ["convert_state_dict", "to_hf_state_dict", "check_exportable", "key_to_path", "path_to_key", "EMBED_KEYS"]

def _t(x):
    return np.swapaxes(x, 0, 1)


def _conv_in(x):  # torch (d, 1, k) -> ours (k, d)
    if x.ndim != 3 or x.shape[1] != 1:
        raise ValueError(f"expected a depthwise conv weight of shape (d, 1, k), got {x.shape}")
    return np.transpose(x[:, 0, :])


def _conv_out(x):  # ours (k, d) -> torch (d, 1, k)
    return np.transpose(x)[:, None, :]


_IDENT: Callable = lambda x: x
# (checkpoint key template, our parameter path, to ours, to checkpoint)
_LAYER_TABLE = [
    ("norm.weight", ("norm", "weight"), _IDENT, _IDENT),
    ("mixer.in_proj.weight", ("mixer", "in_proj", "kernel"), _t, _t),
    ("mixer.in_proj.bias", ("mixer", "in_proj", "bias"), _IDENT, _IDENT),
    ("mixer.conv1d.weight", ("mixer", "conv1d", "kernel"), _conv_in, _conv_out),
    ("mixer.conv1d.bias", ("mixer", "conv1d", "bias"), _IDENT, _IDENT),
    ("mixer.x_proj.weight", ("mixer", "x_proj", "kernel"), _t, _t),
    ("mixer.dt_proj.weight", ("mixer", "dt_proj", "kernel"), _t, _t),
    ("mixer.dt_proj.bias", ("mixer", "dt_proj", "bias"), _IDENT, _IDENT),
    ("mixer.A_log", ("mixer", "A_log"), _IDENT, _IDENT),
    ("mixer.D", ("mixer", "D"), _IDENT, _IDENT),
    ("mixer.dt_bias", ("mixer", "dt_bias"), _IDENT, _IDENT),
    ("mixer.norm.weight", ("mixer", "norm", "weight"), _IDENT, _IDENT),
    ("mixer.out_proj.weight", ("mixer", "out_proj", "kernel"), _t, _t),
    ("mixer.out_proj.bias", ("mixer", "out_proj", "bias"), _IDENT, _IDENT),
    ("norm2.weight", ("norm2", "weight"), _IDENT, _IDENT),
    ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), _t, _t),
    ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), _t, _t),
]
_GLOBAL_TABLE = [
    ("backbone.embeddings.weight", ("embedding", "embedding"), _IDENT, _IDENT),
    ("backbone.norm_f.weight", ("norm_f", "weight"), _IDENT, _IDENT),
    ("lm_head.weight", ("lm_head", "kernel"), _t, _t),
]
EMBED_KEYS = ("backbone.embeddings.weight", "backbone.embedding.weight")
_LAYER_RE = re.compile(r"backbone\.layers\.(\d+)\.(.+)")


def key_to_path(key: str):
    """(our path, to-ours function) for a checkpoint key, or None if the key is unknown."""
    if key in EMBED_KEYS:
        return ("embedding", "embedding"), _IDENT
    for ck, path, fin, _ in _GLOBAL_TABLE:
        if key == ck:
            return path, fin
    m = _LAYER_RE.fullmatch(key)
    if m:
        for ck, path, fin, _ in _LAYER_TABLE:
            if m.group(2) == ck:
                return ("layers", int(m.group(1))) + path, fin
    return None


def path_to_key(path: tuple, embed_key: str = "backbone.embeddings.weight"):
    if path == ("embedding", "embedding"):
        return embed_key, _IDENT
    for ck, p, _, fout in _GLOBAL_TABLE:
        if path == p:
            return ck, fout
    if len(path) >= 3 and path[0] == "layers":
        for ck, p, _, fout in _LAYER_TABLE:
            if path[2:] == p:
                return f"backbone.layers.{path[1]}.{ck}", fout
    return None


def _pad_vocab(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return np.pad(x, pad)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], config: MambaConfig) -> dict[tuple, np.ndarray]:
    """Checkpoint tensors -> ``{parameter path: array}`` in MambaLM layout (see the name table).

    Raises on an unknown key, a key given twice (``embedding``/``embeddings``), a
    key the model needs that is missing, or a shape that does not match.
    """
    embed_keys = [k for k in EMBED_KEYS if k in state_dict]
    if len(embed_keys) > 1:
        raise ValueError(f"the checkpoint has both {embed_keys[0]!r} and {embed_keys[1]!r}")
    out: dict[tuple, np.ndarray] = {}
    for key, value in state_dict.items():
        if key == "lm_head.weight" and config.tie_embeddings:
            if embed_keys and not np.array_equal(np.asarray(value), np.asarray(state_dict[embed_keys[0]])):
                raise ValueError(
                    "lm_head.weight differs from the embedding but the config ties them "
                    "(tie_word_embeddings / tie_embeddings is true)"
                )
            continue
        hit = key_to_path(key)
        if hit is None:
            raise ValueError(f"unknown checkpoint key {key!r} (not in the Mamba-1 / Mamba-2 name table)")
        path, fin = hit
        try:
            out[path] = fin(np.asarray(value))
        except ValueError as e:
            raise ValueError(f"checkpoint key {key!r}: {e}") from None
    v = config.padded_vocab_size
    if ("embedding", "embedding") in out:
        out[("embedding", "embedding")] = _pad_vocab(out[("embedding", "embedding")], 0, v)
    if ("lm_head", "kernel") in out:
        out[("lm_head", "kernel")] = _pad_vocab(out[("lm_head", "kernel")], 1, v)
    return out


def check_exportable(config: MambaConfig) -> None:
    if config.is_mamba2:
        unsupported = {
            "d_ssm": (config.d_ssm is not None and config.d_ssm != config.d_inner, "d_ssm < d_inner (an MLP branch)"),
            "D_has_hdim": (config.D_has_hdim, "D per channel"),
            "norm_before_gate": (config.norm_before_gate, "norm(y) * silu(z)"),
        }
        for name, (bad, what) in unsupported.items():
            if bad:
                raise ValueError(
                    f"config.{name}={getattr(config, name)!r} ({what}) has no Hugging Face Mamba2ForCausalLM "
                    "equivalent; save the parameters with mamba_jax.checkpoint.CheckpointManager instead"
                )
    if not config.selective:
        raise ValueError("config.selective=False (the LTI ablation) has no Hugging Face equivalent")
    if config.attn_layer_idx:
        raise ValueError(
            f"config.attn_layer_idx={config.attn_layer_idx} (attention layers) cannot be saved in the Hugging Face "
            "MambaForCausalLM format, which has Mamba layers only; save the parameters with mamba_jax.checkpoint.CheckpointManager instead"
        )
    if config.d_intermediate > 0:
        raise ValueError(
            f"config.d_intermediate={config.d_intermediate} (MLP blocks) cannot be saved in the Hugging Face "
            "MambaForCausalLM format, which has Mamba layers only; save the parameters with mamba_jax.checkpoint.CheckpointManager instead"
        )


def to_hf_state_dict(model, *, unpad_vocab: bool = False) -> dict[str, np.ndarray]:
    """The model's parameters under their ``transformers`` names, in torch layout (NumPy, host)."""
    config = model.config
    check_exportable(config)
    rows = config.vocab_size if unpad_vocab else config.padded_vocab_size
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        hit = path_to_key(path)
        if hit is None:
            raise ValueError(f"parameter {'.'.join(map(str, path))} has no checkpoint name")
        key, fout = hit
        value = np.asarray(jax.device_get(var.get_value()))
        if key == "backbone.embeddings.weight":
            value = value[:rows]
        elif key == "lm_head.weight":
            value = value[:, :rows]
        out[key] = np.ascontiguousarray(fout(value))
    return out

