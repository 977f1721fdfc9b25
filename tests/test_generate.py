"""generate(): teacher-forcing consistency, sampling filters, batching, eos, tracing, errors, CLI."""

import dataclasses
import io
import json
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mamba_jax as mj
from mamba_jax.generation import (
    TRACE_COUNTS,
    GenerationConfig,
    apply_repetition_penalty,
    filter_candidates,
    generate,
    sample_logits,
)
from mamba_jax.generation import cli

VOCAB = 250  # padded to 256: the padded ids must never be produced


def make_model(seed=0, **config):
    """A tiny model whose greedy continuations are varied (random init echoes the input)."""
    cfg = mj.MambaConfig.tiny(**{"vocab_size": VOCAB, "tie_embeddings": False, **config})
    model = mj.MambaLM(cfg, rngs=nnx.Rngs(seed))
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 30.0
    for layer in model.layers:
        layer.mixer.out_proj.kernel[...] = layer.mixer.out_proj.kernel[...] * 3.0
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


_FORWARD_LEN = 32


@nnx.jit
def _forward(model, ids):
    return model(ids)


def teacher_forced(model, prompt, steps, penalty=1.0):
    """Greedy continuation by re-running the full parallel forward over the growing sequence.

    The sequence is right padded to a fixed length (one compilation); the model
    is causal, so the logits at its last real position do not see the padding.
    Returns the tokens and the log-probability of each under the raw logits."""
    seq = list(prompt)
    logps = []
    for _ in range(steps):
        assert len(seq) <= _FORWARD_LEN
        ids = np.zeros((1, _FORWARD_LEN), np.int32)
        ids[0, : len(seq)] = seq
        logits = np.asarray(_forward(model, jnp.asarray(ids))[0, len(seq) - 1, :VOCAB], np.float64)
        logp = logits - np.logaddexp.reduce(logits)
        if penalty != 1.0:
            seen = np.zeros(VOCAB, bool)
            seen[seq] = True
            logits = np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits)
        tok = int(np.argmax(logits))
        logps.append(logp[tok])
        seq.append(tok)
    return seq[len(prompt) :], np.asarray(logps)


PROMPTS = [[11, 42, 7, 199, 3], [5], [120, 64, 9]]


@pytest.fixture(scope="module")
def reference(model):
    return [teacher_forced(model, p, 6) for p in PROMPTS]


def test_greedy_equals_teacher_forcing_on_ragged_batch(model, reference):
    out, scores = generate(model, PROMPTS, 6, temperature=0.0, return_scores=True)
    assert out.shape == (3, 6) and out.dtype == jnp.int32
    for row, (tokens, logps) in enumerate(reference):
        assert np.asarray(out[row]).tolist() == tokens, row
        np.testing.assert_allclose(np.asarray(scores[row]), logps, rtol=1e-4, atol=1e-4)
    # The continuations are not trivial (the test could fail on a model that echoes).
    assert len({t for tokens, _ in reference for t in tokens}) > 6


def test_left_padded_array_and_chunked_prefill_match(model, reference):
    l = max(map(len, PROMPTS))
    ids = np.zeros((3, l), np.int32)
    for i, p in enumerate(PROMPTS):
        ids[i, l - len(p) :] = p
    lengths = np.array([len(p) for p in PROMPTS])
    want = [tokens for tokens, _ in reference]
    out = generate(model, jnp.asarray(ids), 6, temperature=0.0, prompt_lengths=lengths, prefill_chunk=2)
    assert np.asarray(out).tolist() == want
    # Each sequence alone gives the same tokens as in the batch.
    alone = generate(model, jnp.asarray([PROMPTS[0]], jnp.int32), 6, temperature=0.0)
    assert np.asarray(alone[0]).tolist() == want[0]


@pytest.mark.parametrize("prefill_chunk", [None, 2])
def test_continue_from_cache(model, reference, prefill_chunk):
    prompt = PROMPTS[0]
    _, cache = model(jnp.asarray([prompt[:3]], jnp.int32), cache=model.init_cache(1))
    before = jax.tree.map(np.asarray, cache)
    # One token to prefill, less than a chunk: no padding may go between the cache and it.
    ids = jnp.asarray([prompt[3:]], jnp.int32)
    out = generate(model, ids, 6, temperature=0.0, cache=cache, prefill_chunk=prefill_chunk)
    assert np.asarray(out[0]).tolist() == reference[0][0]
    chex.assert_trees_all_equal(before, jax.tree.map(np.asarray, cache))  # not donated


