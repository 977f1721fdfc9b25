"""``config.json`` of the reference checkpoint layouts -> :class:`MambaConfig`, and back.

The two layouts and the keys read are described in :mod:`mamba_jax.interop.hf`.
Values are checked, not coerced: a boolean must be a JSON boolean (``"false"``
is an error, not ``True``), a number a JSON number. Keys of a Hugging Face
config that :class:`MambaConfig` does not hold (token ids, init and generation
settings, anything unknown) are kept in a :class:`ConfigExtras` that
``from_pretrained`` attaches to the model and ``save_pretrained`` writes back.

Vocabulary padding. ``MambaLM`` has ``config.padded_vocab_size`` embedding
rows (``vocab_size`` rounded up to ``pad_vocab_size_multiple``); the mamba_ssm
layout stores exactly that (config ``vocab_size`` 50277, 50280 rows). In the
HF layout ``vocab_size`` is normally the number of rows (50280 for
``state-spaces/mamba-130m-hf``, whose tokenizer has 50277 tokens): the true
vocabulary is not recorded. ``from_pretrained`` therefore keeps
``vocab_size`` = the number of rows unless you pass ``vocab_size=`` (the
tokenizer's size). An HF config whose ``vocab_size`` is the unpadded size
(fewer than the rows) is accepted when its ``pad_vocab_size_multiple`` rounds
it up to exactly the rows; any other disagreement is an error. It then picks ``pad_vocab_size_multiple`` so that no row is
added or dropped (8 where the size allows, else 1). Passing
``pad_vocab_size_multiple=`` (e.g. 128 for TPU-friendly shapes) appends zero
rows (zero columns of an untied ``lm_head``); logits of ids ``>= vocab_size``
are masked by :func:`mamba_jax.generate` and should be sliced off for
perplexity. ``save_pretrained`` writes all ``padded_vocab_size`` rows with
``vocab_size`` = that number (as the ``-hf`` checkpoints do), or only the first
``config.vocab_size`` rows with ``unpad_vocab=True``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from mamba_jax.config import MambaConfig

__all__ = ["load_config", "detect_layout", "hf_config_dict", "ConfigExtras", "read_config_extras"]

# HF config keys that do not change the forward pass (metadata, init-only or
# kernel-selection settings). They are read and ignored on purpose.
_HF_IGNORED = {
    "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype",
    "transformers_version", "_name_or_path", "initializer_range", "rescale_prenorm_residual",
    "use_cache", "use_mambapy", "use_associative_scan", "fused_add_norm", "pad_vocab_size_multiple",
    "layer_types", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "add_cross_attention", "tie_encoder_decoder", "id2label", "label2id", "problem_type",
    "tokenizer_class", "finetuning_task", "task_specific_params", "prefix", "sep_token_id",
    "decoder_start_token_id", "cross_attention_hidden_size", "max_length", "bad_words_ids",
    "begin_suppress_tokens", "chunk_size", "model_max_length",
}
_MAMBA_SSM_TOP = {
    "d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm",
    "pad_vocab_size_multiple", "tie_embeddings", "d_intermediate", "attn_layer_idx", "attn_cfg",
}
_MAMBA_SSM_SSM = {
    "d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor",
    "conv_bias", "bias", "use_fast_path", "layer",
}



# --------------------------------------------------------------------------- config


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: a checkpoint directory needs a config.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def detect_layout(raw: Mapping) -> str:
    """``"hf"`` or ``"mamba_ssm"`` from the contents of ``config.json`` (``"hf"`` for both
    ``model_type`` ``"mamba"`` and ``"mamba2"``)."""
    if "model_type" in raw:
        if raw["model_type"] not in ("mamba", "mamba2"):
            raise ValueError(
                f"config.json model_type={raw['model_type']!r} is not supported: only Mamba-1 "
                "('mamba', transformers.MambaForCausalLM) and Mamba-2 ('mamba2', "
                "transformers.Mamba2ForCausalLM) checkpoints load into MambaLM"
            )
        return "hf"
    if "d_model" in raw:
        return "mamba_ssm"
    raise ValueError(
        "config.json has neither 'model_type' (Hugging Face layout) nor 'd_model' (mamba_ssm layout); "
        f"its keys are {sorted(raw)}"
    )


def _need(raw: Mapping, key: str, where: str = "config.json"):
    if key not in raw:
        raise ValueError(f"{where} lacks the required key {key!r}")
    return raw[key]


def _check(cond: bool, key: str, value, why: str, where: str = "config.json"):
    if not cond:
        raise ValueError(f"{where}: {key}={value!r} is not supported: {why}")


def _as_int(raw: Mapping, key: str, where: str = "config.json") -> int:
    value = _need(raw, key, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{where}: {key}={value!r} must be an integer")
    return int(value)


def _as_bool(raw: Mapping, key: str, default: bool, where: str = "config.json") -> bool:
    """A JSON boolean; a string such as ``"false"`` is rejected, never coerced (``bool("false")`` is True)."""
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {key}={value!r} must be a JSON boolean (true or false), not {type(value).__name__}")
    return value


def _as_float(raw: Mapping, key: str, default: float, where: str = "config.json") -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {key}={value!r} must be a number, not {type(value).__name__}")
    return float(value)


def _hf_config_fields(raw: Mapping) -> tuple[dict, int]:
    """MambaConfig fields (without the vocabulary padding) and the number of vocabulary rows."""
    unknown = sorted(k for k in raw if k not in _HF_IGNORED and k not in _HF_USED)
    if unknown:
        warnings.warn(f"config.json keys not used by mamba_jax (they are ignored): {unknown}", stacklevel=3)
    act = raw.get("hidden_act", "silu")
    _check(act == "silu", "hidden_act", act, "the Mamba mixer uses SiLU")
    _check(_as_bool(raw, "rms_norm", True), "rms_norm", raw.get("rms_norm"), "only RMSNorm is implemented")
    d_model = _as_int(raw, "hidden_size")
    n_layer = _as_int(raw, "num_hidden_layers")
    if "n_layer" in raw:
        _check(raw["n_layer"] == n_layer, "n_layer", raw["n_layer"], f"differs from num_hidden_layers={n_layer}")
    expand = _as_int(raw, "expand") if "expand" in raw else 2
    if "intermediate_size" in raw:
        _check(
            raw["intermediate_size"] == expand * d_model, "intermediate_size", raw["intermediate_size"],
            f"must equal expand * hidden_size = {expand * d_model}",
        )
    rank = raw.get("time_step_rank", "auto")
    if rank != "auto":
        rank = _as_int(raw, "time_step_rank")
    init = raw.get("time_step_init_scheme", "random")
    _check(init in ("random", "constant"), "time_step_init_scheme", init, "must be 'random' or 'constant'")
    fields = dict(
        d_model=d_model,
        n_layer=n_layer,
        d_state=_as_int(raw, "state_size") if "state_size" in raw else 16,
        d_conv=_as_int(raw, "conv_kernel") if "conv_kernel" in raw else 4,
        expand=expand,
        dt_rank=None if rank == "auto" else rank,
        dt_init=init,
        dt_scale=_as_float(raw, "time_step_scale", 1.0),
        **_hf_shared_fields(raw, tie_default=True),
    )
    return fields, _as_int(raw, "vocab_size")


def _hf_shared_fields(raw: Mapping, *, tie_default: bool) -> dict:
    """The fields that transformers' Mamba and Mamba2 configs spell alike (only the
    default of ``tie_word_embeddings`` differs: True for Mamba, False for Mamba2)."""
    return dict(
        dt_min=_as_float(raw, "time_step_min", 0.001),
        dt_max=_as_float(raw, "time_step_max", 0.1),
        dt_init_floor=_as_float(raw, "time_step_floor", 1e-4),
        conv_bias=_as_bool(raw, "use_conv_bias", True),
        bias=_as_bool(raw, "use_bias", False),
        norm_epsilon=_as_float(raw, "layer_norm_epsilon", 1e-5),
        residual_in_fp32=_as_bool(raw, "residual_in_fp32", True),
        tie_embeddings=_as_bool(raw, "tie_word_embeddings", tie_default),
    )


_HF_USED = {
    "model_type", "hidden_act", "rms_norm", "hidden_size", "num_hidden_layers", "n_layer", "expand",
    "intermediate_size", "time_step_rank", "time_step_init_scheme", "state_size", "conv_kernel",
    "time_step_min", "time_step_max", "time_step_scale", "time_step_floor", "use_conv_bias", "use_bias",
    "layer_norm_epsilon", "residual_in_fp32", "tie_word_embeddings", "vocab_size",
}


# Mamba2Config keys: read (_HF2_USED), or ignored on purpose (_HF2_IGNORED): time_step_rank is
# unused by the Mamba-2 mixer, and transformers' Mamba2 gated norm is always norm(y * silu(z))
# (norm_before_gate=False), whatever an older config.json says.
_HF2_USED = {
    "model_type", "hidden_act", "rms_norm", "hidden_size", "num_hidden_layers", "expand", "intermediate_size",
    "state_size", "conv_kernel", "num_heads", "head_dim", "n_groups", "chunk_size", "time_step_limit",
    "time_step_min", "time_step_max", "time_step_floor", "use_conv_bias", "use_bias", "layer_norm_epsilon",
    "residual_in_fp32", "tie_word_embeddings", "vocab_size",
}
_HF2_IGNORED = {"time_step_rank", "norm_before_gate"}


def _json_float(value):
    """``{"__float__": "Infinity"}`` (how transformers >= 5 writes non-finite floats) -> ``inf``."""
    if isinstance(value, Mapping) and set(value) == {"__float__"}:
        try:
            return float(value["__float__"])  # float("Infinity") == inf
        except (TypeError, ValueError):
            return value
    return value


def _hf2_config_fields(raw: Mapping) -> tuple[dict, int]:
    """MambaConfig fields of a ``transformers.Mamba2Config`` and the number of vocabulary rows."""
    unknown = sorted(k for k in raw if k not in _HF_IGNORED and k not in _HF2_USED and k not in _HF2_IGNORED)
    if unknown:
        warnings.warn(f"config.json keys not used by mamba_jax (they are ignored): {unknown}", stacklevel=3)
    act = raw.get("hidden_act", "silu")
    _check(act == "silu", "hidden_act", act, "the Mamba-2 mixer uses SiLU")
    _check(_as_bool(raw, "rms_norm", True), "rms_norm", raw.get("rms_norm"), "only RMSNorm is implemented")
    d_model = _as_int(raw, "hidden_size")
    expand = _as_int(raw, "expand") if "expand" in raw else 2
    d_inner = expand * d_model
    if "intermediate_size" in raw:
        _check(
            raw["intermediate_size"] == d_inner, "intermediate_size", raw["intermediate_size"],
            f"must equal expand * hidden_size = {d_inner}",
        )
    head_dim = _as_int(raw, "head_dim") if "head_dim" in raw else 64
    num_heads = _as_int(raw, "num_heads") if "num_heads" in raw else 128
    _check(
        num_heads * head_dim == d_inner, "num_heads", num_heads,
        f"num_heads * head_dim = {num_heads * head_dim} must equal expand * hidden_size = {d_inner} "
        "(transformers' Mamba2 has no d_ssm < d_inner)",
    )
    limit = raw.get("time_step_limit", [0.0, float("inf")])
    if isinstance(limit, (list, tuple)):  # transformers >= 5 writes inf as {"__float__": "Infinity"}
        limit = [_json_float(v) for v in limit]
    _check(
        isinstance(limit, (list, tuple)) and len(limit) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in limit),
        "time_step_limit", limit, "must be a pair of numbers [lo, hi]",
    )
    fields = dict(
        layer="mamba2",
        d_model=d_model,
        n_layer=_as_int(raw, "num_hidden_layers"),
        d_state=_as_int(raw, "state_size") if "state_size" in raw else 128,
        d_conv=_as_int(raw, "conv_kernel") if "conv_kernel" in raw else 4,
        expand=expand,
        headdim=head_dim,
        ngroups=_as_int(raw, "n_groups") if "n_groups" in raw else 8,
        chunk_size=_as_int(raw, "chunk_size") if "chunk_size" in raw else 256,
        dt_limit=(float(limit[0]), float(limit[1])),
        **_hf_shared_fields(raw, tie_default=False),
    )
    return fields, _as_int(raw, "vocab_size")


_MAMBA_SSM_SSM2 = {
    "layer", "d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range",
    "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit", "bias",
    "conv_bias", "chunk_size", "use_mem_eff_path",
}


def _mamba2_ssm_cfg_fields(ssm: Mapping) -> dict:
    """MambaConfig fields of a mamba_ssm ``ssm_cfg`` with ``layer == "Mamba2"``."""
    where = "config.json ssm_cfg"
    for key in ssm:
        if key not in _MAMBA_SSM_SSM2:
            raise ValueError(f"{where}: unknown Mamba2 ssm_cfg key {key!r} (known: {sorted(_MAMBA_SSM_SSM2)})")
    _check(_as_bool(ssm, "rmsnorm", True, where), "ssm_cfg.rmsnorm", ssm.get("rmsnorm"),
           "Mamba-2 without the gated RMSNorm is not implemented")
    fields = dict(layer="mamba2")
    for key, default in (("d_state", 128), ("d_conv", 4), ("expand", 2), ("headdim", 64), ("ngroups", 1),
                         ("chunk_size", 256)):
        fields[key] = _as_int(ssm, key, where) if key in ssm else default
    if ssm.get("d_ssm") is not None:
        fields["d_ssm"] = _as_int(ssm, "d_ssm", where)
    for key, default in (("dt_min", 0.001), ("dt_max", 0.1), ("dt_init_floor", 1e-4)):
        fields[key] = _as_float(ssm, key, default, where)
    for key in ("dt_limit", "A_init_range"):
        if key in ssm:
            value = ssm[key]
            _check(isinstance(value, (list, tuple)) and len(value) == 2, f"ssm_cfg.{key}", value,
                   "must be a pair of numbers", "config.json")
            fields[key] = tuple(value)
    fields["D_has_hdim"] = _as_bool(ssm, "D_has_hdim", False, where)
    fields["norm_before_gate"] = _as_bool(ssm, "norm_before_gate", False, where)
    fields["conv_bias"] = _as_bool(ssm, "conv_bias", True, where)
    fields["bias"] = _as_bool(ssm, "bias", False, where)
    return fields  # conv_init and use_mem_eff_path change neither the weights nor the forward


# mamba_ssm MHA arguments (attn_cfg) -> MambaConfig fields, with the reference MHA defaults.
_ATTN_CFG = {
    "num_heads": "attn_num_heads", "num_heads_kv": "attn_num_heads_kv", "head_dim": "attn_head_dim",
    "rotary_emb_dim": "attn_rotary_dim", "rotary_emb_base": "attn_rope_base",
    "qkv_proj_bias": "attn_qkv_bias", "out_proj_bias": "attn_out_bias", "d_conv": "attn_d_conv",
}
_ATTN_CFG_FIXED = {"causal", "mlp_dim", "softmax_scale", "rotary_emb_interleaved"}


def _mamba_ssm_hybrid_fields(raw: Mapping) -> dict:
    """``d_intermediate``, ``attn_layer_idx`` and ``attn_cfg`` of a mamba_ssm ``MixerModel`` config.

    The reference ``GatedMLP`` rounds its width up to a multiple of 128; MambaConfig's
    ``d_intermediate`` is that rounded width. ``attn_cfg`` holds the reference ``MHA``
    arguments, with its defaults (biases on, no RoPE: ``rotary_emb_dim`` 0)."""
    d_int = _as_int(raw, "d_intermediate") if "d_intermediate" in raw else 0
    _check(d_int >= 0, "d_intermediate", d_int, "must be >= 0")
    fields = dict(d_intermediate=-(-d_int // 128) * 128)
    idx = raw.get("attn_layer_idx") or []
    if not isinstance(idx, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise ValueError(f"config.json: attn_layer_idx={idx!r} must be a list of ints")
    attn = raw.get("attn_cfg") or {}
    if not isinstance(attn, Mapping):
        raise ValueError(f"config.json: attn_cfg={attn!r} must be a dict")
    if not idx:
        return fields  # attn_cfg is unused without attention layers
    where = "config.json attn_cfg"
    for key in attn:
        if key not in _ATTN_CFG and key not in _ATTN_CFG_FIXED:
            raise ValueError(f"{where}: unknown attn_cfg key {key!r} (known: {sorted(set(_ATTN_CFG) | _ATTN_CFG_FIXED)})")
    _check(attn.get("causal", False) is True, "attn_cfg.causal", attn.get("causal"), "a language model's attention must be causal")
    _check(attn.get("mlp_dim", 0) == 0, "attn_cfg.mlp_dim", attn.get("mlp_dim"),
           "the MLP fused into attention layers is not implemented")
    _check(attn.get("softmax_scale") is None, "attn_cfg.softmax_scale", attn.get("softmax_scale"),
           "only the default 1 / sqrt(head_dim) is implemented")
    _check(attn.get("rotary_emb_interleaved", False) is False, "attn_cfg.rotary_emb_interleaved",
           attn.get("rotary_emb_interleaved"), "only the rotate-half (non-interleaved) RoPE is implemented")
    fields["attn_layer_idx"] = tuple(idx)
    fields["attn_num_heads"] = _as_int(attn, "num_heads", where)
    for key in ("num_heads_kv", "head_dim"):
        if attn.get(key) is not None:
            fields[_ATTN_CFG[key]] = _as_int(attn, key, where)
    fields["attn_rotary_dim"] = _as_int(attn, "rotary_emb_dim", where) if "rotary_emb_dim" in attn else 0
    fields["attn_rope_base"] = _as_float(attn, "rotary_emb_base", 10000.0, where)
    fields["attn_qkv_bias"] = _as_bool(attn, "qkv_proj_bias", True, where)
    fields["attn_out_bias"] = _as_bool(attn, "out_proj_bias", True, where)
    fields["attn_d_conv"] = _as_int(attn, "d_conv", where) if "d_conv" in attn else 0
    return fields


def _mamba_ssm_config_fields(raw: Mapping) -> tuple[dict, int, int]:
    """MambaConfig fields, the vocabulary size and the padding multiple of a mamba_ssm config."""
    for key in raw:
        if key not in _MAMBA_SSM_TOP:
            raise ValueError(f"config.json: unknown mamba_ssm config key {key!r} (known: {sorted(_MAMBA_SSM_TOP)})")
    ssm = raw.get("ssm_cfg") or {}
    if not isinstance(ssm, Mapping):
        raise ValueError(f"config.json: ssm_cfg={ssm!r} must be a dict")
    layer = ssm.get("layer", "Mamba1")
    _check(layer in ("Mamba1", "Mamba2"), "ssm_cfg.layer", layer, "only Mamba1 and Mamba2 layers load into MambaLM")
    if layer == "Mamba1":
        for key in ssm:
            if key not in _MAMBA_SSM_SSM:
                raise ValueError(f"config.json: unknown ssm_cfg key {key!r} (known: {sorted(_MAMBA_SSM_SSM)})")
    _check(_as_bool(raw, "rms_norm", True), "rms_norm", raw.get("rms_norm"), "only RMSNorm is implemented (LayerNorm is not)")
    common = dict(
        **_mamba_ssm_hybrid_fields(raw),
        d_model=_as_int(raw, "d_model"),
        n_layer=_as_int(raw, "n_layer"),
        residual_in_fp32=_as_bool(raw, "residual_in_fp32", True),
        tie_embeddings=_as_bool(raw, "tie_embeddings", True),
    )
    vocab = _as_int(raw, "vocab_size")
    multiple = _as_int(raw, "pad_vocab_size_multiple") if "pad_vocab_size_multiple" in raw else 8
    if layer == "Mamba2":
        return {**common, **_mamba2_ssm_cfg_fields(ssm)}, vocab, multiple
    rank = ssm.get("dt_rank", "auto")
    if rank != "auto":
        rank = _as_int(ssm, "dt_rank", "config.json ssm_cfg")
    fields = dict(
        **common,
        d_state=_as_int(ssm, "d_state", "ssm_cfg") if "d_state" in ssm else 16,
        d_conv=_as_int(ssm, "d_conv", "ssm_cfg") if "d_conv" in ssm else 4,
        expand=_as_int(ssm, "expand", "ssm_cfg") if "expand" in ssm else 2,
        dt_rank=None if rank == "auto" else rank,
        dt_min=_as_float(ssm, "dt_min", 0.001, "config.json ssm_cfg"),
        dt_max=_as_float(ssm, "dt_max", 0.1, "config.json ssm_cfg"),
        dt_init=ssm.get("dt_init", "random"),
        dt_scale=_as_float(ssm, "dt_scale", 1.0, "config.json ssm_cfg"),
        dt_init_floor=_as_float(ssm, "dt_init_floor", 1e-4, "config.json ssm_cfg"),
        conv_bias=_as_bool(ssm, "conv_bias", True, "config.json ssm_cfg"),
        bias=_as_bool(ssm, "bias", False, "config.json ssm_cfg"),
    )
    return fields, vocab, multiple


def _resolve_vocab(rows: int, vocab_size: int, multiple: int | None, where: str) -> tuple[int, int]:
    """(vocab_size, pad_vocab_size_multiple) such that the padded size covers ``rows`` exactly,
    or exceeds it when ``multiple`` is given (zero rows are appended)."""
    if vocab_size > rows:
        raise ValueError(f"{where}: vocab_size={vocab_size} exceeds the {rows} rows of the embedding")
    if multiple is not None:
        padded = -(-vocab_size // multiple) * multiple
        if padded < rows:
            raise ValueError(
                f"pad_vocab_size_multiple={multiple} gives {padded} rows for vocab_size={vocab_size}, "
                f"fewer than the checkpoint's {rows}: rows would be dropped"
            )
        return vocab_size, multiple
    for m in (8, 16, 32, 64, 128, 256, 512, 1024, 1):
        if -(-vocab_size // m) * m == rows:
            return vocab_size, m
    return vocab_size, rows  # any vocab_size <= rows rounds up to exactly `rows`


def load_config(
    path: str | os.PathLike,
    *,
    vocab_size: int | None = None,
    pad_vocab_size_multiple: int | None = None,
    rows: int | None = None,
) -> tuple[MambaConfig, str]:
    """The :class:`MambaConfig` of a checkpoint directory and its layout (``"hf"`` or ``"mamba_ssm"``).

    ``rows`` is the number of embedding rows in the weights (read from them by
    :func:`from_pretrained`); without it the config alone decides.
    """
    raw = _read_json(Path(path) / "config.json")
    layout = detect_layout(raw)
    if layout == "hf":
        fields, hf_vocab = _hf2_config_fields(raw) if raw["model_type"] == "mamba2" else _hf_config_fields(raw)
        n_rows = hf_vocab
        if rows is not None and rows != hf_vocab:
            # Accepted only as the padded size of an unpadded vocab_size the config spells out.
            m_cfg = raw.get("pad_vocab_size_multiple")
            if not (rows > hf_vocab and isinstance(m_cfg, int) and m_cfg > 0 and -(-hf_vocab // m_cfg) * m_cfg == rows):
                raise ValueError(
                    f"config.json vocab_size={hf_vocab} but the embedding has {rows} rows (they must agree, "
                    "or the rows must be vocab_size rounded up to the config's pad_vocab_size_multiple)"
                )
            n_rows = rows
        v = hf_vocab if vocab_size is None else vocab_size
        v, m = _resolve_vocab(n_rows, v, pad_vocab_size_multiple, "config.json")
    else:
        fields, ssm_vocab, ssm_multiple = _mamba_ssm_config_fields(raw)
        padded = -(-ssm_vocab // ssm_multiple) * ssm_multiple
        if rows is not None and rows != padded:
            raise ValueError(
                f"config.json vocab_size={ssm_vocab} padded to a multiple of {ssm_multiple} is {padded}, "
                f"but the embedding has {rows} rows"
            )
        if vocab_size is not None and vocab_size != ssm_vocab:
            raise ValueError(f"vocab_size={vocab_size} differs from config.json vocab_size={ssm_vocab}")
        v, m = _resolve_vocab(padded, ssm_vocab, pad_vocab_size_multiple or ssm_multiple, "config.json")
    return MambaConfig(vocab_size=v, pad_vocab_size_multiple=m, **fields), layout


# Written by hf_config_dict from the MambaConfig (or regenerated on save), so not kept as extras.
_HF_REGENERATED = _HF_USED | _HF2_USED | {
    "architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "pad_vocab_size_multiple",
}
# transformers.MambaConfig's defaults, written when the model came from nowhere else.
_TOKEN_ID_DEFAULTS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
_TOKEN_ID_DEFAULTS_MAMBA2 = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}  # transformers.Mamba2Config


@dataclasses.dataclass(frozen=True)
class ConfigExtras:
    """Fields of a Hugging Face ``config.json`` that :class:`MambaConfig` does not hold.

    ``from_pretrained`` stores them on the model (``model.hf_config_extras``) and
    ``save_pretrained`` writes them back, so a round trip keeps ``bos_token_id``,
    ``eos_token_id``, ``pad_token_id`` and every other such field as it was. Frozen
    and hashable (it is static data of the NNX graph): values are held as JSON text.

    Attributes:
      items: sorted ``(key, JSON text of the value)`` pairs.
    """

    items: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_dict(cls, fields: Mapping) -> "ConfigExtras":
        return cls(tuple(sorted((str(k), json.dumps(v, sort_keys=True)) for k, v in fields.items())))

    def to_dict(self) -> dict:
        return {k: json.loads(v) for k, v in self.items}

    def get(self, key: str, default=None):
        return self.to_dict().get(key, default)


def read_config_extras(path: str | os.PathLike) -> ConfigExtras:
    """The :class:`ConfigExtras` of a checkpoint directory's ``config.json`` (empty for mamba_ssm)."""
    raw = _read_json(Path(path) / "config.json")
    if detect_layout(raw) != "hf":
        return ConfigExtras()
    return ConfigExtras.from_dict({k: v for k, v in raw.items() if k not in _HF_REGENERATED})


