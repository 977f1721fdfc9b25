"""Recurrent states as memory: save and resume, snapshots, a searchable library, composition, probes.

    import mamba_jax as mj
    logits, cache = model(prompt, cache=model.init_cache(1))
    mj.states.save("doc.npz", cache, model)             # with the model's fingerprint
    cache = mj.states.load("doc.npz", model)            # StateMismatchError for another model
    tokens = mj.generate(model, next_ids, 32, temperature=0.0, cache=cache)

Modules: :mod:`~mamba_jax.states.io` (save/load/fingerprint, stack/select/repeat),
:mod:`~mamba_jax.states.snapshots` (states every K tokens of a prefill),
:mod:`~mamba_jax.states.library` (build, state search, the BM25 baseline),
:mod:`~mamba_jax.states.compose` (mixtures, per-layer selection, decay-corrected
composition), :mod:`~mamba_jax.states.probes` (linear probes, half-lives) and
:mod:`~mamba_jax.states.facts` (the key-value fact task the experiments use).
"""

from mamba_jax.states.compose import Segment, compose, layer_errors, mix, segment, take_layers
from mamba_jax.states.io import (
    CorruptStateError,
    StateMismatchError,
    fingerprint,
    load,
    nbytes_per_row,
    read_header,
    repeat,
    save,
    select,
    stack,
    unstack,
)
from mamba_jax.states.probes import half_lives, measured_half_lives
from mamba_jax.states.snapshots import Snapshots, along_sequence, prefill_chunked, prefill_snapshots, run

__all__ = [
    "save",
    "load",
    "read_header",
    "fingerprint",
    "StateMismatchError",
    "CorruptStateError",
    "stack",
    "select",
    "unstack",
    "repeat",
    "nbytes_per_row",
    "prefill_snapshots",
    "prefill_chunked",
    "Snapshots",
    "along_sequence",
    "run",
    "segment",
    "Segment",
    "compose",
    "mix",
    "take_layers",
    "layer_errors",
    "half_lives",
    "measured_half_lives",
]
