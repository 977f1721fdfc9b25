"""A library of states: build them for many documents, search them, continue from them.

"From RAG to state search": instead of retrieving text and prefilling it
before the question, keep each document's final state and ask which stored
state holds what the question needs.

- :func:`build` prefills documents in fixed-size batches and returns one
  batched :class:`mamba_jax.MambaCache` (a row per document).
- :func:`continue_all` runs a short query from every stored state (rows of
  (query, state) pairs in batches): the query's log-likelihood under each state
  and the next-token logits after it. Two scorers read it: **likelihood**
  (``log p(query | state)``: does this state expect this question?) and
  **confidence** (the largest next-token probability: does this state know the
  answer?). Cost: ``N x |query|`` tokens per query.
- :class:`KeyProbe`: a linear map from a state to a "key" vector (here, which
  key tokens the document holds), fit by ridge regression on other documents'
  states; searching is one matrix product over the stored keys, and only the
  best state runs the query.
- :class:`BM25`: the text baseline (Okapi BM25 over token ids, unigrams and
  optionally bigrams); the retrieved document is prefilled before the query.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.cache import MambaCache
from mamba_jax.states.io import select, stack
from mamba_jax.states.probes import features
from mamba_jax.states.snapshots import run


def _batches(n: int, size: int):
    for s in range(0, n, size):
        yield s, min(s + size, n)


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """Pads the first axis to ``size`` by repeating the last row (one compiled shape per batch size)."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), 0)], 0)


def build(model, docs: np.ndarray, batch_size: int = 256) -> MambaCache:
    """The final state of every document: (N, l) int tokens -> a cache with N rows."""
    docs = np.asarray(docs)
    if docs.ndim != 2 or not np.issubdtype(docs.dtype, np.integer):
        raise ValueError(f"docs must be an int array (N, l) of equal-length documents, got {docs.dtype}{docs.shape}")
    n = len(docs)
    bs = min(batch_size, n)
    parts = []
    for s, e in _batches(n, bs):
        _, cache = run(model, _pad_rows(docs[s:e], bs), model.init_cache(bs))
        parts.append(cache if e - s == bs else select(cache, list(range(e - s))))
    return parts[0] if len(parts) == 1 else stack(parts)


def continue_all(model, states: MambaCache, queries: np.ndarray, state_rows: np.ndarray | None = None,
                 batch_size: int = 1024, vocab: int | None = None):
    """Runs every query from every state (or from ``state_rows[i]`` for query ``i``).

    ``queries``: (Q, q) int. Returns ``(logprob, last_logits)``: ``logprob`` (Q, N)
    the log-likelihood of ``query[1:]`` given the state and ``query[:-1]``, and
    ``last_logits`` (Q, N, v) float32, the logits after the whole query (``v`` =
    ``vocab`` or the model's padded vocabulary); with ``state_rows`` (Q,), the
    shapes are (Q, 1) and (Q, 1, v). Rows go through the model ``batch_size`` at a
    time (the last call padded)."""
    queries = np.asarray(queries)
    if queries.ndim != 2 or queries.shape[1] < 1:
        raise ValueError(f"queries must be (Q, q) int with q >= 1, got {queries.shape}")
    n_states = states.batch_size
    q_n = len(queries)
    if state_rows is None:
        pair_q = np.repeat(np.arange(q_n), n_states)
        pair_s = np.tile(np.arange(n_states), q_n)
        per_q = n_states
    else:
        state_rows = np.asarray(state_rows)
        if state_rows.shape != (q_n,):
            raise ValueError(f"state_rows must be (Q,)=({q_n},), got {state_rows.shape}")
        pair_q, pair_s, per_q = np.arange(q_n), state_rows, 1
    v = vocab or model.config.padded_vocab_size
    total = len(pair_q)
    bs = batch_size  # every call has this many rows (the last one padded): one compilation
    logprob = np.empty(total, np.float64)
    last = np.empty((total, v), np.float32)
    for s, e in _batches(total, bs):
        rows = _pad_rows(pair_s[s:e], bs)
        ids = _pad_rows(queries[pair_q[s:e]], bs)
        logits, _ = run(model, ids, select(states, rows))
        lp, lg = _score(logits, jnp.asarray(ids), v)
        logprob[s:e] = np.asarray(lp)[: e - s]
        last[s:e] = np.asarray(lg)[: e - s]
    return logprob.reshape(q_n, per_q), last.reshape(q_n, per_q, v)


