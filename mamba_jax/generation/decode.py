"""Autoregressive generation: prefill with the parallel path, then one jitted decode loop.

``generate(model, input_ids, max_new_tokens, ...)`` runs in two phases:

1. **Prefill.** Every prompt token but the last goes through the parallel
   forward (``model(ids, cache=cache, mask=mask)``) in one call, or in chunks of
   ``prefill_chunk`` tokens to bound memory. Only the cache is kept, so the LM
   head is never computed for the prompt (XLA drops the unused logits).
2. **Decode.** One jitted ``lax.while_loop`` whose carry is the fixed-size cache
   (donated), the current tokens, the output buffer and a few flags. Each
   iteration feeds one token per sequence (first the last prompt token) through
   the recurrent step, processes the logits and picks the next token. The loop
   stops when ``max_new_tokens`` are made or every sequence has emitted eos.

For a pure Mamba model nothing in the decode loop depends on the prompt
length, and its step count is a traced value: one compilation serves every
context length and every ``max_new_tokens`` up to the same power-of-two bucket
of the output buffer (at least 16). With attention layers the KV cache size is
a power-of-two bucket of prompt + buffer as well. The sampling switches (greedy or not, ``top_k``, whether
top-p / min-p / repetition penalty / eos / streaming / scores are used) are
static; the values of ``temperature``, ``top_p``, ``min_p`` and
``repetition_penalty`` are traced.

Batches of prompts of different lengths are **left padded**: either pass a
ragged list of prompts (padding is done here), or a left-padded (b, l) array
with ``prompt_lengths`` (b,), the number of real tokens at the end of each row.
Padded positions are masked out of the convolution and the SSM state (and
out of attention and its positions), so each sequence generates exactly what
it generates alone.

Hybrid and Transformer++ models (``config.attn_layer_idx``) work the same way:
their KV cache is allocated here with room for the prompt and
the output buffer, rounded up to a power of two, so one compilation of the
decode loop serves every prompt length up to the same bucket (a pure Mamba
cache does not depend on the context length at all).

Logit processing per step, in this order (as in Hugging Face ``generate``):
repetition penalty (on tokens of the prompt and of the output so far), then
greedy ``argmax`` when ``temperature == 0`` or ``top_k == 1``; otherwise divide
by ``temperature``, keep the ``top_k`` largest, keep the smallest set of most
likely tokens whose probability reaches ``top_p``, drop tokens whose
probability is below ``min_p`` times the largest, and sample. Ids at or beyond
``config.vocab_size`` (the padded part of the embedding) are never produced.

Sampling lives in :mod:`mamba_jax.generation.sampling`, the checked arguments in
:class:`mamba_jax.generation.GenerationConfig`, the command line in
:mod:`mamba_jax.generation.cli` (``python -m mamba_jax.generate --help``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
from collections import Counter
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.experimental import io_callback

from mamba_jax.cache import AttentionLayerCache, MambaCache
from mamba_jax.generation.config import GenerationConfig
from mamba_jax.generation.sampling import apply_repetition_penalty, sample_logits
from mamba_jax.typing import Array, Int

__all__ = ["generate", "TRACE_COUNTS"]

_F32 = jnp.float32
_I32 = jnp.int32
_NEG_INF = float("-inf")
MIN_BUFFER = 16

# How many times each jitted function has been traced (tests check that the
# decode loop is compiled once for many step counts and context lengths).
TRACE_COUNTS: Counter = Counter()


@dataclasses.dataclass(frozen=True)
class _DecodeSpec:
    """Static switches of the decode loop (one compilation per distinct value)."""

    buffer_len: int
    vocab_size: int
    greedy: bool
    top_k: int
    use_top_p: bool
    use_min_p: bool
    use_penalty: bool
    has_eos: bool
    stream: bool
    return_scores: bool
    return_cache: bool


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill(graphdef, state, cache, ids, mask):
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graphdef, state)
    _, cache = model(ids, cache=cache, mask=mask)
    return cache


@functools.partial(jax.jit, static_argnames=("vocab",))
def _seen_tokens(ids, mask, *, vocab):
    """(b, v) bool: which tokens occur among the real prompt tokens."""
    b = ids.shape[0]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], ids.shape)
    return jnp.zeros((b, vocab), jnp.bool_).at[rows, ids].max(mask)


# Streaming callbacks, looked up by a traced id so that the compiled loop does
# not depend on the Python callable.
_CALLBACKS: dict[int, Callable] = {}
_CALLBACK_IDS = itertools.count(1)
_CALLBACK_LOCK = threading.Lock()


def _dispatch_callback(callback_id, step, tokens, finished):
    _CALLBACKS[int(callback_id)](int(step), np.asarray(tokens), np.asarray(finished))


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"), donate_argnames=("cache",))
def _decode(graphdef, state, cache, last_tokens, seen, n_steps, key, knobs, eos_ids, pad_id, callback_id, *, spec):
    """The decode loop. ``knobs`` = (temperature, top_p, min_p, repetition_penalty) float32."""
    TRACE_COUNTS["decode"] += 1
    model = nnx.merge(graphdef, state)
    temperature, top_p, min_p, penalty = knobs[0], knobs[1], knobs[2], knobs[3]
    b = last_tokens.shape[0]
    rows = jnp.arange(b)

    def feed(tokens, real, cache):
        if not spec.return_cache:
            return model(tokens[:, None], cache=cache)
        # The padding fed after a row's eos must not reach the cache that is returned. The
        # mask keeps it out of attention (an invalid slot, no position); a masked step would
        # still shift a zero into a convolution state (Mamba's, or attention's with
        # attn_d_conv), so those rows keep theirs.
        logits, new = model(tokens[:, None], cache=cache, mask=real[:, None])
        keep = lambda a, o: jnp.where(real.reshape((-1,) + (1,) * (a.ndim - 1)), a, o)
        layers = tuple(
            (n if n.conv_state is None else n.replace(conv_state=keep(n.conv_state, o.conv_state)))
            if isinstance(n, AttentionLayerCache)
            else jax.tree.map(keep, n, o)
            for n, o in zip(new.layers, cache.layers)
        )
        return logits, new.replace(layers=layers)

    def body(carry):
        step, cache, tokens, real, done, seen, out, scores = carry
        logits, cache = feed(tokens, real, cache)
        logits = logits[:, 0].astype(_F32)
        v = logits.shape[-1]
        if spec.vocab_size < v:  # never produce ids of the padded part of the vocabulary
            logits = jnp.where(jnp.arange(v) < spec.vocab_size, logits, _NEG_INF)
        processed = apply_repetition_penalty(logits, seen, penalty) if spec.use_penalty else logits
        if spec.greedy:
            new = jnp.argmax(processed, axis=-1).astype(_I32)
        else:
            new = sample_logits(
                processed,
                jax.random.fold_in(key, step),
                temperature=temperature,
                top_k=spec.top_k,
                top_p=top_p,
                min_p=min_p,
                use_top_p=spec.use_top_p,
                use_min_p=spec.use_min_p,
            )
        new = jnp.where(done, pad_id, new)
        out = lax.dynamic_update_slice(out, new[:, None], (jnp.zeros((), _I32), step))
        if spec.return_scores:
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), new[:, None], axis=-1)[:, 0]
            logp = jnp.where(done, jnp.zeros((), _F32), logp)
            scores = lax.dynamic_update_slice(scores, logp[:, None], (jnp.zeros((), _I32), step))
        if spec.stream:
            io_callback(_dispatch_callback, None, callback_id, step, new, done, ordered=True)
        if spec.use_penalty:
            seen = seen.at[rows, new].set(True)
        real = ~done  # `new` is a generated token (the eos included), not padding
        if spec.has_eos:
            done = done | jnp.any(new[:, None] == eos_ids[None, :], axis=-1)
        return step + 1, cache, new, real, done, seen, out, scores

    def cond(carry):
        step, done = carry[0], carry[4]
        return (step < n_steps) & ~jnp.all(done)

    out = jnp.full((b, spec.buffer_len), pad_id, _I32)
    scores = jnp.zeros((b, spec.buffer_len if spec.return_scores else 0), _F32)
    done = jnp.zeros((b,), jnp.bool_)
    real = jnp.ones((b,), jnp.bool_)
    carry = (jnp.zeros((), _I32), cache, last_tokens, real, done, seen, out, scores)
    step, cache, tokens, real, _, _, out, scores = lax.while_loop(cond, body, carry)
    if spec.return_cache:  # the last generated token of each row goes into the cache too
        _, cache = feed(tokens, real, cache)
    # The final cache is returned either way so that the donated input cache is reused in place.
    return out, scores, step, cache


# --------------------------------------------------------------------------
# generate()
# --------------------------------------------------------------------------


def _prepare_prompts(input_ids, prompt_lengths, pad_token_id, vocab):
    """Returns the left-padded prompts (b, l) int32 NumPy and the lengths (b,)."""
    if isinstance(input_ids, (list, tuple)):
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths must be None when input_ids is a ragged list of prompts")
        if len(input_ids) == 0:
            raise ValueError("input_ids is an empty list: need at least one prompt")
        prompts = []
        for i, p in enumerate(input_ids):
            p = np.asarray(p)
            if p.ndim != 1 or (p.size and not np.issubdtype(p.dtype, np.integer)):
                raise ValueError(f"input_ids[{i}] must be a 1-D sequence of int token ids, got shape {p.shape}")
            if p.size == 0:
                raise ValueError(f"input_ids[{i}] is empty: every prompt needs at least one token")
            prompts.append(p.astype(np.int64))
        lengths = np.array([len(p) for p in prompts], np.int64)
        ids = np.full((len(prompts), int(lengths.max())), pad_token_id, np.int64)
        for i, p in enumerate(prompts):
            ids[i, ids.shape[1] - len(p) :] = p
    else:
        if not hasattr(input_ids, "shape") or not hasattr(input_ids, "dtype"):
            raise TypeError(f"input_ids must be a (b, l) int array or a list of prompts, got {type(input_ids).__name__}")
        ids = np.asarray(input_ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"input_ids must have an integer dtype, got input_ids.dtype={ids.dtype}")
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape (b, l) with b, l >= 1, got input_ids.shape={ids.shape}")
        ids = ids.astype(np.int64)
        if prompt_lengths is None:
            lengths = np.full((ids.shape[0],), ids.shape[1], np.int64)
        else:
            lengths = np.asarray(prompt_lengths)
            if lengths.shape != (ids.shape[0],) or not np.issubdtype(lengths.dtype, np.integer):
                raise ValueError(
                    f"prompt_lengths must be an int array of shape (b,)=({ids.shape[0]},), "
                    f"got {lengths.dtype} {lengths.shape}"
                )
            if lengths.min() < 1 or lengths.max() > ids.shape[1]:
                raise ValueError(
                    f"prompt_lengths must lie in [1, l={ids.shape[1]}] (real tokens at the end of each "
                    f"left-padded row), got values in [{lengths.min()}, {lengths.max()}]"
                )
            lengths = lengths.astype(np.int64)
    mask = np.arange(ids.shape[1])[None, :] >= (ids.shape[1] - lengths)[:, None]
    real = ids[mask]
    if real.size and (real.min() < 0 or real.max() >= vocab):
        raise ValueError(f"input_ids must lie in [0, {vocab}), got values in [{real.min()}, {real.max()}]")
    ids = np.where(mask, ids, pad_token_id)
    return ids.astype(np.int32), lengths


def _kv_slots_left(cache) -> int | None:
    """Free slots of the attention layers' KV buffers (None when the model has none)."""
    for layer in cache.layers:
        if isinstance(layer, AttentionLayerCache):
            return layer.max_length - int(layer.index)
    return None


