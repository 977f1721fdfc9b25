"""Training: optimizer, masked cross-entropy, train and eval steps, and a :class:`Trainer`.

Two levels of API:

* the pieces: :func:`make_optimizer` (AdamW, warmup + cosine to a floor, global-norm
  clipping, no weight decay on vectors and ``A_log``), :func:`cross_entropy`, and the
  ``nnx.jit``-ed :func:`train_step` / :func:`eval_step` for loops you write yourself;
* :class:`Trainer`, the loop the experiments use: a jitted step over the split
  (model, optimizer) state with the buffers donated, optional gradient accumulation,
  periodic evaluation, metrics appended to ``<workdir>/metrics.jsonl``, a tqdm bar
  with loss and tokens/s, periodic Orbax checkpoints
  (:class:`mamba_jax.checkpoint.CheckpointManager`) and automatic resume; with a
  ``mesh`` (:mod:`mamba_jax.sharding`), the model, the optimizer state and every batch
  are sharded and the step is jitted with their in/out shardings, on one process or
  many (``jax.distributed``).

Precision is the model's: build it with ``dtype=jnp.bfloat16`` (and the default
``param_dtype=float32``) to compute in bfloat16 with float32 master weights; the
loss, the optimizer state and the scan state stay float32.

Batches are dicts of ``inputs`` (b, l) int, ``targets`` (b, l) int and ``weights``
(b, l) float (1 where a target is scored). The loss is the weighted mean
cross-entropy over every scored token of the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mamba_jax.typing import Array, Float, Int

__all__ = [
    "TrainConfig", "Trainer", "make_optimizer", "lr_schedule", "cross_entropy",
    "train_step", "eval_step", "evaluate", "read_metrics",
]


def lr_schedule(learning_rate: float, total_steps: int, warmup_steps: int, end_lr_ratio: float) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then cosine decay to ``end_lr_ratio * learning_rate``."""
    cosine = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), learning_rate * end_lr_ratio
    )
    return lambda step: cosine(jnp.asarray(step, jnp.float32))


def make_optimizer(
    model: nnx.Module,
    *,
    learning_rate: float = 1e-3,
    total_steps: int = 1000,
    warmup_steps: int = 100,
    end_lr_ratio: float = 0.1,
    weight_decay: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.95,
    grad_clip: float = 1.0,
) -> nnx.Optimizer:
    """AdamW with linear warmup and cosine decay to ``end_lr_ratio * learning_rate``,
    global-norm clipping, and no weight decay on vectors (norms, biases, D) or ``A_log``
    (as in the reference, where ``A_log`` and ``D`` are marked ``_no_weight_decay``)."""
    tx = _adamw(learning_rate, total_steps, warmup_steps, end_lr_ratio, weight_decay, b1, b2, grad_clip)
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


@functools.lru_cache(maxsize=32)
def _adamw(learning_rate, total_steps, warmup_steps, end_lr_ratio, weight_decay, b1, b2, grad_clip):
    """The optax transformation, one object per set of hyperparameters: it is static
    in the jitted train step, so optimizers built alike share one compilation."""
    schedule = lr_schedule(learning_rate, total_steps, warmup_steps, end_lr_ratio)

    def decay_mask(params):
        def keep(path, x):
            names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
            return x.ndim >= 2 and "A_log" not in names

        return jax.tree_util.tree_map_with_path(keep, params)

    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask),
    )


def cross_entropy(
    logits: Float[Array, "b l v"], targets: Int[Array, "b l"], weights: Float[Array, "b l"]
) -> tuple[Array, Array]:
    """Weighted mean token cross-entropy (float32) and weighted token accuracy."""
    nll, correct = _token_nll(logits, targets)
    total = jnp.maximum(jnp.sum(weights), 1.0)
    return jnp.sum(nll * weights) / total, jnp.sum(correct * weights) / total


