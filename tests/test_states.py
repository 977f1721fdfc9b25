"""mamba_jax.states: save/load/resume, fingerprints, stack/select, snapshots, composition, probes, library."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import _linear, _np64, _rms_norm, _silu, random_model, rel_err, selective_scan_oracle

import mamba_jax as mj
from mamba_jax import states
from mamba_jax.states import facts, library, probes


CONFIGS = {
    "mamba1": dict(d_model=16, n_layer=2, d_state=4, vocab_size=40),
    "mamba2": dict(d_model=32, n_layer=2, vocab_size=40, layer="mamba2", d_state=8, headdim=16, ngroups=2, chunk_size=8),
    "hybrid": dict(d_model=16, n_layer=3, d_state=4, vocab_size=40, attn_layer_idx=(1,), attn_num_heads=2),
}


@functools.lru_cache(maxsize=None)
def _cached_model(kind, seed, kw):
    return random_model(mj.MambaConfig(**{**CONFIGS[kind], **dict(kw)}), seed)


def _model(kind, seed=0, **kw):
    """A random model, shared between tests (tests that change parameters build their own)."""
    return _cached_model(kind, seed, tuple(sorted(kw.items())))


def _ids(shape, seed=0, vocab=40):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def _prefill(model, ids, max_length=None):
    cache = model.init_cache(ids.shape[0], max_length)
    return model(ids, cache=cache)[1]


def _assert_bitwise(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------- save / load / resume


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_save_load_roundtrip_bitwise(kind, tmp_path):
    model = _model(kind)
    cache = _prefill(model, _ids((2, 11)), max_length=32 if kind == "hybrid" else None)
    path = states.save(tmp_path / "s", cache, model, metadata={"tokens": 11})
    assert path.suffix == ".npz"
    _assert_bitwise(states.load(path, model), cache)
    header = states.read_header(path)
    assert header["metadata"] == {"tokens": 11} and header["batch_size"] == 2


def test_save_load_bfloat16_conv_state(tmp_path):
    cfg = mj.MambaConfig(**CONFIGS["mamba1"])
    model = mj.MambaLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    cache = _prefill(model, _ids((1, 7)))
    assert cache.layers[0].conv_state.dtype == jnp.bfloat16
    _assert_bitwise(states.load(states.save(tmp_path / "b.npz", cache, model), model), cache)


@pytest.mark.parametrize("kind,split", [("mamba1", 1), ("mamba1", 9), ("mamba2", 9), ("hybrid", 2)])
def test_generation_resumed_from_loaded_state_equals_uninterrupted(kind, split, tmp_path):
    """Greedy tokens after prompt[:split] -> save -> load -> prompt[split:] equal one run over the whole prompt."""
    model = _model(kind, seed=1)
    prompt = _ids((2, 12), seed=3)
    hybrid = kind == "hybrid"
    kw = dict(cache_length=64) if hybrid else {}
    whole = mj.generate(model, prompt, 6, temperature=0.0, **kw)
    cache = _prefill(model, prompt[:, :split], max_length=64 if hybrid else None)
    loaded = states.load(states.save(tmp_path / "c.npz", cache, model), model)
    resumed = mj.generate(model, prompt[:, split:], 6, temperature=0.0, cache=loaded)
    np.testing.assert_array_equal(np.asarray(resumed), np.asarray(whole))


def test_load_refuses_another_configuration(tmp_path):
    model = _model("mamba1")
    path = states.save(tmp_path / "a.npz", _prefill(model, _ids((1, 5))), model)
    other = _model("mamba1", d_state=8)
    with pytest.raises(states.StateMismatchError, match=r"d_state: saved 4, model 8"):
        states.load(path, other)
    with pytest.raises(ValueError, match="layer: saved 'mamba1', model 'mamba2'"):  # a ValueError subclass
        states.load(path, _model("mamba2"))


def test_load_refuses_other_parameters_naming_them(tmp_path):
    model = _model("mamba1")
    cache = _prefill(model, _ids((1, 5)))
    path = states.save(tmp_path / "a.npz", cache, model)
    tweaked = random_model(mj.MambaConfig(**CONFIGS["mamba1"]), 0)
    tweaked.layers[1].mixer.A_log[...] = tweaked.layers[1].mixer.A_log[...] + 1e-3
    with pytest.raises(states.StateMismatchError, match=r"1 of \d+ tensors differ \(layers/1/mixer/A_log\)"):
        states.load(path, tweaked)
    with pytest.raises(states.StateMismatchError, match="other parameters"):
        states.load(path, _model("mamba1", seed=5))
    _assert_bitwise(states.load(path, tweaked, check_params=False), cache)  # deliberately allowed


def test_load_refuses_damaged_or_foreign_files(tmp_path):
    model = _model("mamba1")
    path = states.save(tmp_path / "a.npz", _prefill(model, _ids((1, 5))), model)
    with np.load(path) as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["layers/0/ssm_state"].reshape(-1)[3] ^= 1  # one flipped bit
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(states.CorruptStateError, match="content hash"):
        states.load(tmp_path / "bad.npz", model)
    np.savez(tmp_path / "foreign.npz", x=np.zeros(3))
    with pytest.raises(states.CorruptStateError, match="no header"):
        states.load(tmp_path / "foreign.npz", model)
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(states.CorruptStateError, match="not a state file"):
        states.load(tmp_path / "text.npz", model)
    with pytest.raises(FileNotFoundError):
        states.load(tmp_path / "missing.npz", model)
    with pytest.raises(TypeError, match="cache must be a MambaCache"):
        states.save(tmp_path / "x.npz", {"a": 1}, model)


# --------------------------------------------------------------------------- stack / select


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_stack_select_repeat(kind):
    model = _model(kind)
    ml = 16 if kind == "hybrid" else None
    ids = _ids((3, 6), seed=2)
    batched = _prefill(model, ids, ml)
    rows = [_prefill(model, ids[i : i + 1], ml) for i in range(3)]
    stacked = states.stack(rows)
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(batched)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-5, atol=1e-6)
    _assert_bitwise(states.select(stacked, [2, 0]), states.stack([rows[2], rows[0]]))
    _assert_bitwise(states.select(stacked, 1), rows[1])
    _assert_bitwise(states.select(stacked, -1), rows[2])
    assert [c.batch_size for c in states.unstack(stacked)] == [1, 1, 1]
    forks = states.repeat(rows[0], 4)
    assert forks.batch_size == 4
    _assert_bitwise(states.select(forks, 3), rows[0])
    # a state continues the same way in a batch as alone
    nxt = _ids((3, 2), seed=9)
    la, _ = model(nxt, cache=stacked)
    lb, _ = model(nxt[1:2], cache=rows[1])
    np.testing.assert_allclose(np.asarray(la[1]), np.asarray(lb[0]), rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError, match="out of range"):
        states.select(stacked, 3)
    with pytest.raises(ValueError, match="non-empty"):
        states.select(stacked, [])


def test_stack_refuses_other_models():
    a = _prefill(_model("mamba1"), _ids((1, 4)))
    b = _prefill(_model("mamba1", d_state=8), _ids((1, 4)))
    with pytest.raises(ValueError, match="per-row shapes and dtypes must agree"):
        states.stack([a, b])
    with pytest.raises(ValueError, match="other layer kinds"):
        states.stack([a, _prefill(_model("hybrid"), _ids((1, 4)), 8)])


# --------------------------------------------------------------------------- snapshots


def _layer0_state_oracle(model, ids):
    """Layer 0's SSM state after ``ids`` from the equations in float64 (Mamba-1)."""
    cfg = model.config
    p = nnx.to_pure_dict(nnx.state(model))
    lp = p["layers"][0]
    x = _rms_norm(_np64(p["embedding"]["embedding"])[np.asarray(ids)], lp["norm"]["weight"], cfg.norm_epsilon)
    m = lp["mixer"]
    d, n, r, k = cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank, cfg.d_conv
    u = _linear(m["in_proj"], x)[..., :d]
    w = _np64(m["conv1d"]["kernel"])
    padded = np.concatenate([np.zeros((u.shape[0], k - 1, d)), u], 1)
    u = _silu(sum(w[j] * padded[:, j : j + u.shape[1]] for j in range(k)) + _np64(m["conv1d"]["bias"]))
    x_dbl = u @ _np64(m["x_proj"]["kernel"])
    dt = x_dbl[..., :r] @ _np64(m["dt_proj"]["kernel"])
    _, h = selective_scan_oracle(u, dt, -np.exp(_np64(m["A_log"])), x_dbl[..., r : r + n], x_dbl[..., r + n :],
                                 delta_bias=m["dt_proj"]["bias"], delta_softplus=True, as_float64=True)
    return h, dt


