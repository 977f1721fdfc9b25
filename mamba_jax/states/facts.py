"""A key-value fact task for state libraries: facts buried among filler, asked about later.

Each *document* is ``doc_len`` tokens of filler with ``facts_per_doc`` facts at
random, non-overlapping places; a fact is the four tokens ``FACT k1 k2 v``: a
two-token key ``(k1, k2)`` and a one-token value ``v``. A *query* is ``QUERY k1
k2`` and its answer is ``v`` (in the spirit of the Mamba paper's induction-heads
and Zoology's associative recall; the two-token key makes ``key_alphabet ** 2``
distinct keys, so thousands of documents can hold distinct keys and a query
names exactly one document).

Vocabulary (ids): ``0`` padding, ``1`` QUERY, ``2`` FACT, then the key alphabet,
the values and the filler tokens: :class:`FactVocab` holds the ranges.

Training sequences (:func:`training_batch`) are a document followed by one query
per fact, each with its answer; the scored targets are the query's key tokens
(so the model learns which keys its context holds: the likelihood scorer of
:mod:`mamba_jax.states.library` reads that) and the answer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PAD, QUERY, FACT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class FactVocab:
    """Token ranges of the fact task.

    Attributes:
      key_alphabet: tokens a key is spelled with (keys are ordered pairs: ``key_alphabet ** 2`` keys).
      n_values: distinct value tokens.
      n_filler: distinct filler tokens.
    """

    key_alphabet: int = 96
    n_values: int = 32
    n_filler: int = 64

    def __post_init__(self):
        for name in ("key_alphabet", "n_values", "n_filler"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 2:
                raise ValueError(f"FactVocab.{name}={v!r} must be an int >= 2")

    @property
    def key_start(self) -> int:
        return 3

    @property
    def value_start(self) -> int:
        return self.key_start + self.key_alphabet

    @property
    def filler_start(self) -> int:
        return self.value_start + self.n_values

    @property
    def size(self) -> int:
        return self.filler_start + self.n_filler

    @property
    def n_keys(self) -> int:
        return self.key_alphabet**2

    def key_tokens(self, key_ids: np.ndarray) -> np.ndarray:
        """Key ids in ``[0, n_keys)`` -> (..., 2) token ids."""
        key_ids = np.asarray(key_ids)
        return np.stack([key_ids // self.key_alphabet, key_ids % self.key_alphabet], -1) + self.key_start


@dataclasses.dataclass(frozen=True)
class FactDocs:
    """A set of documents and their facts.

    Attributes:
      tokens: (N, doc_len) int32 document tokens.
      keys: (N, M) int key ids (distinct across the whole set), in ``[0, vocab.n_keys)``.
      values: (N, M) int32 value tokens.
      positions: (N, M) int start position of each fact in its document.
    """

    tokens: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    positions: np.ndarray

    def __len__(self) -> int:
        return self.tokens.shape[0]


def make_docs(rng: np.random.Generator, vocab: FactVocab, n_docs: int, doc_len: int, facts_per_doc: int) -> FactDocs:
    """``n_docs`` documents with ``facts_per_doc`` facts each; every key occurs once in the set."""
    m = facts_per_doc
    if n_docs < 1 or m < 1:
        raise ValueError(f"{n_docs=} and {facts_per_doc=} must be positive")
    if n_docs * m > vocab.n_keys:
        raise ValueError(f"{n_docs=} x {facts_per_doc=} facts need distinct keys but the vocab has {vocab.n_keys}")
    if doc_len < 4 * m:
        raise ValueError(f"{doc_len=} cannot hold {facts_per_doc=} facts of 4 tokens")
    keys = rng.choice(vocab.n_keys, size=n_docs * m, replace=False).reshape(n_docs, m)
    values = rng.integers(vocab.value_start, vocab.value_start + vocab.n_values, size=(n_docs, m)).astype(np.int32)
    tokens = rng.integers(vocab.filler_start, vocab.size, size=(n_docs, doc_len)).astype(np.int32)
    # Non-overlapping slots: choose m starts among doc_len - 3m free places, then shift past earlier facts.
    free = doc_len - 3 * m
    starts = np.sort(np.argsort(rng.random((n_docs, free)), axis=1)[:, :m], axis=1) + 3 * np.arange(m)
    kt = vocab.key_tokens(keys)
    rows = np.arange(n_docs)[:, None]
    tokens[rows, starts] = FACT
    tokens[rows, starts + 1] = kt[..., 0]
    tokens[rows, starts + 2] = kt[..., 1]
    tokens[rows, starts + 3] = values
    return FactDocs(tokens=tokens, keys=keys, values=values, positions=starts)


def query_tokens(vocab: FactVocab, keys: np.ndarray) -> np.ndarray:
    """(..., 3) ``QUERY k1 k2`` for key ids (...)."""
    kt = vocab.key_tokens(keys)
    return np.concatenate([np.full(kt.shape[:-1] + (1,), QUERY, kt.dtype), kt], -1).astype(np.int32)


def training_batch(rng: np.random.Generator, vocab: FactVocab, batch_size: int, doc_len: int, facts_per_doc: int) -> dict:
    """A document then a query (and answer) per fact, in random order: ``inputs``,
    ``targets`` (next tokens) and ``weights`` (1 at the query's key tokens and answer)."""
    docs = make_docs(rng, vocab, batch_size, doc_len, facts_per_doc)
    m = facts_per_doc
    order = np.argsort(rng.random((batch_size, m)), axis=1)
    rows = np.arange(batch_size)[:, None]
    keys, values = docs.keys[rows, order], docs.values[rows, order]
    q = np.concatenate([query_tokens(vocab, keys), values[..., None]], -1).reshape(batch_size, 4 * m)
    seq = np.concatenate([docs.tokens, q], 1)
    inputs, targets = seq[:, :-1], seq[:, 1:]
    weights = np.zeros(targets.shape, np.float32)
    for j in range(m):  # targets at QUERY -> k1, k1 -> k2, k2 -> v
        base = doc_len - 1 + 4 * j
        weights[:, base + 1 : base + 4] = 1.0
    return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32), "weights": weights}