@jax.jit
def _score_impl(logits, ids):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    tok = jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    return tok.sum(-1)


def _score(logits, ids, v):
    return _score_impl(logits, ids), logits[:, -1, :v].astype(jnp.float32)


def confidence(last_logits: np.ndarray) -> np.ndarray:
    """The largest next-token log-probability after the query: (..., v) -> (...)."""
    x = np.asarray(last_logits, np.float64)
    m = x.max(-1, keepdims=True)
    return -np.log(np.exp(x - m).sum(-1))  # log softmax at the argmax


# --------------------------------------------------------------------------- the probe key


class KeyProbe:
    """A ridge map from states to key-token scores, fit on other documents.

    ``fit(states, labels)``: ``labels`` (n, k) 0/1, which of ``k`` key features
    each state's document holds. ``keys(states)`` projects stored states to (N, k)
    once (the index: ``k`` floats per document); a query is scored by summing the
    columns of its key features.

    Args:
      layers: which layers' SSM states are the features (default: all).
      alpha: ridge penalty.
    """

    def __init__(self, layers: Sequence[int] | None = None, alpha: float = 10.0):
        self.layers = None if layers is None else tuple(layers)
        self.alpha = alpha
        self.w = None

    def _x(self, states: MambaCache) -> np.ndarray:
        layers = self.layers if self.layers is not None else tuple(range(len(states.layers)))
        return np.concatenate([features(states, i) for i in layers], 1)

    def fit(self, states: MambaCache, labels: np.ndarray) -> "KeyProbe":
        x = self._x(states)
        y = np.asarray(labels, np.float64)
        if y.ndim != 2 or len(y) != len(x):
            raise ValueError(f"labels must be (n, k) with n={len(x)} states, got {y.shape}")
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-8
        xs = (x - self.mu) / self.sd
        self.y_mu = y.mean(0)
        n, f = xs.shape
        if f <= n:
            self.w = np.linalg.solve(xs.T @ xs + self.alpha * np.eye(f), xs.T @ (y - self.y_mu))
        else:
            self.w = xs.T @ np.linalg.solve(xs @ xs.T + self.alpha * np.eye(n), y - self.y_mu)
        return self

    def keys(self, states: MambaCache) -> np.ndarray:
        if self.w is None:
            raise RuntimeError("KeyProbe.keys before fit")
        return ((self._x(states) - self.mu) / self.sd) @ self.w + self.y_mu


# --------------------------------------------------------------------------- BM25


class BM25:
    """Okapi BM25 over documents of token ids (terms: unigrams, plus bigrams with ``bigrams=True``).

    Args:
      docs: (N, l) int tokens or a list of token sequences.
      k1, b: the usual BM25 parameters.
    """

    def __init__(self, docs, *, bigrams: bool = False, k1: float = 1.5, b: float = 0.75):
        self.bigrams, self.k1, self.b = bigrams, k1, b
        postings: dict = defaultdict(lambda: defaultdict(int))
        lengths = []
        for i, doc in enumerate(docs):
            terms = self._terms(doc)
            lengths.append(len(terms))
            for t in terms:
                postings[t][i] += 1
        self.n = len(lengths)
        self.lengths = np.asarray(lengths, np.float64)
        self.avg = float(self.lengths.mean())
        self.postings = {t: (np.fromiter(p.keys(), np.int64), np.fromiter(p.values(), np.float64)) for t, p in postings.items()}

    def _terms(self, doc) -> list:
        doc = [int(t) for t in doc]
        terms = [(t,) for t in doc]
        if self.bigrams:
            terms += list(zip(doc[:-1], doc[1:]))
        return terms

    def scores(self, query) -> np.ndarray:
        """(N,) BM25 score of every document for ``query`` (token ids)."""
        out = np.zeros(self.n)
        for t in set(self._terms(query)):
            if t not in self.postings:
                continue
            docs, tf = self.postings[t]
            idf = math.log(1 + (self.n - len(docs) + 0.5) / (len(docs) + 0.5))
            norm = tf + self.k1 * (1 - self.b + self.b * self.lengths[docs] / self.avg)
            out[docs] += idf * tf * (self.k1 + 1) / norm
        return out

    def nbytes(self) -> int:
        """Bytes of the index (postings as int32 doc ids + int32 counts)."""
        return sum(8 * len(d) for d, _ in self.postings.values())