@pytest.mark.parametrize("kind,every,length", [("mamba1", 4, 16), ("mamba1", 5, 23), ("mamba2", 5, 23)])
def test_snapshots_equal_parallel_forward_states(kind, every, length):
    model = _model(kind)
    ids = _ids((2, length), seed=4)
    snaps = states.prefill_snapshots(model, ids, every)
    assert snaps.positions == tuple(range(every, length + 1, every))
    for i, t in enumerate(snaps.positions):
        ref = _prefill(model, ids[:, :t])  # one parallel call over the first t tokens
        got = snaps.at(i)
        for a, b in zip(got.layers, ref.layers):
            assert rel_err(a.ssm_state, b.ssm_state) < 1e-5
            assert rel_err(a.conv_state, b.conv_state) < 1e-6
        if kind == "mamba1":
            assert rel_err(got.layers[0].ssm_state, _layer0_state_oracle(model, ids[:, :t])[0]) < 1e-5
    full = _prefill(model, ids)
    for a, b in zip(snaps.final.layers, full.layers):
        assert rel_err(a.ssm_state, b.ssm_state) < 1e-5
    along = states.along_sequence(snaps, 1)
    assert along.batch_size == len(snaps)
    np.testing.assert_array_equal(np.asarray(along.layers[0].ssm_state[0]), np.asarray(snaps.at(0).layers[0].ssm_state[1]))
    assert snaps.nbytes() == len(snaps) * full.nbytes()


