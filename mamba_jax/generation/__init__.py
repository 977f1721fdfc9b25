"""Autoregressive generation, by concern: ``sampling`` (logit processing, pure functions),
``config`` (:class:`GenerationConfig`, the checked settings), ``decode`` (prefill and the
jitted decode loop: :func:`generate`) and ``cli`` (``python -m mamba_jax.generate``)."""

from mamba_jax.generation.config import GenerationConfig
from mamba_jax.generation.decode import TRACE_COUNTS, generate
from mamba_jax.generation.sampling import apply_repetition_penalty, filter_candidates, sample_logits

__all__ = [
    "generate",
    "GenerationConfig",
    "apply_repetition_penalty",
    "filter_candidates",
    "sample_logits",
    "TRACE_COUNTS",
]
