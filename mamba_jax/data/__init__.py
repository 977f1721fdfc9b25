"""Data: synthetic task generators (generated on the fly, no download)."""

from mamba_jax.data.synthetic import selective_copying

__all__ = ["selective_copying"]
