"""Packed documents (``model(ids, seq_idx=...)``) for every layer type: each document
gets the logits it gets alone, in one call and continued from a cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOL, rel_err
from flax import nnx

import mamba_jax as mj

CONFIGS = {
    "mamba1": dict(d_model=16, n_layer=2, vocab_size=32),
    "mamba1_hybrid_mlp": dict(d_model=16, n_layer=3, vocab_size=32, attn_layer_idx=(1,), attn_num_heads=2,
                              d_intermediate=32),
    "mamba2_hybrid": dict(d_model=16, n_layer=2, vocab_size=32, layer="mamba2", d_state=8, headdim=8, chunk_size=8,
                          attn_layer_idx=(1,), attn_num_heads=2),
    "mamba2attn": dict(d_model=16, n_layer=2, vocab_size=32, layer="mamba2", d_state=8, headdim=8, chunk_size=8,
                       attn_layer_idx=(1,), attn_num_heads=2, attn_d_conv=4),
}
LENGTHS = [[1, 6, 2, 11], [20]]  # one-token documents, one crossing the Mamba-2 chunk


def _docs(lengths):
    return np.stack([np.repeat(np.arange(len(r)) * 2, r) for r in lengths])  # ids 0, 2, 4, ... (not 0..k-1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_documents_equal_each_alone(name):
    cfg = mj.MambaConfig(**CONFIGS[name])
    model = mj.MambaLM(cfg, rngs=nnx.Rngs(3))
    ids = jax.random.randint(jax.random.key(1), (2, 20), 0, cfg.vocab_size)
    seq_idx = jnp.asarray(_docs(LENGTHS), jnp.int32)
    packed = jax.jit(lambda i, s: model(i, seq_idx=s))(ids, seq_idx)
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for m in lengths:
            alone = model(ids[row : row + 1, start : start + m])
            assert rel_err(packed[row : row + 1, start : start + m], alone) < TOL["float32"], (name, row, start)
            start += m
    # From a cache, split inside the third document of row 0: the second call's first
    # document continues, and nothing of the earlier documents reaches it.
    cache = model.init_cache(2, max_length=20)
    first, cache = model(ids[:, :8], cache=cache, seq_idx=seq_idx[:, :8])
    second, _ = model(ids[:, 8:], cache=cache, seq_idx=seq_idx[:, 8:])
    assert rel_err(jnp.concatenate([first, second], axis=1), packed) < TOL["float32"], name


def test_packed_byte_batches_train_and_evaluate_per_document():
    """ByteCorpus(packed=True) marks a new document at every separator, and the train
    and eval steps score a packed batch exactly as its documents scored one by one."""
    from mamba_jax.data import ByteCorpus
    from mamba_jax.data.text import SEPARATOR
    from mamba_jax.train import _grads_and_metrics, eval_step

    docs = [(f"doc{i}", bytes(np.random.default_rng(i).integers(1, 256, 5 + 3 * i, dtype=np.uint8))) for i in range(12)]
    corpus = ByteCorpus.from_documents(docs, held_out_fraction=0.0)
    batch = corpus.sample_batch(np.random.default_rng(0), 2, 24, packed=True)
    inputs, seq_idx = batch["inputs"], batch["seq_idx"]
    assert np.array_equal(seq_idx, np.cumsum(inputs == SEPARATOR, axis=1))
    assert (np.diff(seq_idx, axis=1) > 0).any()  # the windows do cross documents
    cfg = mj.MambaConfig(d_model=16, n_layer=2, vocab_size=256, attn_layer_idx=(1,), attn_num_heads=2)
    model = mj.MambaLM(cfg, rngs=nnx.Rngs(0))
    # The oracle: every document of every row scored alone (summed token losses / tokens).
    total = 0.0
    for row in range(2):
        for doc in np.unique(seq_idx[row]):
            cols = np.flatnonzero(seq_idx[row] == doc)
            logp = jax.nn.log_softmax(model(jnp.asarray(inputs[row : row + 1, cols])).astype(jnp.float32))
            total += -float(jnp.take_along_axis(logp[0], jnp.asarray(batch["targets"][row, cols])[:, None], -1).sum())
    expected = total / inputs.size
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    assert abs(float(eval_step(model, jbatch)["loss"]) - expected) < 1e-5 * expected
    _, metrics = _grads_and_metrics(model, jbatch)
    assert abs(float(metrics["loss"]) - expected) < 1e-5 * expected
    ids = jnp.asarray(inputs)  # the control: the ids change what the model computes
    assert rel_err(model(ids, seq_idx=jnp.asarray(seq_idx)), model(ids)) > 1e-3
