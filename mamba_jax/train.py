"""Training: optimizer factory, masked cross-entropy, a jitted train step and evaluation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mamba_jax.typing import Array, Float, Int


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
    cosine = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), learning_rate * end_lr_ratio
    )
    schedule = lambda step: cosine(jnp.asarray(step, jnp.float32))

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
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    total = jnp.maximum(jnp.sum(weights), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * weights) / total, jnp.sum(correct * weights) / total


@nnx.jit
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict) -> dict:
    """One optimizer step on ``batch`` (``inputs``, ``targets``, ``weights``)."""

    def loss_fn(m):
        loss, acc = cross_entropy(m(batch["inputs"]), batch["targets"], batch["weights"])
        return loss, acc

    (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int step counts with floats
        optimizer.update(model, grads)
    return {"loss": loss, "accuracy": acc, "grad_norm": optax.tree_utils.tree_norm(grads)}


@nnx.jit
def eval_step(model: nnx.Module, batch: dict) -> dict:
    """Loss, token accuracy and whole-sequence accuracy (every scored token right)."""
    logits = model(batch["inputs"])
    loss, acc = cross_entropy(logits, batch["targets"], batch["weights"])
    wrong = (jnp.argmax(logits, axis=-1) != batch["targets"]) & (batch["weights"] > 0)
    return {"loss": loss, "accuracy": acc, "sequence_accuracy": jnp.mean(~jnp.any(wrong, axis=-1))}
