"""Parameter initialisers shared by the layers of :mod:`mamba_jax.nn` (and the model).

They live in their own module so that the layer modules import them without
importing one another: ``mamba`` imports ``attention`` and ``mlp`` for its
:class:`~mamba_jax.nn.mamba.Block`, and those two import only this.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.config import MambaConfig

__all__ = ["partitioned", "torch_linear_init", "dt_bias_init", "dt_weight_init", "a_log_init"]

_F32 = jnp.float32


def partitioned(init, axes: tuple[str | None, ...]):
    """``init`` with logical axis names; sharding is applied later, under a mesh."""
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def torch_linear_init(fan_in: int, scale: float = 1.0):
    """torch's default ``nn.Linear``/``nn.Conv1d`` init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) * scale."""
    bound = scale / math.sqrt(fan_in)

    def init(key, shape, dtype=_F32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dt_bias_init(config: MambaConfig):
    """Inverse softplus of dt ~ log-uniform[dt_min, dt_max] floored at dt_init_floor."""

    def init(key, shape, dtype=_F32):
        lo, hi = math.log(config.dt_min), math.log(config.dt_max)
        dt = jnp.exp(jax.random.uniform(key, shape, _F32) * (hi - lo) + lo)
        dt = jnp.maximum(dt, config.dt_init_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def dt_weight_init(config: MambaConfig):
    std = config.resolved_dt_rank**-0.5 * config.dt_scale
    if config.dt_init == "constant":
        return lambda key, shape, dtype=_F32: jnp.full(shape, std, dtype)
    return lambda key, shape, dtype=_F32: jax.random.uniform(key, shape, dtype, -std, std)


def a_log_init(key, shape, dtype=_F32):
    """S4D-real: A = -(1, 2, ..., n) for every channel, stored as log."""
    del key
    d, n = shape
    return jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=_F32), (d, n))).astype(dtype)