@pytest.mark.parametrize("penalty", [0.3, 1.8])
def test_repetition_penalty_matches_reference_loop(model, reference, penalty):
    prompt = PROMPTS[0]
    want, _ = teacher_forced(model, prompt, 5, penalty=penalty)
    out = generate(model, [prompt], 5, temperature=0.0, repetition_penalty=penalty)
    assert np.asarray(out[0]).tolist() == want
    if penalty < 1:  # boosting seen tokens changes the output of this model
        assert want != reference[0][0][:5]
    logits = jnp.asarray([[2.0, -2.0, 3.0, -1.0]], jnp.float32)
    seen = jnp.asarray([[True, True, False, False]])
    np.testing.assert_allclose(apply_repetition_penalty(logits, seen, 2.0), [[1.0, -4.0, 3.0, -1.0]])


def test_top_k_1_is_greedy(model, reference):
    key = jax.random.key(3)
    out = generate(model, PROMPTS, 6, temperature=0.7, top_k=1, key=key)
    assert np.asarray(out).tolist() == [tokens for tokens, _ in reference]
    # The sampling function itself, not just the routing in generate().
    logits = jax.random.normal(jax.random.key(0), (64, 300), jnp.float32) * 3.0
    for i in range(3):
        got = sample_logits(logits, jax.random.key(i), temperature=1.5, top_k=1)
        np.testing.assert_array_equal(got, jnp.argmax(logits, axis=-1))


