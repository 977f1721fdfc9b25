"""Load and save the reference checkpoint formats.

Two layouts are read, told apart by ``config.json``:

* **Hugging Face** (``transformers.MambaForCausalLM``, e.g. ``state-spaces/mamba-130m-hf``):
  ``config.json`` with ``"model_type": "mamba"`` and ``hidden_size``,
  ``num_hidden_layers``, ``state_size``, ``conv_kernel``, ``expand``,
  ``time_step_rank``, ``use_bias``, ``use_conv_bias``, ``layer_norm_epsilon``,
  ``residual_in_fp32``, ``tie_word_embeddings``, ``vocab_size``; weights in
  ``model.safetensors``, sharded ``model-0000x-of-0000y.safetensors`` with
  ``model.safetensors.index.json``, or ``pytorch_model.bin`` (optionally sharded
  with ``pytorch_model.bin.index.json``).
* **Hugging Face Mamba-2** (``transformers.Mamba2ForCausalLM``, e.g. ``mistralai/Mamba-Codestral-7B-v0.1``):
  ``"model_type": "mamba2"`` with ``num_heads``, ``head_dim``, ``n_groups``,
  ``state_size``, ``chunk_size``, ``time_step_limit``, ``time_step_min/max/floor``
  and the keys above (``tie_word_embeddings`` defaults to false, as in
  transformers); ``num_heads * head_dim`` must equal ``expand * hidden_size``.
* **mamba_ssm** (``MambaLMHeadModel.save_pretrained``, e.g. ``state-spaces/mamba-130m``,
  or ``state-spaces/mamba2-130m`` with ``ssm_cfg.layer == "Mamba2"``; hybrids with
  ``attn_layer_idx`` / ``attn_cfg`` (the reference ``MHA`` arguments, ``d_conv`` included, as in
  ``mamba2attn-2.7b``; ``mlp_dim`` and ``softmax_scale`` must keep their defaults) and ``d_intermediate``,
  rounded up to a multiple of 128 as the reference ``GatedMLP`` does):
  ``config.json`` without ``model_type`` and with ``d_model``, ``n_layer``,
  ``vocab_size``, ``ssm_cfg``, ``rms_norm``, ``residual_in_fp32``,
  ``fused_add_norm``, ``pad_vocab_size_multiple``, ``tie_embeddings``; weights in
  ``pytorch_model.bin`` (``model.safetensors`` is accepted too).

Safetensors are read with NumPy only (:mod:`mamba_jax.interop.safetensors_io`);
``pytorch_model.bin`` needs PyTorch (``pip install 'mamba-jax[torch]'`` or
``pip install torch``), and a clear error says so when it is missing.

The pieces live in their own modules: :mod:`mamba_jax.interop.config`
(``config.json``), :mod:`mamba_jax.interop.weights` (weight files),
:mod:`mamba_jax.interop.names` (the name table). This module puts them
together: :func:`from_pretrained` and :func:`save_pretrained`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.interop import safetensors_io
from mamba_jax.interop.config import ConfigExtras, _read_json, detect_layout, hf_config_dict, load_config, read_config_extras
from mamba_jax.interop.names import EMBED_KEYS, check_exportable, convert_state_dict, path_to_key, to_hf_state_dict
from mamba_jax.interop.weights import load_state_dict, remove_foreign_weights
from mamba_jax.model import MambaLM
from mamba_jax.typing import DType

__all__ = ["from_pretrained", "save_pretrained", "load_config", "load_state_dict", "convert_state_dict", "to_hf_state_dict"]


def _abstract_model(config: MambaConfig, dtype: DType, param_dtype: DType) -> MambaLM:
    return nnx.eval_shape(lambda: MambaLM(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def _fill(abstract: MambaLM, params: Mapping[tuple, np.ndarray], param_dtype: DType, mesh=None, rules=None) -> MambaLM:
    """Put ``params`` into the abstract model's variables, checking names and shapes.

    With a ``mesh``, each host array goes straight to its ``NamedSharding``
    (``jax.device_put`` from host memory sends every device only its shard)."""
    graphdef, state = nnx.split(abstract)
    placement = None
    if mesh is not None:
        from mamba_jax import sharding as mjs

        placement = dict(nnx.to_flat_state(mjs.shardings(state, mesh, rules)))
    flat = list(nnx.to_flat_state(state))
    expected = {path for path, _ in flat}
    missing = sorted(expected - set(params), key=str)
    if missing:
        names = [(path_to_key(p) or (".".join(map(str, p)),))[0] for p in missing]
        raise ValueError(f"the checkpoint lacks tensors the model needs: {names}")
    extra = sorted(set(params) - expected, key=str)
    if extra:
        names = [(path_to_key(p) or (".".join(map(str, p)),))[0] for p in extra]
        raise ValueError(f"the checkpoint has tensors this config does not use: {names}")
    new = []
    for path, var in flat:
        want = var.get_value()
        got = params[path]
        if tuple(got.shape) != tuple(want.shape):
            key = path_to_key(path)[0]
            raise ValueError(f"checkpoint key {key!r}: shape {tuple(got.shape)} (after conversion) != expected {tuple(want.shape)}")
        if placement is None:
            value = jnp.asarray(got, dtype=param_dtype)
        else:
            target = placement[path]
            target = getattr(target, "value", target)  # a Variable holding the sharding, or the sharding
            value = jax.device_put(np.asarray(got).astype(jnp.dtype(param_dtype)), target)
        new.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(new))


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: DType | None = None,
    param_dtype: DType = jnp.float32,
    vocab_size: int | None = None,
    pad_vocab_size_multiple: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Mapping[str, str | None] | None = None,
    **config_overrides,
) -> MambaLM:
    """A :class:`MambaLM` with the weights of a local Hugging Face or mamba_ssm checkpoint directory.

    Args:
      path: a directory with ``config.json`` and the weights (see the module docstring).
      dtype: compute dtype; ``None`` means ``param_dtype``.
      param_dtype: dtype the parameters are cast to (float32 by default, whatever the file stores).
      vocab_size: the tokenizer's vocabulary size when the embedding is padded beyond it
        (HF layout only, e.g. 50277 for ``state-spaces/mamba-*-hf``); default: the rows.
      pad_vocab_size_multiple: round the vocabulary up to this multiple, appending zero rows.
      mesh: a ``jax.sharding.Mesh`` (:func:`mamba_jax.sharding.make_mesh`): every parameter is
        placed by its logical axes (as :func:`mamba_jax.sharding.shard_model`), sent from
        host memory straight to its ``NamedSharding``, so no device ever holds more than
        its shards and no replicated copy is built on one device. The host process still
        reads the whole checkpoint into host memory first (the files are not read shard
        by shard).
      rules: logical-axis rule overrides for ``mesh``.
      **config_overrides: other :class:`MambaConfig` fields that do not change the weights
        (``scan_impl``, ``residual_in_fp32`` ...).

    The model is built abstractly (``nnx.eval_shape``): no random initialisation is
    allocated; every parameter comes from the file. The fields of a Hugging Face
    ``config.json`` that :class:`MambaConfig` does not hold (``bos_token_id``,
    ``eos_token_id``, ``pad_token_id`` ...) are kept as ``model.hf_config_extras``
    (a :class:`~mamba_jax.interop.config.ConfigExtras`) for :func:`save_pretrained`.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    detect_layout(_read_json(path / "config.json"))  # config errors before reading the weights
    state_dict = load_state_dict(path)
    embed = [state_dict[k] for k in EMBED_KEYS if k in state_dict]
    rows = embed[0].shape[0] if embed else None
    config, _ = load_config(path, vocab_size=vocab_size, pad_vocab_size_multiple=pad_vocab_size_multiple, rows=rows)
    if config_overrides:
        config = config.replace(**config_overrides)
    params = convert_state_dict(state_dict, config)
    dtype = param_dtype if dtype is None else dtype
    model = _fill(_abstract_model(config, dtype, param_dtype), params, param_dtype, mesh, rules)
    model.hf_config_extras = read_config_extras(path)
    return model


