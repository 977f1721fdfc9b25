"""Reading states: linear probes per layer, and each channel's memory half-life.

- :func:`features` flattens one layer's SSM state (b, ...) into probe inputs (b, f).
- :func:`ridge_classifier` / :func:`ridge_regressor` fit closed-form ridge probes
  on a training split and score a held-out split (accuracy / R^2); a probe on
  shuffled labels or a random-init model is the control.
- :func:`half_lives` reads each channel's half-life off the learned parameters:
  at zero input the step is ``dt = softplus(dt_bias)`` and a state element
  decays by ``exp(dt * A)`` per token, so it halves after ``ln 2 / (dt |A|)``
  tokens. :func:`measured_half_lives` measures it on real inputs instead: the
  decay product ``P`` of a segment of ``T`` tokens
  (:func:`mamba_jax.states.compose.segment`) gives ``T ln 2 / -ln P``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.cache import AttentionLayerCache, MambaCache


def features(cache: MambaCache, layer: int, *, include_conv: bool = False) -> np.ndarray:
    """Layer ``layer``'s SSM state of every row, flattened: (b, f) float64 (with the conv state appended if asked)."""
    c = cache.layers[layer]
    if isinstance(c, AttentionLayerCache):
        raise ValueError(f"layer {layer} is an attention layer: it has no fixed-size state to probe")
    b = c.ssm_state.shape[0]
    parts = [np.asarray(c.ssm_state, np.float64).reshape(b, -1)]
    if include_conv:
        parts.append(np.asarray(c.conv_state, np.float64).reshape(b, -1))
    return np.concatenate(parts, 1)


def _standardise(train: np.ndarray, test: np.ndarray):
    mu, sd = train.mean(0), train.std(0) + 1e-8
    return (train - mu) / sd, (test - mu) / sd


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Weights (f + 1, k) of ridge regression with an unpenalised bias (dual form when f > n)."""
    n, f = x.shape
    xb = np.concatenate([x, np.ones((n, 1))], 1)
    reg = alpha * np.eye(f + 1)
    reg[-1, -1] = 0.0
    if f + 1 <= n:
        return np.linalg.solve(xb.T @ xb + reg, xb.T @ y)
    # dual: w = X^T (X X^T + alpha I)^-1 y (bias penalised lightly here; fine for probes)
    return xb.T @ np.linalg.solve(xb @ xb.T + alpha * np.eye(n), y)


def _check_xy(x_train, y_train, x_test, y_test):
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim != 2 or y.shape[0] != x.shape[0]:
            raise ValueError(f"{name}: features must be (n, f) and labels (n,), got {x.shape} and {y.shape}")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"train and test features differ in width: {x_train.shape[1]} vs {x_test.shape[1]}")


def ridge_classifier(x_train, y_train, x_test, y_test, *, alpha: float = 1.0) -> float:
    """Held-out accuracy of a one-vs-all ridge probe (labels: ints)."""
    x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    _check_xy(x_train, y_train, x_test, y_test)
    classes = np.unique(y_train)
    x_train, x_test = _standardise(x_train, x_test)
    w = _ridge(x_train, (y_train[:, None] == classes[None]).astype(np.float64), alpha)
    pred = classes[np.argmax(np.concatenate([x_test, np.ones((len(x_test), 1))], 1) @ w, 1)]
    return float((pred == y_test).mean())


def ridge_regressor(x_train, y_train, x_test, y_test, *, alpha: float = 1.0) -> float:
    """Held-out R^2 of a ridge probe (targets: floats)."""
    x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    y_train, y_test = np.asarray(y_train, np.float64), np.asarray(y_test, np.float64)
    _check_xy(x_train, y_train, x_test, y_test)
    x_train, x_test = _standardise(x_train, x_test)
    w = _ridge(x_train, y_train[:, None], alpha)
    pred = (np.concatenate([x_test, np.ones((len(x_test), 1))], 1) @ w)[:, 0]
    return float(1.0 - ((pred - y_test) ** 2).sum() / max(((y_test - y_test.mean()) ** 2).sum(), 1e-30))


def half_lives(model) -> list[np.ndarray | None]:
    """Per layer, the half-life in tokens of each state element at zero input:
    (d, n) for Mamba-1, (h,) for Mamba-2; ``None`` for attention layers."""
    out = []
    for i, block in enumerate(model.layers):
        mixer = block.mixer
        if model.config.is_attention_layer(i):
            out.append(None)
            continue
        a = np.exp(np.asarray(mixer.A_log[...], np.float64))  # |A|
        if not model.config.is_mamba2 and model.config.selective:
            bias = np.asarray(mixer.dt_proj.bias[...], np.float64)
        else:
            bias = np.asarray(mixer.dt_bias[...], np.float64)
        dt = np.logaddexp(0.0, bias)  # softplus
        if model.config.is_mamba2:
            lo, hi = model.config.dt_limit
            dt = np.clip(dt, lo, hi)
            out.append(math.log(2) / (dt * a))
        else:
            out.append(math.log(2) / (dt[:, None] * a))
    return out


def measured_half_lives(decay: jax.Array, length: int) -> np.ndarray:
    """Half-lives (tokens) from a segment's decay product (``Segment.decay[layer]``,
    (b, ...)): geometric mean over the batch of ``length ln 2 / -ln P``. The decay
    comes from the difference of two float32 states, so products below ~1e-6 are
    not resolved: their half-lives come out near 0 (read: much shorter than the
    segment)."""
    p = np.clip(np.asarray(decay, np.float64), 0.0, 1.0)
    logp = np.log(np.maximum(p, 1e-300)).mean(0)  # mean log-decay over the batch
    with np.errstate(divide="ignore"):
        return np.where(logp < 0, length * math.log(2) / -logp, np.inf)
