# %% [markdown]
# # 06 · States: a library of document states, searched, against BM25 text retrieval
#
# **The question** (STATES-IDEAS 2.2, 2.3, 4.2): "maybe you go from rag to something more like
# State search": keep a state per document and ask "do I have any states that have what I
# need" instead of retrieving text and prefilling it again. When does it work, and what does
# it cost (tokens prefilled per query, latency, bytes stored per document)?
#
# **Task** (`mamba_jax.states.facts`): documents of DOC_LEN tokens of filler holding
# FACTS_PER_DOC facts `FACT k1 k2 v` (two-token keys, distinct across the library); a query is
# `QUERY k1 k2` and the answer is `v`. A small Mamba-1 is trained here on "document, then a
# query per fact" (the scored targets: the query's key tokens and the answer).
#
# **Methods** (one library of N documents, QUERIES questions each about one of them):
#
# | method | how the document is found | what is prefilled per query |
# |---|---|---|
# | oracle text | the right document | document + query |
# | oracle state | the right stored state | query |
# | no context | none | query |
# | BM25 (unigram / +bigram) | Okapi BM25 over the token ids | retrieved document + query |
# | state likelihood | argmax over states of log p(k1 k2 \| state, QUERY) | query x N states |
# | state confidence | argmax over states of the top next-token probability after the query | (same run) |
# | state key probe | ridge map state -> key-token scores, fit on other documents; one matrix product | query |
#
# Latency is wall time per query with the queries batched as each method allows, compile
# excluded, on a CPU shared with other jobs: compare methods within one N only.

# The fact model trains (or resumes) in `runs/states_fact_model` on the first of 06-08 that runs (about
# 7 minutes on 2 CPU cores); the others reuse it.

# %%
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fact_model, fact_model_flags, parse_args, save_figure, write_results

from mamba_jax import states
from mamba_jax.states import facts, library

NAME = "06_states_library"

# %% Hyperparameters
TASK = facts.FactTaskConfig()  # Mamba-1, d_model 64, 3 layers; 10k steps of batch 32 (6k on short documents)
NS = (16, 64, 256, 1024, 4096)  # library sizes
QUERIES = 512  # questions per library size (at most 2N)
PROBE_TRAIN_DOCS = 4096  # documents (not in the library) the key probe is fit on
PROBE_ALPHA = 10.0
ROW_BATCH = 1024  # (query, state) rows per forward call
SEED = 1

# %%
args = parse_args(NAME, __doc__, extra=fact_model_flags)
if args.quick:
    NS, QUERIES, PROBE_TRAIN_DOCS, ROW_BATCH = (8, 16), 8, 64, 64
TASK, model, model_step = fact_model(args, TASK)
vocab, V = TASK.vocab, TASK.vocab.size
rng = np.random.default_rng(SEED)
lib_docs = facts.make_docs(rng, vocab, max(NS), TASK.doc_len, TASK.facts_per_doc)
probe_docs = facts.make_docs(np.random.default_rng(SEED + 1), vocab, PROBE_TRAIN_DOCS, TASK.doc_len, TASK.facts_per_doc)


def timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def answer_text(doc_rows, keys, docs=lib_docs):
    """Prefill the given documents + queries (batched) -> greedy answers."""
    seq = np.concatenate([docs.tokens[doc_rows], facts.query_tokens(vocab, keys)], 1)
    logits, _ = states.run(model, seq, model.init_cache(len(seq)))
    return np.asarray(jnp.argmax(logits[:, -1, :V], -1))


# %% Build: every document's state (batched prefill), the probe's key index, the BM25 indexes
_ = library.build(model, lib_docs.tokens[:256], batch_size=256)  # compile
lib, build_s = timed(lambda: library.build(model, lib_docs.tokens, batch_size=256))
probe_states = library.build(model, probe_docs.tokens, batch_size=256)
kt = vocab.key_tokens(probe_docs.keys) - vocab.key_start  # (n, M, 2)
labels = np.zeros((PROBE_TRAIN_DOCS, 2 * vocab.key_alphabet))
for j in range(TASK.facts_per_doc):
    labels[np.arange(PROBE_TRAIN_DOCS), kt[:, j, 0]] = 1
    labels[np.arange(PROBE_TRAIN_DOCS), vocab.key_alphabet + kt[:, j, 1]] = 1
probe, probe_fit_s = timed(lambda: library.KeyProbe(alpha=PROBE_ALPHA).fit(probe_states, labels))
key_index, index_s = timed(lambda: probe.keys(lib))
state_bytes = states.nbytes_per_row(lib)
print(f"built {len(lib_docs)} states in {build_s:.1f} s ({state_bytes} bytes each); probe fit {probe_fit_s:.1f} s")