def save_pretrained(model: MambaLM, path: str | os.PathLike, *, unpad_vocab: bool = False) -> None:
    """Write ``model`` as a Hugging Face ``MambaForCausalLM`` directory (``config.json`` +
    ``model.safetensors``) that ``transformers.MambaForCausalLM.from_pretrained`` loads;
    a Mamba-2 model (``config.layer == "mamba2"``) as ``Mamba2ForCausalLM``.

    With tied embeddings only ``backbone.embeddings.weight`` is written (transformers
    ties ``lm_head.weight`` to it). ``unpad_vocab=True`` writes ``config.vocab_size``
    rows instead of ``config.padded_vocab_size``. Parameters keep their dtype.

    The token ids and other fields kept from :func:`from_pretrained`
    (``model.hf_config_extras``) are written back; a model made here gets
    transformers' defaults (``bos/eos/pad_token_id`` 0). The directory may already
    hold a checkpoint: its other weight files (an index and its shards,
    ``pytorch_model.bin``), which would otherwise be loaded instead of the new
    ``model.safetensors``, are removed, with a warning naming them. Other files
    (tokenizer, README) stay.
    """
    if not isinstance(model, MambaLM):
        raise TypeError(f"save_pretrained expects a MambaLM, got {type(model).__name__}")
    check_exportable(model.config)
    extras = getattr(model, "hf_config_extras", None)
    if extras is not None and not isinstance(extras, ConfigExtras):
        raise TypeError(f"model.hf_config_extras must be a ConfigExtras, got {type(extras).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model, unpad_vocab=unpad_vocab)
    dtypes = {str(v.dtype) for v in tensors.values()}
    dtype_name = dtypes.pop() if len(dtypes) == 1 else "float32"
    rows = tensors["backbone.embeddings.weight"].shape[0]
    remove_foreign_weights(path, keep="model.safetensors")
    safetensors_io.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = hf_config_dict(model.config, vocab_size=rows, dtype_name=dtype_name, extras=extras)
    with open(path / "config.json", "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")

