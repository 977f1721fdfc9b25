"""Data generators: shapes, answers recoverable by a NumPy oracle, no leakage, randomness, determinism."""

import gzip

import jax
import numpy as np
import pytest

from mamba_jax.data import SEPARATOR, ByteCorpus, induction_heads, mqar, selective_copying


def as_numpy(batch):
    return tuple(np.asarray(batch[k]) for k in ("inputs", "targets", "weights"))


def check_format(batch, shape):
    inputs, targets, weights = as_numpy(batch)
    assert inputs.shape == targets.shape == weights.shape == shape
    assert inputs.dtype == targets.dtype == np.int32 and weights.dtype == np.float32
    return inputs, targets, weights


def assert_same(a, b):
    for x, y in zip(as_numpy(a), as_numpy(b)):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- selective copying


def test_selective_copying_invariants():
    batch = selective_copying(jax.random.key(0), 64, 30, 5, 10)
    inputs, targets, weights = check_format(batch, (64, 35))
    context, markers = inputs[:, :30], inputs[:, 30:]
    assert np.all(markers == 9) and np.all(context != 9)  # markers only after the context
    for row in range(64):
        data = context[row][context[row] != 0]
        assert len(data) == 5 and np.all((data >= 1) & (data <= 8))
        np.testing.assert_array_equal(targets[row, 30:], data)  # the answer is recoverable, in order
    assert np.all(weights[:, :30] == 0) and np.all(weights[:, 30:] == 1)
    positions = [tuple(np.nonzero(context[r])[0]) for r in range(64)]
    assert len(set(positions)) > 50  # random spacing, not a fixed pattern
    with pytest.raises(ValueError, match="n_tokens=31"):
        selective_copying(jax.random.key(0), 1, 30, 31)


# ---------------------------------------------------------------- induction heads


def test_induction_heads_invariants():
    b, L, V = 256, 40, 8
    batch = induction_heads(jax.random.key(0), b, L, V)
    inputs, targets, weights = check_format(batch, (b, L))
    special = V - 1
    assert np.all((inputs >= 0) & (inputs < V))
    assert np.all((inputs == special).sum(axis=1) == 2)  # once as trigger, once as the last input
    assert np.all(inputs[:, -1] == special)
    trigger = (inputs == special).argmax(axis=1)  # the first special token
    assert np.all(trigger <= L - 4)
    np.testing.assert_array_equal(targets[:, -1], inputs[np.arange(b), trigger + 1])  # the oracle
    assert np.all(targets[:, -1] != special)
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])  # true next tokens elsewhere
    expected = np.zeros((b, L), np.float32)
    expected[:, -1] = 1
    np.testing.assert_array_equal(weights, expected)  # scored at the last position only
    assert len(set(trigger.tolist())) > 25 and len(set(targets[:, -1].tolist())) == V - 1  # random
    assert trigger.min() == 0 and trigger.max() == L - 4  # the whole range is reached


def test_induction_heads_deterministic_jittable_and_validated():
    key = jax.random.key(3)
    jitted = jax.jit(induction_heads, static_argnums=(1, 2, 3))
    assert_same(induction_heads(key, 4, 16), jitted(key, 4, 16, 16))
    other = induction_heads(jax.random.key(4), 4, 16)
    assert not np.array_equal(induction_heads(key, 4, 16)["inputs"], other["inputs"])
    with pytest.raises(ValueError, match="seq_len=3"):
        induction_heads(key, 1, 3)
    with pytest.raises(ValueError, match="vocab_size=2"):
        induction_heads(key, 1, 16, 2)


def test_induction_heads_long_sequences_cost_linear_in_length():
    """No wall clock: the compiled generator's work and scratch memory grow linearly with L."""
    fn = jax.jit(induction_heads, static_argnums=(1, 2, 3))

    def cost(length):
        compiled = fn.lower(jax.random.key(0), 8, length, 16).compile()
        flops = compiled.cost_analysis()
        flops = (flops[0] if isinstance(flops, (list, tuple)) else flops)["flops"]
        return flops, compiled.memory_analysis().temp_size_in_bytes

    (f1, m1), (f2, m2) = cost(2**12), cost(2**16)
    assert f2 <= 1.1 * 16 * f1 and m2 <= 1.1 * 16 * m1, (f1, f2, m1, m2)  # 16x the length: ~16x, not 256x
    L = 2**16
    batch = jax.block_until_ready(fn(jax.random.key(1), 8, L, 16))
    inputs, targets, _ = as_numpy(batch)
    assert np.all((inputs == 15).sum(axis=1) == 2)
    trigger = (inputs == 15).argmax(axis=1)
    np.testing.assert_array_equal(targets[:, -1], inputs[np.arange(8), trigger + 1])


