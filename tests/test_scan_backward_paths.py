"""The sequential scan's fused backward at a model's state size, and the previous
sequential backward kept (private mode ``"sequential_v0"``) for
``experiments/bench_train_step.py``: both against the float64 oracle (forward)
and autodiff through the reference implementation (gradients), with and
without packed-document boundaries."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GRAD_TOL, TOL, rel_err, selective_scan_oracle
from scan_inputs import make_scan_inputs

import mamba_jax  # noqa: F401  (registers the module below)

scan_module = sys.modules["mamba_jax.ops.selective_scan"]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _call(mode, chunk, args, keep):
    """``(y, final_state)`` of an XLA implementation by its internal name (``mode``)."""
    a = dict(args)
    B, C = scan_module.validate(*(a[k] for k in ("u", "delta", "A", "B", "C")))
    fn = scan_module._impl_fn(mode, chunk, "cpu")
    return fn(a["u"], a["delta"], a["A"], B, C, a["D"], a["z"], a["delta_bias"], True, a["initial_state"], keep)


def _grads(mode, chunk, args, keep, cot_y, cot_h):
    def loss(*values):
        y, h = _call(mode, chunk, dict(zip(NAMES, values)), keep)
        return jnp.sum(y.astype(jnp.float32) * cot_y) + jnp.sum(h * cot_h)

    return dict(zip(NAMES, jax.jit(jax.grad(loss, argnums=tuple(range(len(NAMES)))))(*(args[k] for k in NAMES))))


@pytest.mark.parametrize(
    "mode, chunk, shape, packed",
    [
        ("sequential", 32, (2, 70, 40, 16, None), False),  # d_state 16 as in the models, unaligned l and d
        ("sequential", 16, (2, 37, 12, 5, 3), True),
        ("sequential_v0", 16, (2, 37, 12, 5, 3), False),
        ("sequential_v0", 16, (2, 37, 12, 5, 3), True),
    ],
)
def test_backward_matches_reference(mode, chunk, shape, packed):
    b, l, d, n, g = shape
    args = make_scan_inputs(31, b, l, d, n, g)
    keep = None
    if packed:
        seq_idx = jnp.asarray(np.cumsum(np.random.default_rng(0).random((b, l)) < 0.1, axis=1), jnp.int32)
        keep = scan_module._continuation_mask(seq_idx, (b, l))
    y, h = _call(mode, chunk, args, keep)
    y_ref, h_ref = _call("reference", None, args, keep)
    if not packed:  # the float64 oracle has no document boundaries
        y64, h64 = selective_scan_oracle(**args, delta_softplus=True)
        assert rel_err(y, y64) < TOL["float32"] and rel_err(h, h64) < TOL["float32"]
    assert rel_err(y, y_ref) < TOL["float32"] and rel_err(h, h_ref) < TOL["float32"]
    kc = jax.random.split(jax.random.key(7))
    cot_y = jax.random.normal(kc[0], (b, l, d), jnp.float32)
    cot_h = jax.random.normal(kc[1], (b, d, n), jnp.float32)
    ref = _grads("reference", None, args, keep, cot_y, cot_h)
    out = _grads(mode, chunk, args, keep, cot_y, cot_h)
    for name in NAMES:
        assert out[name].shape == ref[name].shape, name
        assert rel_err(out[name], ref[name]) < GRAD_TOL["float32"], name
