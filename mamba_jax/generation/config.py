"""GenerationConfig: the checked, frozen settings of one :func:`mamba_jax.generate` call."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["GenerationConfig"]


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _check_unit(name, value, lo, hi, lo_open=False):
    if not _is_number(value) or not math.isfinite(float(value)):
        raise ValueError(f"{name}={value!r} must be a finite number")
    ok = (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{name}={value!r} must lie in {interval}")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """What to generate and how; every field is checked when the config is made.

    :func:`mamba_jax.generate` builds one from its keyword arguments (the
    ranges that depend on the model's vocabulary are checked there, by
    :meth:`check_vocab`).

    Attributes:
      max_new_tokens: tokens to generate per sequence (>= 0).
      temperature: softmax temperature, >= 0; 0 is greedy decoding.
      top_k: keep only the ``top_k`` most likely tokens (0: no limit; 1: greedy).
      top_p: nucleus sampling, in (0, 1]: keep the smallest set of most likely
        tokens whose probability reaches ``top_p``.
      min_p: in [0, 1]: drop tokens less likely than ``min_p`` times the most likely.
      repetition_penalty: > 0; 1 is off.
      eos_token_id: the stop tokens, a tuple (empty: none); an int or a
        non-empty sequence of ints is accepted and made a tuple.
      pad_token_id: the id used for padding, in the prompts and in the output.
      prefill_chunk: run the prompt through the parallel forward in chunks of
        this many tokens (``None``: one call).
      return_scores: also return the log-probability of each generated token.
      return_cache: also return the cache after the last generated token, to
        continue with ``generate(model, next_ids, ..., cache=cache)``.
      cache_length: slots of the KV buffers of a fresh cache (models with
        attention layers; ``None``: the prompt and the output rounded up to a
        power of two). Give more to continue a conversation from the returned cache.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    eos_token_id: int | Sequence[int] | None = ()
    pad_token_id: int = 0
    prefill_chunk: int | None = None
    return_scores: bool = False
    return_cache: bool = False
    cache_length: int | None = None

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an int >= 0")
        t = self.temperature
        if not _is_number(t) or not math.isfinite(float(t)) or t < 0:
            raise ValueError(f"temperature={t!r} must be a finite number >= 0 (0 is greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an int >= 0 (0 is no limit)")
        _check_unit("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_unit("min_p", self.min_p, 0.0, 1.0)
        r = self.repetition_penalty
        if not _is_number(r) or not math.isfinite(float(r)) or r <= 0:
            raise ValueError(f"repetition_penalty={r!r} must be a finite number > 0 (1 is off)")
        if not _is_int(self.pad_token_id) or self.pad_token_id < 0:
            raise ValueError(f"pad_token_id={self.pad_token_id!r} must be an int >= 0")
        eos = self.eos_token_id
        if eos is None or eos == ():  # () is the default: no stop token
            ids = ()
        elif _is_int(eos):
            ids = (int(eos),)
        elif isinstance(eos, (list, tuple)) and len(eos) > 0 and all(_is_int(e) for e in eos):
            ids = tuple(int(e) for e in eos)
        else:
            ids = None
        if ids is None or any(e < 0 for e in ids):
            raise ValueError(f"eos_token_id={eos!r} must be None, an int or a non-empty list of ints >= 0")
        object.__setattr__(self, "eos_token_id", ids)  # normalised: frozen, so through object
        if self.prefill_chunk is not None and (not _is_int(self.prefill_chunk) or self.prefill_chunk < 1):
            raise ValueError(f"prefill_chunk={self.prefill_chunk!r} must be None or a positive int")
        for name in ("return_scores", "return_cache"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be a bool")
        if self.cache_length is not None and (not _is_int(self.cache_length) or self.cache_length < 1):
            raise ValueError(f"cache_length={self.cache_length!r} must be None or a positive int")

    @property
    def greedy(self) -> bool:
        """Whether decoding is ``argmax`` (temperature 0 or ``top_k == 1``): no key needed."""
        return self.temperature == 0 or self.top_k == 1

    def check_vocab(self, vocab: int) -> None:
        """ValueError if ``pad_token_id`` or an eos id is not a row of a ``vocab``-row embedding."""
        if self.pad_token_id >= vocab:
            raise ValueError(f"pad_token_id={self.pad_token_id!r} must be an int in [0, {vocab})")
        if any(e >= vocab for e in self.eos_token_id):
            raise ValueError(f"eos_token_id={self.eos_token_id!r} must be ids in [0, {vocab})")