# ---------------------------------------------------------------- MQAR


def mqar_oracle(inputs, n):
    """For each row: {query position: expected value}, from the key-value prefix alone."""
    answers = []
    for row in inputs:
        table = dict(zip(row[0 : 2 * n : 2].tolist(), row[1 : 2 * n : 2].tolist()))
        answers.append(table)
    return answers


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_mqar_invariants(random_non_queries):
    b, L, n, V = 128, 64, 8, 256
    batch = mqar(jax.random.key(0), b, L, n, V, random_non_queries=random_non_queries)
    inputs, targets, weights = check_format(batch, (b, L))
    keys, values = inputs[:, 0 : 2 * n : 2], inputs[:, 1 : 2 * n : 2]
    assert np.all((keys >= 1) & (keys < V // 2)) and np.all((values >= V // 2) & (values < V))
    assert all(len(set(r)) == n for r in keys.tolist()) and all(len(set(r)) == n for r in values.tolist())
    assert np.all((inputs >= 0) & (inputs < V))
    assert np.all(weights[:, : 2 * n] == 0)  # queries only after the prefix
    assert np.all(weights.sum(axis=1) == n) and set(np.unique(weights).tolist()) == {0.0, 1.0}
    tables = mqar_oracle(inputs, n)
    for row in range(b):
        scored = np.nonzero(weights[row])[0]
        assert np.all((scored - 2 * n) % 2 == 0)  # at 2n + 2 * gap
        queried = inputs[row, scored]
        assert sorted(queried.tolist()) == sorted(keys[row].tolist())  # every key queried once
        np.testing.assert_array_equal(targets[row, scored], [tables[row][k] for k in queried.tolist()])
        assert not np.any(targets[row, scored] == inputs[row, scored])  # the answer is not the input
    assert np.all(targets[weights == 0] == 0)
    filler = np.ones((b, L), bool)
    filler[:, : 2 * n] = False
    filler[weights == 1] = False
    if random_non_queries:
        assert len(np.unique(inputs[filler])) > V // 2
    else:
        assert np.all(inputs[filler] == 0)
    positions = {tuple(np.nonzero(weights[r])[0]) for r in range(b)}
    assert len(positions) > b // 2  # query positions vary across rows


def test_mqar_power_law_gaps():
    b, L, n = 256, 256, 4
    first_query = lambda a: (np.asarray(mqar(jax.random.key(1), b, L, n, 512, power_a=a)["weights"]).argmax(axis=1))
    near, uniform = first_query(0.01), first_query(1.0)
    assert near.mean() < uniform.mean() - 20  # small power_a puts queries close to the prefix
    assert near.max() <= L - 2 and uniform.max() <= L - 2


def test_mqar_deterministic_jittable_and_validated():
    key = jax.random.key(5)
    jitted = jax.jit(mqar, static_argnums=(1, 2, 3, 4, 6))  # power_a traced
    assert_same(mqar(key, 4, 64, 4, 128), jitted(key, 4, 64, 4, 128, 0.01, True))
    assert not np.array_equal(mqar(key, 4, 64, 4, 128)["inputs"], mqar(jax.random.key(6), 4, 64, 4, 128)["inputs"])
    check_format(mqar(key, 2, 33, 8, 64), (2, 33))  # odd length, the tightest num_kv_pairs
    with pytest.raises(ValueError, match="seq_len=31"):
        mqar(key, 1, 31, 8)
    with pytest.raises(ValueError, match="num_kv_pairs=0"):
        mqar(key, 1, 32, 0)
    with pytest.raises(ValueError, match="num_kv_pairs=8"):
        mqar(key, 1, 64, 8, vocab_size=16)
    with pytest.raises(ValueError, match="power_a=0"):
        mqar(key, 1, 64, 8, power_a=0.0)


# ---------------------------------------------------------------- byte corpus


@pytest.fixture(scope="module")
def corpus():
    return ByteCorpus.from_stdlib(max_bytes=2_000_000, held_out_fraction=0.1, include_gcide=False)


def test_corpus_split_is_disjoint_by_file(corpus):
    assert corpus.train.dtype == corpus.held_out.dtype == np.uint8
    assert corpus.train.size > 0 and corpus.held_out.size > 0
    assert corpus.num_bytes == corpus.train.size + corpus.held_out.size <= 2_000_000
    assert corpus.held_out.size == 200_000
    assert not set(corpus.train_names) & set(corpus.held_out_names)
    assert all(n.startswith("stdlib/") and n.endswith(".py") for n in corpus.train_names + corpus.held_out_names)
    assert not any("site-packages" in n or "/test/" in n for n in corpus.train_names)
    # documents joined by the separator, which the sources never contain
    assert (corpus.train == SEPARATOR).sum() == len(corpus.train_names) - 1
    assert (corpus.held_out == SEPARATOR).sum() == len(corpus.held_out_names) - 1
    [source] = corpus.sources
    assert source["name"] == "python-stdlib" and source["train_bytes"] == corpus.train.size
    # the split of a file does not depend on the cap
    small = ByteCorpus.from_stdlib(max_bytes=300_000, held_out_fraction=0.1, include_gcide=False)
    assert small.held_out_names == corpus.held_out_names[: len(small.held_out_names)]
    assert small.train_names == corpus.train_names[: len(small.train_names)]
    assert ByteCorpus.from_stdlib(max_bytes=300_000, held_out_fraction=0.1).fingerprint == small.fingerprint
    assert small.fingerprint != corpus.fingerprint and len(corpus.fingerprint) == 64


def test_corpus_reads_gcide_when_present(tmp_path):
    path = tmp_path / "gcide.dict.dz"
    text = b"".join(b"Word%05d\n   A definition of word %d.\n" % (i, i) for i in range(20_000))
    path.write_bytes(gzip.compress(text))
    c = ByteCorpus.from_stdlib(held_out_fraction=0.3, gcide_path=path)
    names = [s["name"] for s in c.sources]
    assert names == ["python-stdlib", "gcide"]
    assert any(n.startswith("gcide/") for n in c.train_names) and any(n.startswith("gcide/") for n in c.held_out_names)
    gcide = bytes(c.train[c.train.size - c.sources[1]["train_bytes"] + 1 :])  # after the separator
    assert text.find(gcide[:1000]) >= 0
    without = ByteCorpus.from_stdlib(max_bytes=100_000, gcide_path=tmp_path / "absent.dz")
    assert [s["name"] for s in without.sources] == ["python-stdlib"]


def test_corpus_sample_batch_windows_line_up(corpus):
    for key in (jax.random.key(0), np.random.default_rng(0)):
        batch = corpus.sample_batch(key, 16, 128)
        inputs, targets, weights = check_format(batch, (16, 128))
        np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
        assert np.all(weights == 1) and np.all((inputs >= 0) & (inputs < 256))
        text = corpus.train.tobytes()
        for row in range(16):
            window = bytes(inputs[row].astype(np.uint8)) + bytes([targets[row, -1]])
            assert text.find(window) >= 0
        assert len({bytes(r.astype(np.uint8)) for r in inputs}) == 16
    assert_same(corpus.sample_batch(jax.random.key(7), 4, 32), corpus.sample_batch(jax.random.key(7), 4, 32))
    assert_same(
        corpus.sample_batch(np.random.default_rng(7), 4, 32, "held_out"),
        corpus.sample_batch(np.random.default_rng(7), 4, 32, "held_out"),
    )
    with pytest.raises(ValueError, match="split='test'"):
        corpus.sample_batch(jax.random.key(0), 1, 8, split="test")
    with pytest.raises(ValueError, match="seq_len=0"):
        corpus.sample_batch(jax.random.key(0), 1, 0)


def test_corpus_eval_batches_cover_held_out_once(corpus):
    data = corpus.held_out
    batches = list(corpus.eval_batches(seq_len=1000, batch_size=8))
    assert len(batches) == -(-(data.size - 1) // 8000)
    for batch in batches:
        check_format(batch, (8, 1000))
    inputs, targets, weights = (np.concatenate([b[k].ravel() for b in batches]) for k in ("inputs", "targets", "weights"))
    assert weights.sum() == data.size - 1
    assert np.all(weights[: data.size - 1] == 1) and np.all(weights[data.size - 1 :] == 0)
    np.testing.assert_array_equal(inputs[: data.size - 1], data[:-1])  # contiguous, in order, no overlap
    np.testing.assert_array_equal(targets[: data.size - 1], data[1:])
    again = list(corpus.eval_batches(seq_len=1000, batch_size=8, max_batches=2))
    assert len(again) == 2
    assert_same(again[1], batches[1])