def test_fixed_key_reproducible_and_keys_differ(model):
    kw = dict(temperature=1.5, top_p=0.95, min_p=0.01, top_k=50)
    a = generate(model, PROMPTS, 8, key=jax.random.key(7), **kw)
    b = generate(model, PROMPTS, 8, key=jax.random.key(7), **kw)
    c = generate(model, PROMPTS, 8, key=jax.random.key(8), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert int(jnp.max(a)) < VOCAB and int(jnp.min(a)) >= 0
    # A raw PRNGKey works the same as the typed key it wraps.
    d = generate(model, PROMPTS, 8, key=jax.random.PRNGKey(7), **kw)
    e = generate(model, PROMPTS, 8, key=jax.random.wrap_key_data(jax.random.PRNGKey(7)), **kw)
    np.testing.assert_array_equal(d, e)


# A crafted distribution over 8 tokens, in shuffled order so that sorting matters.
_PROBS = np.array([0.45, 0.25, 0.15, 0.08, 0.04, 0.02, 0.007, 0.003])
_ORDER = np.array([5, 2, 7, 0, 3, 6, 1, 4])  # token _ORDER[i] has probability _PROBS[i]


def _crafted_logits():
    logits = np.zeros(8)
    logits[_ORDER] = np.log(_PROBS)
    return jnp.asarray(logits[None], jnp.float32)


@pytest.mark.parametrize(
    "kw, n_allowed",
    [
        (dict(top_p=0.6), 2),  # 0.45 < 0.6 <= 0.70
        (dict(top_p=0.8), 3),  # 0.70 < 0.8 <= 0.85
        (dict(top_p=0.3), 1),  # the most likely token is always kept
        (dict(min_p=0.3), 3),  # p >= 0.3 * 0.45 = 0.135
        (dict(min_p=0.1), 4),  # p >= 0.045
        (dict(top_k=5, top_p=0.97), 5),  # renormalised over the top 5 (0.97 of mass): all 5 needed
        (dict(top_k=6, top_p=0.9, min_p=0.2), 3),  # top-p keeps 4, min-p (>= 0.09) drops the 4th
        (dict(top_k=4), 4),
    ],
)
def test_filters_never_sample_outside_allowed_set(kw, n_allowed):
    allowed = set(_ORDER[:n_allowed].tolist())
    logits = _crafted_logits()
    values, indices = filter_candidates(logits, **kw)
    kept = indices[0][jnp.isfinite(values[0])] if indices is not None else jnp.nonzero(jnp.isfinite(values[0]))[0]
    assert set(np.asarray(kept).tolist()) == allowed
    # 4000 rows of the same distribution, sampled independently.
    draws = sample_logits(jnp.broadcast_to(logits, (4000, 8)), jax.random.key(0), **kw)
    counts = np.bincount(np.asarray(draws), minlength=8)
    assert set(np.nonzero(counts)[0].tolist()) == allowed  # nothing outside, everything allowed seen
    # Within the allowed set the renormalised probabilities are respected.
    p = np.zeros(8)
    p[_ORDER[:n_allowed]] = _PROBS[:n_allowed] / _PROBS[:n_allowed].sum()
    np.testing.assert_allclose(counts / counts.sum(), p, atol=0.03)


def test_filters_with_temperature_in_generate(model):
    # temperature -> 0+ with top_p makes sampling greedy; it must not produce other tokens.
    out = generate(model, PROMPTS, 4, temperature=1e-4, top_p=0.5, key=jax.random.key(0))
    want = generate(model, PROMPTS, 4, temperature=0.0)
    np.testing.assert_array_equal(out, want)


def test_zero_new_tokens_and_length_one_prompt(model, reference):
    out = generate(model, PROMPTS, 0, temperature=0.0)
    assert out.shape == (3, 0) and out.dtype == jnp.int32
    tokens, scores = generate(model, [[5]], 0, return_scores=True, key=jax.random.key(0))
    assert tokens.shape == scores.shape == (1, 0)
    one = generate(model, jnp.asarray([[5]], jnp.int32), 6, temperature=0.0)
    assert np.asarray(one[0]).tolist() == reference[1][0]


def test_eos_in_first_step_and_per_sequence_stop(model, reference):
    first = [tokens[0] for tokens, _ in reference]
    # Row 0 emits eos at step 0; the others go on and match what they make alone.
    out, scores = generate(
        model, PROMPTS, 6, temperature=0.0, eos_token_id=first[0], pad_token_id=255, return_scores=True
    )
    out = np.asarray(out)
    assert out[0].tolist() == [first[0]] + [255] * 5
    assert np.all(np.asarray(scores[0, 1:]) == 0.0)
    for row in (1, 2):
        tokens = reference[row][0]
        stop = tokens.index(first[0]) + 1 if first[0] in tokens else 6
        assert out[row, :stop].tolist() == tokens[:stop]
        assert np.all(out[row, stop:] == 255)
    # Every sequence stops at once: the loop ends early and the rest is padding.
    out = generate(model, PROMPTS, 6, temperature=0.0, eos_token_id=first, pad_token_id=0)
    assert np.asarray(out).tolist() == [[t] + [0] * 5 for t in first]


def test_streaming_callback_sees_every_step(model):
    seen = []
    out = generate(
        model,
        PROMPTS,
        5,
        temperature=0.0,
        eos_token_id=[int(generate(model, [PROMPTS[1]], 1, temperature=0.0)[0, 0])],
        callback=lambda step, tokens, finished: seen.append((step, tokens.copy(), finished.copy())),
    )
    assert [s for s, _, _ in seen] == list(range(len(seen)))
    streamed = np.stack([t for _, t, _ in seen], axis=1)
    np.testing.assert_array_equal(streamed, np.asarray(out)[:, : len(seen)])
    assert seen[1][2][1]  # row 1 stopped at step 0, so it is marked finished from step 1


def test_decode_loop_traces_once_for_step_counts_and_contexts():
    model = make_model(seed=1, d_model=32)  # a graph no other test uses: the first call must trace
    before = TRACE_COUNTS.copy()
    rng = np.random.RandomState(0)
    outs = {}
    for n, l in [(3, 2), (9, 7), (16, 20), (12, 33)]:
        prompt = rng.randint(0, VOCAB, (2, l))
        outs[n, l] = generate(model, jnp.asarray(prompt, jnp.int32), n, temperature=0.0, prefill_chunk=8)
        assert outs[n, l].shape == (2, n)
    assert TRACE_COUNTS["decode"] - before["decode"] == 1
    assert TRACE_COUNTS["prefill"] - before["prefill"] == 1  # one chunk shape for every prompt length
    # A longer output needs a bigger buffer (the next power of two): one more trace.
    generate(model, jnp.asarray(rng.randint(0, VOCAB, (2, 4)), jnp.int32), 17, temperature=0.0, prefill_chunk=8)
    assert TRACE_COUNTS["decode"] - before["decode"] == 2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=2.0), ValueError, "max_new_tokens"),
        (dict(temperature=-0.1), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(min_p=-0.1), ValueError, "min_p"),
        (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
        (dict(eos_token_id=256), ValueError, "eos_token_id"),
        (dict(eos_token_id=[]), ValueError, "eos_token_id"),
        (dict(pad_token_id=-1), ValueError, "pad_token_id"),
        (dict(key=None), ValueError, "key"),
        (dict(key=np.zeros(2, np.uint32)), TypeError, "key"),
        (dict(prompt_lengths=np.array([1])), ValueError, "prompt_lengths"),
        (dict(prompt_lengths=np.array([0, 3])), ValueError, "prompt_lengths"),
        (dict(callback=3), TypeError, "callback"),
        (dict(prefill_chunk=0), ValueError, "prefill_chunk"),
        (dict(input_ids=jnp.zeros((2, 3), jnp.float32)), TypeError, "input_ids"),
        (dict(input_ids=jnp.zeros((2, 0), jnp.int32)), ValueError, "input_ids"),
        (dict(input_ids=jnp.full((2, 3), 256, jnp.int32)), ValueError, "input_ids"),
        (dict(input_ids=[[1, 2], []]), ValueError, r"input_ids\[1\]"),
        (dict(input_ids=[[1, 2], [3]], prompt_lengths=np.array([2, 1])), ValueError, "prompt_lengths"),
        (dict(model="not a model"), TypeError, "model"),
    ],
)
def test_bad_arguments_raise(model, kwargs, error, match):
    args = dict(model=model, input_ids=jnp.ones((2, 3), jnp.int32), max_new_tokens=2, key=jax.random.key(0))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        generate(args.pop("model"), args.pop("input_ids"), args.pop("max_new_tokens"), **args)


