"""Checkpoint import and export: Hugging Face ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` and
``mamba_ssm`` directories (Mamba-1, Mamba-2 and their hybrids with attention and MLP blocks).

``config`` (``config.json`` parsing), ``weights`` (weight files), ``names`` (the
name table), ``hf`` (:func:`from_pretrained` / :func:`save_pretrained`).
"""

from mamba_jax.interop.config import ConfigExtras, load_config
from mamba_jax.interop.hf import from_pretrained, save_pretrained
from mamba_jax.interop.names import convert_state_dict, to_hf_state_dict
from mamba_jax.interop.weights import load_state_dict

__all__ = [
    "from_pretrained",
    "save_pretrained",
    "load_config",
    "load_state_dict",
    "convert_state_dict",
    "to_hf_state_dict",
    "ConfigExtras",
]