def hf_config_dict(
    config: MambaConfig, *, vocab_size: int, dtype_name: str, extras: ConfigExtras | None = None
) -> dict:
    """The ``config.json`` of ``transformers.MambaForCausalLM`` (``Mamba2ForCausalLM`` for
    ``config.layer == "mamba2"``) for ``config``: the token ids and other fields of ``extras``
    (transformers' defaults without), then every field :class:`MambaConfig` determines."""
    if config.is_mamba2:
        return {**_TOKEN_ID_DEFAULTS_MAMBA2, **(extras or ConfigExtras()).to_dict(), **_hf2_config_dict(config, vocab_size, dtype_name)}
    fields = {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "vocab_size": vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "state_size": config.d_state,
        "conv_kernel": config.d_conv,
        "expand": config.expand,
        "intermediate_size": config.d_inner,
        "time_step_rank": config.resolved_dt_rank,
        "time_step_min": config.dt_min,
        "time_step_max": config.dt_max,
        "time_step_init_scheme": config.dt_init,
        "time_step_scale": config.dt_scale,
        "time_step_floor": config.dt_init_floor,
        "use_bias": config.bias,
        "use_conv_bias": config.conv_bias,
        "layer_norm_epsilon": config.norm_epsilon,
        "residual_in_fp32": config.residual_in_fp32,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "rms_norm": True,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "dtype": dtype_name,
    }
    return {**_TOKEN_ID_DEFAULTS, **(extras or ConfigExtras()).to_dict(), **fields}


def _hf2_config_dict(config: MambaConfig, vocab_size: int, dtype_name: str) -> dict:
    return {
        "architectures": ["Mamba2ForCausalLM"],
        "model_type": "mamba2",
        "vocab_size": vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "state_size": config.d_state,
        "conv_kernel": config.d_conv,
        "expand": config.expand,
        "num_heads": config.nheads,
        "head_dim": config.headdim,
        "n_groups": config.ngroups,
        "chunk_size": config.chunk_size,
        "time_step_limit": list(config.dt_limit),
        "time_step_min": config.dt_min,
        "time_step_max": config.dt_max,
        "time_step_floor": config.dt_init_floor,
        "use_bias": config.bias,
        "use_conv_bias": config.conv_bias,
        "layer_norm_epsilon": config.norm_epsilon,
        "residual_in_fp32": config.residual_in_fp32,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "dtype": dtype_name,
    }