# %% Query the libraries
rows = []
for n in NS:
    sub = states.select(lib, list(range(n)))
    q = min(QUERIES, 2 * n)
    doc_of = rng.integers(0, n, q)
    fact_of = rng.integers(0, TASK.facts_per_doc, q)
    keys, answers = lib_docs.keys[doc_of, fact_of], lib_docs.values[doc_of, fact_of]
    queries = facts.query_tokens(vocab, keys)
    kt = vocab.key_tokens(keys) - vocab.key_start
    tokens_docs = lib_docs.tokens[:n]
    bm = {"bm25": library.BM25(tokens_docs), "bm25_bigram": library.BM25(tokens_docs, bigrams=True)}
    results = {}

    def record(method, chosen, answered, seconds, tokens, bytes_per_doc):
        results[method] = {
            "retrieval_accuracy": None if chosen is None else float((np.asarray(chosen) == doc_of).mean()),
            "answer_accuracy": float((np.asarray(answered) == answers).mean()),
            "latency_ms_per_query": 1000 * seconds / q,
            "tokens_prefilled_per_query": tokens,
            "bytes_per_doc": bytes_per_doc,
        }

    answer_text(doc_of, keys)  # compile
    ans, t = timed(lambda: answer_text(doc_of, keys))
    record("oracle_text", doc_of, ans, t, TASK.doc_len + 3, TASK.doc_len)
    library.continue_all(model, sub, queries, state_rows=doc_of, batch_size=q, vocab=V)
    (_, last), t = timed(lambda: library.continue_all(model, sub, queries, state_rows=doc_of, batch_size=q, vocab=V))
    record("oracle_state", doc_of, last[:, 0].argmax(-1), t, 3, state_bytes)
    empty = states.repeat(model.init_cache(1), q)
    logits, _ = states.run(model, queries, empty)
    record("no_context", None, np.asarray(jnp.argmax(logits[:, -1, :V], -1)), 0.0, 3, 0)
    for name, index in bm.items():
        def bm25_answer():
            chosen = np.array([np.argmax(index.scores(qq[1:])) for qq in queries])
            return chosen, answer_text(chosen, keys)

        (chosen, ans), t = timed(bm25_answer)
        record(name, chosen, ans, t, TASK.doc_len + 3, TASK.doc_len + index.nbytes() / n)
    library.continue_all(model, sub, queries[:1], batch_size=ROW_BATCH, vocab=V)  # compile
    (logprob, last), t = timed(lambda: library.continue_all(model, sub, queries, batch_size=ROW_BATCH, vocab=V))
    best = logprob.argmax(1)
    record("state_likelihood", best, last[np.arange(q), best].argmax(-1), t, 3 * n, state_bytes)
    conf = library.confidence(last)
    best = conf.argmax(1)
    record("state_confidence", best, last[np.arange(q), best].argmax(-1), t, 3 * n, state_bytes)

    def probe_answer():
        scores = key_index[:n][:, kt[:, 0]] + key_index[:n][:, vocab.key_alphabet + kt[:, 1]]  # (n, q)
        chosen = scores.argmax(0)
        _, last = library.continue_all(model, sub, queries, state_rows=chosen, batch_size=q, vocab=V)
        return chosen, last[:, 0].argmax(-1)

    (chosen, ans), t = timed(probe_answer)
    record("state_key_probe", chosen, ans, t, 3, state_bytes + 4 * 2 * vocab.key_alphabet)
    rows.append({"n_docs": n, "queries": q, "methods": results})
    print(f"N={n:5d}: " + "  ".join(f"{m} {r['answer_accuracy']:.2f}/{'-' if r['retrieval_accuracy'] is None else round(r['retrieval_accuracy'], 2)}"
                                    f" {r['latency_ms_per_query']:.1f}ms" for m, r in results.items()), flush=True)

# %% Results
in_context = facts.answer_accuracy(model, facts.make_docs(np.random.default_rng(99), vocab, 512 if not args.quick else 16,
                                                          TASK.doc_len, TASK.facts_per_doc), vocab)
write_results(args, NAME, {
    "model_trained_steps": model_step,
    "task": {"doc_len": TASK.doc_len, "facts_per_doc": TASK.facts_per_doc, "key_alphabet": vocab.key_alphabet,
             "n_values": vocab.n_values, "n_filler": vocab.n_filler, "vocab_size": vocab.size},
    "model": {"d_model": TASK.d_model, "n_layer": TASK.n_layer, "d_state": TASK.d_state, "layer": TASK.layer,
              "steps": TASK.steps, "batch_size": TASK.batch_size, "learning_rate": TASK.learning_rate},
    "hyperparameters": {"ns": list(NS), "queries": QUERIES, "probe_train_docs": PROBE_TRAIN_DOCS,
                        "probe_alpha": PROBE_ALPHA, "row_batch": ROW_BATCH, "seed": SEED},
    "in_context_answer_accuracy": in_context,
    "chance": 1.0 / vocab.n_values,
    "build": {"docs": len(lib_docs), "seconds": build_s, "ms_per_doc": 1000 * build_s / len(lib_docs),
              "state_bytes_per_doc": state_bytes, "text_bytes_per_doc": TASK.doc_len,
              "probe_fit_seconds": probe_fit_s, "key_index_seconds": index_s},
    "rows": rows,
    "note": "CPU (2 cores) shared with other jobs: latencies comparable within one N only. Text bytes count one "
            "byte per token (vocabulary < 256); state bytes are float32 SSM + conv states of every layer.",
})
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
methods = [m for m in rows[0]["methods"] if rows[0]["methods"][m]["retrieval_accuracy"] is not None]
for m in methods:
    ns = [r["n_docs"] for r in rows]
    axes[0].plot(ns, [r["methods"][m]["retrieval_accuracy"] for r in rows], "o-", label=m)
    axes[1].plot(ns, [r["methods"][m]["latency_ms_per_query"] for r in rows], "o-", label=m)
    axes[2].plot(ns, [r["methods"][m]["tokens_prefilled_per_query"] for r in rows], "o-", label=m)
for ax, lab in zip(axes, ["top-1 retrieval accuracy", "ms per query (CPU, under load)", "tokens prefilled per query"]):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("documents in the library (N)")
    ax.set_ylabel(lab)
axes[1].set_yscale("log")
axes[2].set_yscale("log")
axes[0].legend(fontsize=7)
fig.suptitle(f"State search vs BM25 text retrieval on buried key-value facts (in-context answer accuracy {in_context:.1%})")
save_figure(args, NAME, fig)  # --quick: into its temporary --out