# --------------------------------------------------------------------------- the model trained on it


@dataclasses.dataclass(frozen=True)
class FactTaskConfig:
    """The fact task and the small Mamba trained on it (one run shared by the states experiments).

    Attributes:
      vocab: token ranges.
      doc_len: tokens per document.
      facts_per_doc: facts per document.
      d_model, n_layer, d_state, layer: the model (``layer`` "mamba1" or "mamba2").
      steps, batch_size, learning_rate, warmup_steps, seed: training.
      train_facts_per_doc: facts per training document (more queries per sequence: more
        signal per step).
      short_doc_len, short_steps: a length curriculum: the first ``short_steps`` steps train on
        documents of ``short_doc_len`` tokens, the rest on ``doc_len``. Recall forms abruptly
        (answers stay at chance, then jump to ~99% within a few hundred steps); it forms sooner
        when the facts are a large part of the document (``experiments/06_states_library.py``
        records the run's accuracy curve).
    """

    vocab: FactVocab = FactVocab()
    doc_len: int = 64
    facts_per_doc: int = 2
    d_model: int = 64
    n_layer: int = 3
    d_state: int = 16
    layer: str = "mamba1"
    steps: int = 10_000
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    seed: int = 0
    train_facts_per_doc: int = 3
    short_doc_len: int = 16
    short_steps: int = 6000

    def __post_init__(self):
        if not 0 <= self.short_steps <= self.steps:
            raise ValueError(f"FactTaskConfig.short_steps={self.short_steps} must be in [0, steps={self.steps}]")
        for name in ("doc_len", "short_doc_len"):
            if getattr(self, name) < 4 * max(self.facts_per_doc, self.train_facts_per_doc):
                raise ValueError(f"FactTaskConfig.{name}={getattr(self, name)} cannot hold the facts of a document")

    def train_doc_len(self, step: int) -> int:
        """The document length trained on at ``step`` (the curriculum)."""
        return self.short_doc_len if step < self.short_steps else self.doc_len

    @classmethod
    def quick(cls) -> "FactTaskConfig":
        """A seconds-long version (the experiments' ``--quick`` smoke runs)."""
        return cls(vocab=FactVocab(key_alphabet=16, n_values=8, n_filler=8), doc_len=16, d_model=16, n_layer=2,
                   d_state=4, steps=4, batch_size=8, warmup_steps=1, short_doc_len=12, short_steps=2)

    def model_config(self):
        from mamba_jax.config import MambaConfig

        return MambaConfig(
            d_model=self.d_model, n_layer=self.n_layer, d_state=self.d_state, vocab_size=self.vocab.size, layer=self.layer
        )