def _token_nll(logits, targets):
    """Per-token negative log-likelihood and 0/1 correctness, float32."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return nll, (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)


def _grads_and_metrics(model: nnx.Module, batch: Mapping[str, Array], accum_steps: int = 1):
    """Gradients of the weighted mean loss over ``batch``, computed in ``accum_steps``
    sequential micro-batches (rows split evenly), and the loss/accuracy metrics.

    Each micro-batch contributes the gradient of its weighted *sum* of token losses;
    the total is divided by the batch's total weight once, so the result equals the
    gradient of the whole batch at once whatever the split."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def summed(p, micro):
        m = nnx.merge(graphdef, p, rest)
        nll, correct = _token_nll(m(micro["inputs"], seq_idx=micro.get("seq_idx")), micro["targets"])
        w = micro["weights"].astype(jnp.float32)
        return jnp.sum(nll * w), jnp.sum(correct * w)

    grad_fn = jax.value_and_grad(summed, has_aux=True)
    if accum_steps == 1:
        (loss_sum, hits), grads = grad_fn(params, batch)
    else:
        micro = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), dict(batch))

        def body(carry, mb):
            (l, h), g = grad_fn(params, mb)
            acc_l, acc_h, acc_g = carry
            return (acc_l + l, acc_h + h, jax.tree.map(jnp.add, acc_g, g)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss_sum, hits, grads), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0), zeros), micro)
    total = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)
    grads = jax.tree.map(lambda g: g / total.astype(g.dtype), grads)
    return grads, {"loss": loss_sum / total, "accuracy": hits / total}


def _apply(model, optimizer, grads, metrics):
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int step counts with floats
        optimizer.update(model, grads)
    return {**metrics, "grad_norm": optax.tree_utils.tree_norm(grads)}


@nnx.jit
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict) -> dict:
    """One optimizer step on ``batch`` (``inputs``, ``targets``, ``weights``)."""
    grads, metrics = _grads_and_metrics(model, batch)
    return _apply(model, optimizer, grads, metrics)


def _eval_metrics(model: nnx.Module, batch: Mapping[str, Array]) -> dict:
    logits = model(batch["inputs"], seq_idx=batch.get("seq_idx"))
    loss, acc = cross_entropy(logits, batch["targets"], batch["weights"])
    wrong = (jnp.argmax(logits, axis=-1) != batch["targets"]) & (batch["weights"] > 0)
    return {"loss": loss, "accuracy": acc, "sequence_accuracy": jnp.mean(~jnp.any(wrong, axis=-1))}


@nnx.jit
def eval_step(model: nnx.Module, batch: dict) -> dict:
    """Loss, token accuracy and whole-sequence accuracy (every scored token right)."""
    return _eval_metrics(model, batch)


def evaluate(model: nnx.Module, batches: Iterable[Mapping[str, Array]]) -> dict[str, float]:
    """:func:`eval_step` over ``batches``: loss and accuracy averaged per scored token,
    sequence accuracy per sequence; plus ``tokens`` (scored) and ``sequences``."""
    sums = {"loss": 0.0, "accuracy": 0.0, "sequence_accuracy": 0.0}
    tokens = sequences = 0.0
    for batch in batches:
        m = jax.device_get(eval_step(model, batch))
        w = float(np.sum(np.asarray(batch["weights"])))
        b = int(np.shape(batch["inputs"])[0])
        sums["loss"] += float(m["loss"]) * w
        sums["accuracy"] += float(m["accuracy"]) * w
        sums["sequence_accuracy"] += float(m["sequence_accuracy"]) * b
        tokens, sequences = tokens + w, sequences + b
    if sequences == 0:
        raise ValueError("evaluate() got no batches")
    return {
        "loss": sums["loss"] / max(tokens, 1.0),
        "accuracy": sums["accuracy"] / max(tokens, 1.0),
        "sequence_accuracy": sums["sequence_accuracy"] / sequences,
        "tokens": tokens,
        "sequences": sequences,
    }