def test_snapshots_argument_errors():
    model = _model("mamba1")
    with pytest.raises(ValueError, match="every=0 must be a positive int"):
        states.prefill_snapshots(model, _ids((1, 8)), 0)
    with pytest.raises(ValueError, match="longer than the prompt"):
        states.prefill_snapshots(model, _ids((1, 8)), 9)


# --------------------------------------------------------------------------- composition


@pytest.mark.parametrize("kind,len_b", [("mamba1", 2), ("mamba1", 9), ("mamba2", 9)])
def test_one_layer_composition_identity(kind, len_b):
    """State after A then B == P_B * h_A + h_B(from zero), against running the concatenation."""
    model = _model(kind, n_layer=1)
    a, b = _ids((2, 10), seed=5), _ids((2, len_b), seed=6)
    after_a = _prefill(model, a)
    exact = _prefill(model, jnp.concatenate([a, b], 1))  # one parallel call over A+B
    seg = states.segment(model, b, start=after_a)
    composed = states.compose(after_a, seg)
    assert states.layer_errors(composed, exact)[0] < 1e-5
    np.testing.assert_allclose(np.asarray(composed.layers[0].conv_state), np.asarray(exact.layers[0].conv_state),
                               rtol=1e-6, atol=1e-6)
    assert float(jnp.max(seg.decay[0])) <= 1.0 + 1e-6 and float(jnp.min(seg.decay[0])) >= -1e-6
    # continuing from the composed state gives the concatenation's logits
    nxt = _ids((2, 3), seed=7)
    np.testing.assert_allclose(np.asarray(model(nxt, cache=composed)[0]), np.asarray(model(nxt, cache=exact)[0]),
                               rtol=1e-4, atol=1e-4)


