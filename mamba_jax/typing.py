"""Dimension glossary and array aliases used in signatures across the package.

Dimensions (the same letters appear in shape strings and docstrings):

  b  batch size
  l  sequence length (time)
  d  channels of the scan (``d_inner = expand * d_model`` inside a Mamba mixer)
  e  model width (``d_model``)
  n  state size per channel (``d_state``)
  r  rank of the delta projection (``dt_rank``)
  g  number of groups sharing B and C (channel ``c`` uses group ``c // (d // g)``)
  k  width of the causal convolution (``d_conv``)
  v  vocabulary size (padded)
  h  heads (Mamba-2 / attention)
  p  head dimension (Mamba-2 / attention)
"""

from __future__ import annotations

from typing import Any

import jax
from jaxtyping import Array, Float, Int

DType = Any
PRNGKey = jax.Array

__all__ = ["Array", "Float", "Int", "DType", "PRNGKey"]