# --------------------------------------------------------------------------- Trainer


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a :class:`Trainer` run.

    Attributes:
      total_steps: optimizer steps of the whole run (the cosine schedule ends here).
      learning_rate: peak learning rate.
      warmup_steps: linear warmup steps from 0.
      end_lr_ratio: the cosine decays to ``end_lr_ratio * learning_rate``.
      weight_decay: AdamW decoupled weight decay on matrices (not on vectors, ``A_log``).
      b1: Adam beta1.
      b2: Adam beta2.
      grad_clip: global gradient-norm clipping threshold.
      grad_accum_steps: split each batch's rows into this many sequential
        micro-batches (same gradient, less activation memory); must divide the batch size.
      log_every: steps between train-metric records (and progress-bar updates).
      eval_every: steps between evaluations (0: only at the end); needs an ``eval_fn``.
      checkpoint_every: steps between checkpoints (0: none, even with a workdir);
        the final step is always saved when checkpointing is on.
      keep_checkpoints: how many recent checkpoints to keep.
      seed: seed of the run's RNG key (saved in checkpoints; ``batch_fn`` gets the step).
    """

    total_steps: int
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    log_every: int = 50
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self):
        for name in ("total_steps", "grad_accum_steps", "log_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name}={value!r} must be a positive int")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name}={value!r} must be a non-negative int")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate={self.learning_rate!r} must be positive")

    def optimizer_kwargs(self) -> dict:
        names = ("learning_rate", "total_steps", "warmup_steps", "end_lr_ratio", "weight_decay", "b1", "b2", "grad_clip")
        return {k: getattr(self, k) for k in names}


class Trainer:
    """Trains ``model`` in place with AdamW (see :class:`TrainConfig`).

        trainer = Trainer(model, TrainConfig(total_steps=2000, eval_every=500), workdir="runs/a")
        history = trainer.fit(batch_fn, eval_fn=lambda m: evaluate(m, val_batches))

    ``batch_fn(step)`` returns the batch of optimizer step ``step`` (0-based): the data
    position *is* the step, so a resumed run sees exactly the batches it would have.
    With a ``workdir`` the run appends records to ``workdir/metrics.jsonl`` and, with
    ``checkpoint_every > 0``, checkpoints model, optimizer, step and RNG key to
    ``workdir/checkpoints``; :meth:`fit` first resumes from the latest checkpoint there
    (dropping metric records written after it) and continues the same trajectory.
    When the checkpoint directory holds no intact step but steps that were moved aside
    as damaged (``_corrupted_*``), :meth:`fit` refuses to start again from step 0 and
    raises a RuntimeError naming them; ``fit(..., allow_fresh_start=True)`` overrides.

    Args:
      model: an NNX model mapping (b, l) ids to (b, l, v) logits; trained in place.
      config: the run's hyperparameters.
      workdir: where metrics and checkpoints go (None: nothing is written).
      progress: show a tqdm bar (loss, tokens/s) on stderr.
      description: the bar's label.
      mesh: a ``jax.sharding.Mesh`` from :func:`mamba_jax.sharding.make_mesh`, or None
        (one device). The model is placed on it by its logical axes (unless it was built
        there already, e.g. with :func:`~mamba_jax.sharding.init_sharded`), the optimizer
        state follows its parameters, ``batch_fn``'s batches are placed with
        :func:`~mamba_jax.sharding.shard_batch`, and the step is jitted with those
        in/out shardings, the state donated, and run under ``jax.set_mesh(mesh)`` (the
        selective scan in ``shard_map``). In a multi-process run ``batch_fn(step)``
        returns only this process's rows (:func:`~mamba_jax.sharding.process_rows`), and
        only process 0 writes ``metrics.jsonl``. A checkpoint written under any mesh
        restores onto this one (each array read into this mesh's layout).
      rules: logical-axis rule overrides for the placement (see ``mamba_jax.sharding``).
    """

    def __init__(
        self,
        model: nnx.Module,
        config: TrainConfig,
        *,
        workdir: str | Path | None = None,
        progress: bool = True,
        description: str = "train",
        mesh: jax.sharding.Mesh | None = None,
        rules: Mapping[str, str | None] | None = None,
    ):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh (mamba_jax.sharding.make_mesh), got {type(mesh).__name__}")
        self.mesh = mesh
        if mesh is not None:
            from mamba_jax import sharding as mjs

            if not _placed_on(model, mesh):
                mjs.shard_model(model, mesh, rules)
        self.model = model
        self.config = config
        self.optimizer = make_optimizer(model, **config.optimizer_kwargs())
        self.step = 0
        self.rng = jax.random.key(config.seed)
        self.workdir = None if workdir is None else Path(workdir)
        self.progress = progress
        self.description = description
        self._schedule = lr_schedule(config.learning_rate, config.total_steps, config.warmup_steps, config.end_lr_ratio)
        self._checkpoints = None
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            if config.checkpoint_every:
                from mamba_jax.checkpoint import CheckpointManager

                self._checkpoints = CheckpointManager(self.workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
        self._graphdef, self._state = nnx.split((self.model, self.optimizer))
        if mesh is None:
            self._step_fn = _jitted_train_step(self._graphdef, config.grad_accum_steps)
        else:
            self._place()
            self._step_fn = self._sharded_step()

    def _place(self) -> None:
        """Put the (model, optimizer) state on the mesh: parameters and moments keep their
        shardings, everything else (step count, RNG counters) is replicated."""
        from mamba_jax import sharding as mjs

        self._state, self._state_shardings = mjs.place_state(self._state, self.mesh)
        self._sync()
        # The run's key replicated on the mesh: a checkpoint of several processes cannot
        # hold an array that lives on one process's device.
        self.rng = mjs.replicate(self.rng, self.mesh)

    def _sharded_step(self):
        from jax.sharding import NamedSharding, PartitionSpec

        from mamba_jax import sharding as mjs

        jitted = jax.jit(
            functools.partial(_pure_train_step, self._graphdef, self.config.grad_accum_steps),
            in_shardings=(self._state_shardings, mjs.batch_sharding(self.mesh, 2)),
            out_shardings=(self._state_shardings, NamedSharding(self.mesh, PartitionSpec())),
            donate_argnums=0,
        )

        def step(state, batch):
            with jax.set_mesh(self.mesh):  # the selective scan runs in shard_map
                return jitted(state, batch)

        return step

    @property
    def is_writer(self) -> bool:
        """Whether this process writes metrics (process 0 of a multi-process run)."""
        return jax.process_index() == 0

    @property
    def metrics_path(self) -> Path | None:
        return None if self.workdir is None else self.workdir / "metrics.jsonl"

    # ---- state
    def _sync(self) -> None:
        """Write the latest (donated, functional) state back into model and optimizer."""
        nnx.update((self.model, self.optimizer), self._state)

    def restore(self, *, allow_fresh_start: bool = False) -> bool:
        """Resume from the latest checkpoint in the workdir; False if there is none.

        Raises a RuntimeError instead of returning False when the checkpoint directory
        holds steps moved aside as damaged, unless ``allow_fresh_start``."""
        if self._checkpoints is None:
            return False
        self._sync()
        restored = self._checkpoints.restore(self.model, self.optimizer)
        if restored is None:
            damaged = self._checkpoints.damaged_steps()
            if damaged and not allow_fresh_start:
                raise RuntimeError(
                    f"{self._checkpoints.directory} holds no intact checkpoint but steps moved aside as damaged: "
                    f"{[p.name for p in damaged]}; refusing to start again from step 0. Inspect or delete them, "
                    "or pass fit(..., allow_fresh_start=True) to train from scratch anyway"
                )
            return False
        nnx.update(self.model, nnx.state(restored.model))
        nnx.update(self.optimizer, nnx.state(restored.optimizer))
        self._state = nnx.state((self.model, self.optimizer))
        if self.mesh is not None:  # arrays were read in this mesh's layout; the rest replicated
            self._place()
        self.step, self.rng = restored.step, restored.rng
        self._truncate_metrics(self.step)
        return True

    def save(self) -> None:
        """Checkpoint the current step (asynchronously; :meth:`close` waits)."""
        if self._checkpoints is None:
            raise ValueError("checkpointing is off: give a workdir and TrainConfig.checkpoint_every > 0")
        self._sync()
        self._checkpoints.save(self.step, self.model, self.optimizer, rng=self.rng, data_state={"step": self.step}, force=True)

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.close()

    # ---- loop
    def fit(
        self,
        batch_fn: Callable[[int], Mapping[str, Array]],
        *,
        eval_fn: Callable[[nnx.Module], Mapping[str, float]] | None = None,
        allow_fresh_start: bool = False,
    ) -> list[dict]:
        """Train from the current (or restored) step to ``total_steps``; returns every
        metric record of this call (train records every ``log_every`` steps, eval records
        every ``eval_every`` steps and at the end), as also appended to ``metrics.jsonl``.

        ``allow_fresh_start``: train from step 0 even when the checkpoint directory
        holds only steps moved aside as damaged (by default a RuntimeError names them)."""
        cfg = self.config
        if cfg.eval_every and eval_fn is None:
            raise ValueError(f"TrainConfig.eval_every={cfg.eval_every} needs an eval_fn")
        if self.restore(allow_fresh_start=allow_fresh_start):
            print(f"{self.description}: resumed from step {self.step} in {self.workdir}", flush=True)
        else:
            self._truncate_metrics(self.step)  # records of an earlier run past this start
        history: list[dict] = []
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.total_steps, initial=self.step, desc=self.description, dynamic_ncols=True)
        t_last, tokens_since, steps_since = time.perf_counter(), 0, 0
        start = time.perf_counter()
        try:
            while self.step < cfg.total_steps:
                batch = batch_fn(self.step)
                self._check_batch(batch)
                if self.mesh is not None:
                    from mamba_jax import sharding as mjs

                    batch = mjs.shard_batch(batch, self.mesh)
                self._state, metrics = self._step_fn(self._state, batch)
                self.step += 1
                tokens_since += int(np.prod(np.shape(batch["inputs"])))
                steps_since += 1
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    record = {
                        "step": self.step,
                        "split": "train",
                        **metrics,
                        "learning_rate": float(self._schedule(self.step - 1)),
                        "tokens_per_s": tokens_since / (now - t_last),
                        "elapsed_s": now - start,
                    }
                    history.append(self._write(record))
                    if bar is not None:
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    t_last, tokens_since, steps_since = now, 0, 0
                if eval_fn is not None and (
                    (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.total_steps
                ):
                    history.append(self.evaluate(eval_fn))
                if self._checkpoints is not None and (
                    self.step % cfg.checkpoint_every == 0 or self.step == cfg.total_steps
                ):
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            self._sync()
            if self._checkpoints is not None:
                self._checkpoints.wait_until_finished()
        return history

    def evaluate(self, eval_fn: Callable[[nnx.Module], Mapping[str, float]]) -> dict:
        """Run ``eval_fn(model)`` on the current weights and record its metrics."""
        self._sync()
        metrics = {k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist() for k, v in eval_fn(self.model).items()}
        return self._write({"step": self.step, "split": "eval", **metrics})

    # ---- helpers
    def _check_batch(self, batch) -> None:
        if not isinstance(batch, Mapping) or not {"inputs", "targets", "weights"} <= set(batch):
            raise TypeError(f"batch_fn must return a dict with inputs, targets and weights, got {type(batch).__name__}")
        b = np.shape(batch["inputs"])[0]
        if b % self.config.grad_accum_steps:
            raise ValueError(
                f"batch size {b} must be a multiple of TrainConfig.grad_accum_steps={self.config.grad_accum_steps}"
            )

    def _write(self, record: dict) -> dict:
        if self.metrics_path is not None and self.is_writer:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def _truncate_metrics(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint we resumed from) and a
        torn last line; the file is replaced atomically (a crash leaves the old or the new)."""
        path = self.metrics_path
        if path is None or not path.exists() or not self.is_writer:
            return
        records = read_metrics(path)
        _atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))