def test_segment_decay_equals_oracle_decay_product():
    """Mamba-1: P_B = exp(A * sum_t delta_t) per (d, n), from the float64 recurrence's deltas."""
    model = _model("mamba1", n_layer=1)
    ids = _ids((2, 7), seed=8)
    seg = states.segment(model, ids)
    _, dt = _layer0_state_oracle(model, ids)
    p = nnx.to_pure_dict(nnx.state(model))["layers"][0]["mixer"]
    delta = np.logaddexp(0.0, dt + _np64(p["dt_proj"]["bias"]))  # (b, l, d)
    want = np.exp(delta.sum(1)[..., None] * -np.exp(_np64(p["A_log"])))
    np.testing.assert_allclose(np.asarray(seg.decay[0]), want, rtol=2e-5, atol=1e-6)
    hl = states.measured_half_lives(seg.decay[0], 7)
    want_hl = 7 * math.log(2) / -np.log(np.clip(want, 1e-300, 1)).mean(0)
    resolved = (want > 1e-3).all(0)  # the difference of two float32 states resolves decays down to ~1e-6 only
    assert resolved.sum() > 20
    np.testing.assert_allclose(hl[resolved], want_hl[resolved], rtol=1e-3)


def test_deeper_layers_compose_only_approximately():
    model = _model("mamba1", n_layer=3)
    a, b = _ids((2, 10), seed=5), _ids((2, 6), seed=6)
    after_a = _prefill(model, a)
    exact = _prefill(model, jnp.concatenate([a, b], 1))
    errs = states.layer_errors(states.compose(after_a, states.segment(model, b, start=after_a)), exact)
    assert errs[0] < 1e-5 and max(errs[1:]) > 1e-3, errs


def test_mix_take_layers_and_attention_refusal():
    model = _model("mamba1", n_layer=3)
    x, y = _prefill(model, _ids((1, 5), seed=1)), _prefill(model, _ids((1, 5), seed=2))
    m = states.mix([x, y], [0.25, 0.75])
    np.testing.assert_allclose(np.asarray(m.layers[2].ssm_state),
                               0.25 * np.asarray(x.layers[2].ssm_state) + 0.75 * np.asarray(y.layers[2].ssm_state),
                               rtol=1e-6)
    t = states.take_layers(x, y, [1])
    assert t.layers[1] is y.layers[1] and t.layers[0] is x.layers[0]
    with pytest.raises(ValueError, match="as many weights"):
        states.mix([x, y], [1.0])
    with pytest.raises(ValueError, match="must lie in"):
        states.take_layers(x, y, [3])
    hyb = _model("hybrid")
    h = _prefill(hyb, _ids((1, 4)), 8)
    with pytest.raises(ValueError, match="layer 1 is an attention layer"):
        states.mix([h, h], [0.5, 0.5])
    with pytest.raises(ValueError, match="attention layer"):
        states.segment(hyb, _ids((1, 3)), start=h)


# --------------------------------------------------------------------------- probes


def test_half_lives_from_parameters():
    model = _model("mamba1")
    hl = states.half_lives(model)
    m = model.layers[0].mixer
    dt = np.logaddexp(0, np.asarray(m.dt_proj.bias[...], np.float64))
    np.testing.assert_allclose(hl[0], math.log(2) / (dt[:, None] * np.exp(np.asarray(m.A_log[...], np.float64))), rtol=1e-6)
    hl2 = states.half_lives(_model("mamba2"))
    assert hl2[0].shape == (CONFIGS["mamba2"]["d_model"] * 2 // 16,)
    assert states.half_lives(_model("hybrid"))[1] is None


def test_ridge_probes_recover_linear_signals_and_fail_on_noise():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 20))
    w = rng.standard_normal(20)
    y_reg = x @ w
    y_cls = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0)
    assert probes.ridge_regressor(x[:300], y_reg[:300], x[300:], y_reg[300:], alpha=1e-3) > 0.999
    assert probes.ridge_classifier(x[:300], y_cls[:300], x[300:], y_cls[300:]) > 0.85
    noise = rng.integers(0, 4, 400)
    assert probes.ridge_classifier(x[:300], noise[:300], x[300:], noise[300:]) < 0.45
    with pytest.raises(ValueError, match="labels"):
        probes.ridge_classifier(x, y_cls[:10], x, y_cls)


# --------------------------------------------------------------------------- library