def generate(
    model,
    input_ids: Int[Array, "b l"] | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    key: Array | None = None,
    prompt_lengths: Int[Array, " b"] | None = None,
    callback: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    return_scores: bool = False,
    prefill_chunk: int | None = None,
    cache=None,
    return_cache: bool = False,
    cache_length: int | None = None,
):
    """Generates ``max_new_tokens`` tokens after each prompt.

    Args:
      model: a :class:`mamba_jax.MambaLM` (anything with ``config``,
        ``init_cache`` and ``model(ids, cache=..., mask=...)``).
      input_ids: the prompts: a (b, l) int array, or a list of ``b`` prompts
        (sequences of ints) of any lengths, which are left padded here with
        ``pad_token_id``. Every prompt needs at least one token.
      max_new_tokens: number of tokens to generate per sequence (>= 0).
      temperature: softmax temperature; ``0`` means greedy decoding.
      top_k: keep only the ``top_k`` most likely tokens (0: no limit; 1: greedy).
      top_p: nucleus sampling, in (0, 1]: keep the smallest set of most likely
        tokens whose probability reaches ``top_p``.
      min_p: in [0, 1]: drop tokens less likely than ``min_p`` times the most likely.
      repetition_penalty: > 0; 1 is off. Applied to every token of the prompt
        and of the output so far (divides positive logits, multiplies negative).
      eos_token_id: an id or a sequence of ids; a sequence stops after emitting
        one of them (the eos is kept) and is padded with ``pad_token_id``.
      pad_token_id: the id used for padding, in the prompts and in the output.
      key: a ``jax.random.key`` (or raw ``PRNGKey``); required unless greedy.
        Step ``t`` uses ``fold_in(key, t)``, so a fixed key reproduces the output.
      prompt_lengths: with an array ``input_ids`` whose rows are LEFT padded,
        the number of real tokens at the end of each row, (b,). ``None``: every
        row is a full prompt. Must be ``None`` for a ragged list.
      callback: streaming: called on the host as ``callback(step, tokens,
        finished)`` after every step, with the step index, the new tokens (b,)
        and a (b,) bool array that is True for sequences that had already
        stopped (their token is ``pad_token_id``). Called in order, from the
        running decode loop.
      return_scores: also return, per generated token, its log-probability
        under the model (raw logits, before penalty, temperature and
        filtering); 0 at padded positions.
      prefill_chunk: run the prompt through the parallel forward in chunks of
        this many tokens (bounds memory for long prompts; one compilation for
        every prompt length). ``None``: one call for the whole prompt. With
        ``cache``, the first call takes the ``(l - 1) % prefill_chunk`` tokens
        that do not fill a chunk (no padding after cached tokens).
      cache: continue from this cache (a ``MambaCache`` returned by
        ``model(ids, cache=...)`` or by ``generate(..., return_cache=True)``)
        instead of an empty one: ``input_ids`` are then the tokens that follow
        it, the same number for every row (no padding, no ``prompt_lengths``).
        The given cache is not modified. With attention layers its KV buffers
        must have room for the new tokens (``l - 1`` prompt tokens, rounded up
        to a multiple of ``prefill_chunk``, plus ``max_new_tokens``, plus one
        with ``return_cache``), else a ValueError says so.
      return_cache: also return the cache after every prompt and generated
        token (the eos included; not the padding after it), so that a
        conversation continues with ``generate(model, next_ids, n,
        cache=cache)`` without running the history through the model again.
      cache_length: with attention layers, the slots of the KV buffers of the
        fresh cache made here (prompt and generated tokens, and what a
        continuation from the returned cache will add). ``None``: the prompt
        and the output buffer, rounded up to a power of two.

    Returns:
      ``tokens`` (b, max_new_tokens) int32, the generated tokens only (padded
      with ``pad_token_id`` after eos); with ``return_scores`` also ``scores``
      (b, max_new_tokens) float32; with ``return_cache`` also the final cache,
      last: ``tokens``, ``(tokens, scores)``, ``(tokens, cache)`` or
      ``(tokens, scores, cache)``.
    """
    model_config = getattr(model, "config", None)
    if not isinstance(model, nnx.Module) or model_config is None or not hasattr(model, "init_cache"):
        raise TypeError(f"model must be a MambaLM (an nnx.Module with config and init_cache), got {type(model).__name__}")
    vocab = model_config.padded_vocab_size
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        prefill_chunk=prefill_chunk,
        return_scores=return_scores,
        return_cache=return_cache,
        cache_length=cache_length,
    )
    gen.check_vocab(vocab)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    key = _check_key(key, gen.greedy)
    ids, lengths = _prepare_prompts(input_ids, prompt_lengths, gen.pad_token_id, vocab)
    b, l = ids.shape
    if cache is not None:
        if not isinstance(cache, MambaCache) or len(cache.layers) != model_config.n_layer:
            raise TypeError(f"cache must be None or a MambaCache with {model_config.n_layer} layers (see model.init_cache)")
        if cache.batch_size != b:
            raise ValueError(f"cache has batch size {cache.batch_size} but there are {b} prompts")
        if not bool((lengths == l).all()):
            raise ValueError("with a cache, every row of input_ids must be real tokens (no padding or prompt_lengths)")
        if cache_length is not None:
            raise ValueError(f"cache_length={cache_length} sizes a fresh cache: it must be None with a given cache")

    n_new = gen.max_new_tokens
    if n_new == 0 and not gen.return_cache:
        tokens = jnp.zeros((b, 0), _I32)
        return (tokens, jnp.zeros((b, 0), _F32)) if gen.return_scores else tokens

    graphdef, state = nnx.split(model)
    mask = np.arange(l)[None, :] >= (l - lengths)[:, None]
    padded = not bool(mask.all())
    buffer_len = max(MIN_BUFFER, 1 << (n_new - 1).bit_length()) if n_new else 0
    # Prefill every prompt token but the last (the decode loop feeds it), or all of
    # them when nothing is generated and only the cache is wanted.
    n_pre = l - 1 if n_new else l
    # Chunked prefill left pads the prompt to whole chunks, except after a given cache:
    # padding there would sit between cached and new tokens, where the convolution sees
    # it; the first call then takes the remainder unpadded (one more compilation).
    chunk = gen.prefill_chunk
    extra = 0 if chunk is None or cache is not None else -n_pre % chunk
    n_pre_slots = n_pre + extra
    # KV slots written: the prefill, one per decode step, and the last token with return_cache.
    slots_needed = n_pre_slots + n_new + (1 if gen.return_cache and n_new else 0)

    if cache is None:
        max_length = None
        if getattr(model_config, "has_attention", False):
            if gen.cache_length is not None:
                if gen.cache_length < slots_needed:
                    raise ValueError(
                        f"cache_length={gen.cache_length} is less than the {slots_needed} KV slots this call writes "
                        f"({n_pre_slots} prompt tokens before the last, max_new_tokens={n_new}"
                        f"{' and the last token, for return_cache' if gen.return_cache and n_new else ''})"
                    )
                max_length = gen.cache_length
            else:
                # Rounded up to a power of two so that prompts of similar lengths share
                # the compilations of the prefill and the decode loop.
                max_length = 1 << (n_pre_slots + max(buffer_len, slots_needed - n_pre_slots) - 1).bit_length()
        cache = model.init_cache(b, max_length)  # fresh, independent buffers: donated below
    else:
        free = _kv_slots_left(cache)
        if free is not None and slots_needed > free:
            raise ValueError(
                f"the cache's KV buffers have {free} free slots but this call needs {slots_needed} "
                f"({n_pre_slots} prompt tokens before the last and max_new_tokens={n_new}"
                f"{', plus the last token for return_cache' if gen.return_cache and n_new else ''}): "
                "make the cache with a larger init_cache(batch_size, max_length=...) or generate(cache_length=...)"
            )
        cache = jax.tree.map(jnp.copy, cache)  # the caller's cache stays valid: ours is donated
    if n_pre > 0:
        pre_ids, pre_mask = ids[:, :n_pre], mask[:, :n_pre]
        if chunk is None:
            cache = _prefill(graphdef, state, cache, jnp.asarray(pre_ids), jnp.asarray(pre_mask) if padded else None)
        else:
            pre_ids = np.pad(pre_ids, ((0, 0), (extra, 0)), constant_values=gen.pad_token_id)
            pre_mask = np.pad(pre_mask, ((0, 0), (extra, 0)), constant_values=False)
            head = pre_ids.shape[1] % chunk  # 0 unless continuing from a given cache
            if head:
                cache = _prefill(graphdef, state, cache, jnp.asarray(pre_ids[:, :head]), jnp.asarray(pre_mask[:, :head]))
            for start in range(head, pre_ids.shape[1], chunk):
                sl = slice(start, start + chunk)
                cache = _prefill(graphdef, state, cache, jnp.asarray(pre_ids[:, sl]), jnp.asarray(pre_mask[:, sl]))
    if n_new == 0:  # return_cache with nothing to generate
        tokens = jnp.zeros((b, 0), _I32)
        return (tokens, jnp.zeros((b, 0), _F32), cache) if gen.return_scores else (tokens, cache)

    use_penalty = gen.repetition_penalty != 1.0
    if use_penalty:
        seen = _seen_tokens(jnp.asarray(ids), jnp.asarray(mask), vocab=vocab)
    else:
        seen = jnp.zeros((b, 0), jnp.bool_)
    greedy = gen.greedy
    spec = _DecodeSpec(
        buffer_len=buffer_len,
        vocab_size=model_config.vocab_size,
        greedy=greedy,
        top_k=0 if greedy else gen.top_k,
        use_top_p=not greedy and gen.top_p < 1.0,
        use_min_p=not greedy and gen.min_p > 0.0,
        use_penalty=use_penalty,
        has_eos=bool(gen.eos_token_id),
        stream=callback is not None,
        return_scores=gen.return_scores,
        return_cache=gen.return_cache,
    )
    knobs = jnp.asarray([gen.temperature if not greedy else 1.0, gen.top_p, gen.min_p, gen.repetition_penalty], _F32)
    eos_ids = jnp.asarray(gen.eos_token_id or (0,), _I32)
    callback_id = 0
    if callback is not None:
        with _CALLBACK_LOCK:
            callback_id = next(_CALLBACK_IDS)
            _CALLBACKS[callback_id] = callback
    try:
        out, scores, _, cache = _decode(
            graphdef,
            state,
            cache,
            jnp.asarray(ids[:, -1]),
            seen,
            jnp.asarray(n_new, _I32),
            key,
            knobs,
            eos_ids,
            jnp.asarray(gen.pad_token_id, _I32),
            jnp.asarray(callback_id, _I32),
            spec=spec,
        )
        out = jax.block_until_ready(out)
        if callback is not None:
            jax.effects_barrier()
    finally:
        if callback is not None:
            with _CALLBACK_LOCK:
                _CALLBACKS.pop(callback_id, None)
    result = (out[:, :n_new],)
    if gen.return_scores:
        result += (scores[:, :n_new],)
    if gen.return_cache:
        result += (cache,)
    return result[0] if len(result) == 1 else result


def _check_key(key, greedy: bool):
    """A single typed key (a raw ``PRNGKey`` is wrapped); a placeholder when greedy and none is given."""
    if key is None:
        if not greedy:
            raise ValueError(
                "key is required for sampling (temperature > 0 and top_k != 1): pass key=jax.random.key(seed), "
                "or temperature=0 for greedy decoding"
            )
        return jax.random.key(0)  # unused: greedy decoding draws no random numbers
    if not isinstance(key, jax.Array):
        raise TypeError(f"key must be a jax.random.key (or PRNGKey), got {type(key).__name__}")
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.dtype != jnp.uint32 or key.shape != (2,):
            raise TypeError(f"key must be a jax.random.key or a raw PRNGKey (2,) uint32, got {key.dtype} {key.shape}")
        key = jax.random.wrap_key_data(key)
    if key.shape != ():
        raise ValueError(f"key must be a single key (shape ()), got key.shape={key.shape}")
    return key