def _placed_on(model: nnx.Module, mesh) -> bool:
    """Whether every parameter of ``model`` already lives on ``mesh`` (a NamedSharding of it)."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return bool(leaves) and all(
        isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding) and x.sharding.mesh == mesh for x in leaves
    )


@functools.lru_cache(maxsize=32)
def _jitted_train_step(graphdef, accum_steps):
    """One jitted step per model structure and optimizer: trainers built alike (the
    graphdef holds the cached optax transformation) share one compilation."""
    return jax.jit(functools.partial(_pure_train_step, graphdef, accum_steps), donate_argnums=0)


def _pure_train_step(graphdef, accum_steps, state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    grads, metrics = _grads_and_metrics(model, batch, accum_steps)
    metrics = _apply(model, optimizer, grads, metrics)
    return nnx.state((model, optimizer)), metrics


def read_metrics(path: str | Path, split: str | None = None) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, optionally only one ``split``.

    A last line that is not valid JSON (a write torn by a crash) is dropped with a
    warning; an invalid line anywhere else is a ValueError naming it."""
    lines = Path(path).read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if any(rest.strip() for rest in lines[i + 1 :]):
                raise ValueError(f"{path}: line {i + 1} is not valid JSON ({err}): {line[:80]!r}") from None
            warnings.warn(f"{path}: dropping a torn last line {i + 1} ({line[:80]!r})", stacklevel=2)
    return [r for r in records if split is None or r["split"] == split]


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
