"""Random selective-scan inputs shared by the scan tests (fresh draws per seed)."""

import jax
import jax.numpy as jnp


def make_scan_inputs(seed, b, l, d, n, g=None, *, dtype=jnp.float32, D=True, z=True, bias=True, h0=True):
    """Returns a dict of keyword arguments for selective_scan.

    ``g=None`` gives the ungrouped (b, l, n) form of B and C.
    """
    ks = jax.random.split(jax.random.key(seed), 9)
    bc_shape = (b, l, n) if g is None else (b, l, g, n)
    args = dict(
        u=jax.random.normal(ks[0], (b, l, d), jnp.float32).astype(dtype),
        delta=(0.5 * jax.random.normal(ks[1], (b, l, d), jnp.float32)).astype(dtype),
        A=-jnp.exp(0.5 * jax.random.normal(ks[2], (d, n), jnp.float32)),
        B=jax.random.normal(ks[3], bc_shape, jnp.float32).astype(dtype),
        C=jax.random.normal(ks[4], bc_shape, jnp.float32).astype(dtype),
    )
    if D:
        args["D"] = jax.random.normal(ks[5], (d,), jnp.float32)
    if z:
        args["z"] = jax.random.normal(ks[6], (b, l, d), jnp.float32).astype(dtype)
    if bias:
        args["delta_bias"] = 0.5 * jax.random.normal(ks[7], (d,), jnp.float32)
    if h0:
        args["initial_state"] = jax.random.normal(ks[8], (b, d, n), jnp.float32)
    return args