def test_bm25_scores_match_the_formula():
    docs = [[1, 2, 3, 2], [4, 5, 6, 7], [1, 9, 9, 9]]
    bm = library.BM25(docs)
    s = bm.scores([2, 9])
    n, avg, k1, b = 3, 4.0, 1.5, 0.75
    idf = math.log(1 + (n - 1 + 0.5) / (1 + 0.5))
    want0 = idf * 2 * (k1 + 1) / (2 + k1 * (1 - b + b * 4 / avg))
    want2 = idf * 3 * (k1 + 1) / (3 + k1 * (1 - b + b * 4 / avg))
    np.testing.assert_allclose(s, [want0, 0.0, want2])
    bi = library.BM25(docs, bigrams=True)
    assert np.argmax(bi.scores([5, 6])) == 1 and bi.scores([6, 5])[1] < bi.scores([5, 6])[1]


def test_build_and_continue_all_match_direct_runs():
    model = _model("mamba1")
    docs = np.asarray(_ids((5, 8), seed=11))
    lib = library.build(model, docs, batch_size=2)  # 3 batches, the last one padded
    assert lib.batch_size == 5
    for i in range(5):
        ref = _prefill(model, jnp.asarray(docs[i : i + 1]))
        assert rel_err(states.select(lib, i).layers[1].ssm_state, ref.layers[1].ssm_state) < 1e-5
    queries = np.asarray(_ids((2, 3), seed=12))
    logprob, last = library.continue_all(model, lib, queries, batch_size=4)
    assert logprob.shape == (2, 5) and last.shape == (2, 5, model.config.padded_vocab_size)
    logits, _ = model(jnp.asarray(queries[1:2]), cache=states.select(lib, 3))
    lp = jax.nn.log_softmax(logits[0], -1)
    want = float(lp[0, queries[1, 1]] + lp[1, queries[1, 2]])
    assert abs(logprob[1, 3] - want) < 1e-4
    np.testing.assert_allclose(last[1, 3], np.asarray(logits[0, -1]), rtol=1e-5, atol=1e-5)
    one, _ = library.continue_all(model, lib, queries, state_rows=np.array([3, 0]))
    np.testing.assert_allclose(one[:, 0], [logprob[0, 3], logprob[1, 0]], rtol=1e-5)


def test_key_probe_reads_linear_keys():
    model = _model("mamba1")
    docs = np.asarray(_ids((64, 6), seed=13))
    lib = library.build(model, docs)
    labels = np.stack([(docs == t).any(1) for t in range(40)], 1).astype(float)
    probe = library.KeyProbe(layers=[0], alpha=1e-2).fit(lib, labels)
    assert probe.keys(lib).shape == (64, 40)
    with pytest.raises(ValueError, match="labels"):
        library.KeyProbe().fit(lib, labels[:3])


def test_fact_docs_have_distinct_keys_and_well_formed_facts():
    vocab = facts.FactVocab(key_alphabet=8, n_values=4, n_filler=5)
    docs = facts.make_docs(np.random.default_rng(0), vocab, 20, 16, 3)
    assert len(np.unique(docs.keys)) == 60
    for i in range(20):
        for j in range(3):
            p = docs.positions[i, j]
            assert docs.tokens[i, p] == facts.FACT
            np.testing.assert_array_equal(docs.tokens[i, p + 1 : p + 3], vocab.key_tokens(docs.keys[i, j]))
            assert docs.tokens[i, p + 3] == docs.values[i, j]
    assert (docs.tokens != facts.FACT).sum(1).min() == 16 - 3
    with pytest.raises(ValueError, match="distinct keys"):
        facts.make_docs(np.random.default_rng(0), vocab, 30, 16, 3)
    batch = facts.training_batch(np.random.default_rng(1), vocab, 4, 16, 2)
    w = batch["weights"][0]
    assert w.sum() == 6 and batch["targets"][0][np.flatnonzero(w)[2]] in range(vocab.value_start, vocab.filler_start)


def test_fact_task_curriculum_and_its_checks():
    task = facts.FactTaskConfig(steps=10, short_steps=4, short_doc_len=16, doc_len=32)
    assert [task.train_doc_len(s) for s in (0, 3, 4, 9)] == [16, 16, 32, 32]
    with pytest.raises(ValueError, match="short_steps"):
        facts.FactTaskConfig(steps=10, short_steps=11)
    with pytest.raises(ValueError, match="short_doc_len"):
        facts.FactTaskConfig(short_doc_len=8, train_facts_per_doc=3)
