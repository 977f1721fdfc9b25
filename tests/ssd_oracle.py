"""The SSD (Mamba-2) recurrence written from the equations, step by step, in float64 NumPy.

    dt  = clamp(softplus(dt + dt_bias), dt_limit)      (clamp only when dt_limit != (0, inf))
    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t (outer) B_t ;  h_{t-1} := 0 where seq_idx changes
    y_t = h_t C_t + D x_t ;  y_t *= silu(z_t)

Shared by tests/test_ssd.py; independent of the library (no JAX).
"""

import numpy as np


def ssd_oracle(
    x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
    initial_state=None, seq_idx=None, as_float64=False,
):
    """Returns ``(y (b, l, h, p), final_state (b, h, p, n))`` in float64.

    Inputs are read as float32 values (bf16 arrays included), or with
    ``as_float64`` taken as they are (for float64 finite differences).
    """
    if as_float64:
        f64 = lambda v: None if v is None else np.asarray(v, np.float64)
    else:
        f64 = lambda v: None if v is None else np.asarray(np.asarray(v, np.float32), np.float64)
    x, dt, A, B, C, D, z, bias, state = map(f64, (x, dt, A, B, C, D, z, dt_bias, initial_state))
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    group = np.arange(h) // (h // g)  # head hh reads group hh // (h // g)
    B, C = B[:, :, group], C[:, :, group]  # (b, l, h, n)
    if bias is not None:
        dt = dt + bias
    if dt_softplus:
        dt = np.logaddexp(dt, 0.0)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = np.clip(dt, dt_limit[0], dt_limit[1])
    state = np.zeros((b, h, p, n)) if state is None else state.copy()
    seq = None if seq_idx is None else np.asarray(seq_idx)
    ys = np.zeros((b, l, h, p))
    for t in range(l):
        if seq is not None and t > 0:
            state = state * (seq[:, t] == seq[:, t - 1])[:, None, None, None]
        decay = np.exp(dt[:, t] * A)  # (b, h)
        state = decay[..., None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys[:, t] = np.einsum("bhpn,bhn->bhp", state, C[:, t])
    if D is not None:
        ys = ys + x * (D[:, None] if D.ndim == 1 else D)
    if z is not None:
        ys = ys * z / (1.0 + np.exp(-z))
    return ys, state