def answer_accuracy(model, docs: FactDocs, vocab: FactVocab, batch_size: int = 256) -> float:
    """Greedy answer accuracy with the document in context: ``doc QUERY k1 k2`` -> value, for every fact."""
    import jax.numpy as jnp

    correct = total = 0
    for j in range(docs.keys.shape[1]):
        seq = np.concatenate([docs.tokens, query_tokens(vocab, docs.keys[:, j])], 1)
        for s in range(0, len(docs), batch_size):
            logits = model(jnp.asarray(seq[s : s + batch_size]))[:, -1, : vocab.size]
            correct += int((np.asarray(jnp.argmax(logits, -1)) == docs.values[s : s + batch_size, j]).sum())
            total += logits.shape[0]
    return correct / total


def train_fact_model(task: FactTaskConfig, workdir, *, progress: bool = True, checkpoint_every: int = 250):
    """Trains (or resumes, or loads when finished) the task's model in ``workdir``; returns it.

    Batches come from ``numpy`` seeded by (seed, step), so a resumed run sees the
    batches it would have seen."""
    from flax import nnx

    from mamba_jax.model import MambaLM
    from mamba_jax.train import Trainer, TrainConfig

    model = MambaLM(task.model_config(), rngs=nnx.Rngs(task.seed))
    n_eval = min(256, task.vocab.n_keys // task.facts_per_doc)
    eval_docs = make_docs(np.random.default_rng([task.seed, 10**9]), task.vocab, n_eval, task.doc_len, task.facts_per_doc)

    def batch_fn(step):
        rng = np.random.default_rng([task.seed, step])
        return training_batch(rng, task.vocab, task.batch_size, task.train_doc_len(step), task.train_facts_per_doc)

    cfg = TrainConfig(
        total_steps=task.steps,
        learning_rate=task.learning_rate,
        warmup_steps=task.warmup_steps,
        weight_decay=0.1,
        log_every=min(50, task.steps),
        eval_every=min(250, task.steps),
        checkpoint_every=checkpoint_every if workdir is not None else 0,
        seed=task.seed,
    )
    trainer = Trainer(model, cfg, workdir=workdir, progress=progress, description="fact-model")
    try:
        trainer.fit(batch_fn, eval_fn=lambda m: {"answer_accuracy": answer_accuracy(m, eval_docs, task.vocab)})
    finally:
        trainer.close()
    return model


def load_fact_model(task: FactTaskConfig, workdir, step: int | None = None):
    """The task's model from a checkpoint in ``workdir`` (``step``, or the latest) without
    training further: ``(model, step)``. FileNotFoundError when there is none."""
    from pathlib import Path

    from flax import nnx

    from mamba_jax.checkpoint import CheckpointManager
    from mamba_jax.model import MambaLM

    model = MambaLM(task.model_config(), rngs=nnx.Rngs(task.seed))
    manager = CheckpointManager(Path(workdir) / "checkpoints")
    try:
        restored = manager.restore(model, step=step)
    finally:
        manager.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint of the fact model in {workdir}/checkpoints")
    nnx.update(model, nnx.state(restored.model))
    return model, int(restored.step)