def test_bad_cache_raises(model):
    cache = model.init_cache(2)
    with pytest.raises(ValueError, match="batch size"):
        generate(model, jnp.ones((1, 2), jnp.int32), 2, temperature=0.0, cache=cache)
    with pytest.raises(ValueError, match="padding"):
        generate(model, [[1, 2], [3]], 2, temperature=0.0, cache=cache)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _checkpoint_dir(tmp_path, model, eos=None):
    """A checkpoint directory: with save_pretrained when the interop module has it,
    otherwise a config.json only, and the model comes from an injected loader."""
    save = getattr(mj, "save_pretrained", None)
    if save is not None:
        save(model, str(tmp_path))
        loader = None
    else:
        loader = lambda path: model
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg["eos_token_id"] = eos
    cfg_path.write_text(json.dumps(cfg))
    return loader


def test_cli_with_token_ids(model, tmp_path, reference):
    loader = _checkpoint_dir(tmp_path, model)
    out = io.StringIO()
    argv = ["--checkpoint", str(tmp_path), "--prompt", "11,42,7,199,3", "--max-new-tokens", "6", "--temperature", "0"]
    assert cli.main(argv, loader=loader, out=out) == 0
    head, tail = out.getvalue().strip().split(" -> ")
    assert head == "11,42,7,199,3"
    assert [int(t) for t in tail.split(",")] == reference[0][0]  # (via save_pretrained when it exists)
    # eos from config.json stops the stream.
    loader = _checkpoint_dir(tmp_path, model, eos=reference[0][0][1])
    out = io.StringIO()
    cli.main(argv, loader=loader, out=out)
    assert out.getvalue().strip().split(" -> ")[1] == ",".join(map(str, reference[0][0][:2]))


