"""Shared test settings: strict dtype promotion, tolerances, the float64 oracle."""

import jax
import numpy as np

# Any implicit mixing of dtypes (bf16 with f32, int with float) is a bug here.
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Relative-error tolerances ||out - ref|| / ||ref||, per input dtype (DESIGN.md).
TOL = {"float32": 1e-5, "bfloat16": 2e-2}
GRAD_TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def rel_err(out, ref) -> float:
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.all(np.isfinite(out)), "non-finite values in output"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def selective_scan_oracle(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None, as_float64=False
):
    """The recurrence written from the equations, step by step, in float64 NumPy.

    Inputs are read as float32 values (bf16 arrays included), or with
    ``as_float64`` taken as they are (float64 finite differences)."""
    if as_float64:
        f64 = lambda x: None if x is None else np.asarray(x, np.float64)
    else:
        f64 = lambda x: None if x is None else np.asarray(np.asarray(x, np.float32), np.float64)
    u, dt, A, B, C, D, z, bias, h = map(f64, (u, delta, A, B, C, D, z, delta_bias, initial_state))
    b, l, d = u.shape
    n = A.shape[1]
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    rep = d // B.shape[2]
    B, C = np.repeat(B, rep, axis=2), np.repeat(C, rep, axis=2)
    if bias is not None:
        dt = dt + bias
    if delta_softplus:
        dt = np.logaddexp(dt, 0.0)
    h = np.zeros((b, d, n)) if h is None else h
    ys = []
    for t in range(l):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t]
        ys.append(np.einsum("bdn,bdn->bd", h, C[:, t]))
    y = np.stack(ys, axis=1)
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * z / (1.0 + np.exp(-z))
    return y, h
