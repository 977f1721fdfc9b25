"""Checkpoint import and export: Hugging Face ``MambaForCausalLM`` and ``mamba_ssm`` directories."""

from mamba_jax.interop.hf import (
    convert_state_dict,
    from_pretrained,
    load_config,
    load_state_dict,
    save_pretrained,
    to_hf_state_dict,
)

__all__ = [
    "from_pretrained",
    "save_pretrained",
    "load_config",
    "load_state_dict",
    "convert_state_dict",
    "to_hf_state_dict",
]