def test_cli_with_tokenizer(model, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {chr(ord("a") + i): i for i in range(26)}
    vocab.update({f"w{i}": i for i in range(26, VOCAB)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="a"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loader = _checkpoint_dir(tmp_path, model)
    out = io.StringIO()
    argv = ["--checkpoint", str(tmp_path), "--prompt", "h e l l o", "--max-new-tokens", "5", "--top-k", "5", "--seed", "1"]
    cli.main(argv, loader=loader, out=out)
    prompt = [7, 4, 11, 11, 14]
    want = generate(model, [prompt], 5, top_k=5, key=jax.random.key(1))
    assert out.getvalue() == tok.decode(prompt + np.asarray(want[0]).tolist()) + "\n"
    assert len(out.getvalue().split()) == 10


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "1"], loader=lambda p: None)
    with pytest.raises(SystemExit, match="token ids"):
        cli.main(["--checkpoint", str(tmp_path), "--prompt", "hello"], loader=lambda p: make_model())


# --------------------------------------------------------------------------
# return_cache: a conversation continues without re-prefilling
# --------------------------------------------------------------------------


def _continue_vs_one_long_generate(model, prompts, n1, n2, eos, **kw):
    """Turn 1 with return_cache, turn 2 from its cache, against one generate over the whole history."""
    first, cache = generate(model, prompts, n1, temperature=0.0, eos_token_id=eos, pad_token_id=0,
                            return_cache=True, **kw)
    turn2 = [[17, 33], [101, 4], [9, 250 - 1]][: len(prompts)]
    second, scores = generate(model, turn2, n2, temperature=0.0, cache=cache, return_scores=True)
    histories = []
    for p, out, nxt in zip(prompts, np.asarray(first).tolist(), turn2):
        made = out[: out.index(eos) + 1] if eos in out else out  # the eos is part of the history
        histories.append(list(p) + made + nxt)
    want, want_scores = generate(model, histories, n2, temperature=0.0, return_scores=True)
    np.testing.assert_array_equal(np.asarray(second), np.asarray(want))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(want_scores), rtol=1e-4, atol=1e-4)
    return first


@pytest.mark.parametrize("prefill_chunk", [None, 2])
def test_return_cache_continues_like_one_long_generate(model, reference, prefill_chunk):
    eos = reference[0][0][1]  # row 0 stops after its second token: padding follows it in the loop
    first = _continue_vs_one_long_generate(model, PROMPTS, 4, 5, eos, prefill_chunk=prefill_chunk)
    assert np.asarray(first[0]).tolist()[:3] == reference[0][0][:2] + [0]


def test_return_cache_with_attention_layers_and_cache_length():
    model = make_model(seed=2, n_layer=2, attn_layer_idx=(1,), attn_num_heads=2)
    greedy = np.asarray(generate(model, PROMPTS, 4, temperature=0.0)).tolist()
    _continue_vs_one_long_generate(model, PROMPTS, 4, 5, greedy[1][1], cache_length=32)
    # without room for the second turn the continuation says so
    _, cache = generate(model, PROMPTS, 4, temperature=0.0, return_cache=True)
    with pytest.raises(ValueError, match="free slots"):
        generate(model, [[1] * 20] * 3, 16, temperature=0.0, cache=cache)
    with pytest.raises(ValueError, match=r"cache_length=4 is less than the"):
        generate(model, PROMPTS, 4, temperature=0.0, return_cache=True, cache_length=4)


def test_return_cache_without_new_tokens_holds_the_whole_prompt(model):
    ids = jnp.asarray([PROMPTS[0], PROMPTS[0][::-1]], jnp.int32)
    tokens, cache = generate(model, ids, 0, temperature=0.0, return_cache=True)
    assert tokens.shape == (2, 0)
    _, want = model(ids, cache=model.init_cache(2))
    chex.assert_trees_all_close(cache, want, rtol=1e-5, atol=1e-6)


def test_generation_config_is_frozen_and_normalises_eos():
    cfg = GenerationConfig(max_new_tokens=3, eos_token_id=[4, 5])
    assert cfg.eos_token_id == (4, 5) and GenerationConfig(max_new_tokens=1, eos_token_id=7).eos_token_id == (7,)
    assert GenerationConfig(max_new_tokens=1, eos_token_id=None).eos_token_id == ()
    assert GenerationConfig(max_new_tokens=1, top_k=1).greedy and not GenerationConfig(max_new_tokens=1).greedy
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.temperature = 0.0
    with pytest.raises(ValueError, match="cache_length=0"):
        GenerationConfig(max_new_tokens=1, cache_length=0)
    with pytest.raises(TypeError, match="return_cache=1"):
        GenerationConfig(max_new_tokens=1, return_cache=1)
    with pytest.raises(ValueError, match=r"pad_token_id=300 must be an int in \[0, 256\)"):
        GenerationConfig(max_new_tokens=1, pad_token_id=300).check_vocab(256)


def test_the_function_does_not_shadow_its_module():
    assert callable(mj.generate) and mj.generate is generate
    assert mj.generate.__module__ == "mamba_jax.generation.decode"
    with pytest.raises(ImportError, match="is the command line"):
        import mamba_jax.generate  # noqa: F401 - importing it is what raises
    assert callable(mj.generate)  # still the function
    proc = subprocess.run([sys.executable, "-m", "mamba_jax.generate", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--checkpoint" in proc.stdout, proc.stderr
