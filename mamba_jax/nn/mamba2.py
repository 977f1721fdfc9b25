"""The Mamba-2 mixer (SSD) and its gated RMSNorm.

Layout, names and initialisation follow the reference
(``mamba_ssm/modules/mamba2.py``, ``Mamba2``; ``transformers``'
``Mamba2Mixer`` is the same layer with ``d_ssm = d_inner``):

* ``in_proj`` (e -> 2 d_mlp + 2 d_ssm + 2 g n + h) splits into
  ``[z0 (d_mlp), x0 (d_mlp), z (d_ssm), xBC (d_ssm + 2 g n), dt (h)]`` with
  ``d_mlp = d_inner - d_ssm`` (0 unless ``config.d_ssm`` is set);
* ``conv1d``: causal depthwise convolution over ``xBC``, then SiLU; ``xBC``
  splits into ``x`` (h heads of p channels), ``B`` and ``C`` (g groups of n);
* :func:`mamba_jax.ops.ssd` with ``A = -exp(A_log)`` (h,), ``dt_bias`` (h,),
  the softplus, ``dt_limit`` and ``D`` ((h,), or (d_ssm,) = (h p) with
  ``D_has_hdim``);
* ``norm``: :class:`RMSNormGated` over ``y`` gated by ``z``, normalised per
  group of ``d_ssm / ngroups`` channels;
* with ``d_mlp > 0`` the gated MLP branch ``silu(z0) * x0`` is concatenated in
  front of ``y``; ``out_proj`` (d_inner -> e).

Packed documents (``seq_idx``): the convolution is ``ops.causal_conv1d(seq_idx=...)``
(no input of another document is summed) and ``ops.ssd(seq_idx=...)`` resets the
state at each change of id.

Initialisation (the reference): ``A`` uniform in ``A_init_range``; dt
log-uniform in ``[dt_min, dt_max]`` floored at ``dt_init_floor`` and stored
through the inverse softplus in ``dt_bias``; ``D`` ones; ``conv1d`` and the
linear layers torch's default (``out_proj`` divided by
``sqrt(n_residuals_per_layer * n_layer)``); linear biases zero; norm weight ones.

Logical axes: ``embed`` (d_model), ``mlp`` (the fused in_proj outputs, the
conv channels and d_inner), ``heads`` (per-head parameters), ``conv``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.cache import MambaLayerCache
from mamba_jax.config import MambaConfig
from mamba_jax.nn.conv import CausalConv1d
from mamba_jax.nn.init import dt_bias_init, partitioned, torch_linear_init
from mamba_jax.ops import ssd, ssd_step
from mamba_jax.typing import Array, DType, Float

__all__ = ["RMSNormGated", "Mamba2Mixer", "a_log_uniform_init", "mamba2_cache_zeros"]

_F32 = jnp.float32


def a_log_uniform_init(A_init_range: tuple[float, float]):
    """``log(A)`` with ``A ~ U(A_init_range)`` per head (the reference Mamba-2 init)."""
    lo, hi = A_init_range

    def init(key, shape, dtype=_F32):
        return jnp.log(jax.random.uniform(key, shape, _F32, lo, hi)).astype(dtype)

    return init


def mamba2_cache_zeros(config: MambaConfig, batch_size: int, dtype: DType) -> MambaLayerCache:
    """An empty cache of one Mamba-2 layer: the conv state over ``xBC``
    (b, d_conv - 1, d_ssm + 2 g n) in ``dtype`` and the SSD state (b, h, p, n) in float32."""
    conv_dim = config.resolved_d_ssm + 2 * config.ngroups * config.d_state
    return MambaLayerCache(
        conv_state=jnp.zeros((batch_size, config.d_conv - 1, conv_dim), dtype),
        ssm_state=jnp.zeros((batch_size, config.nheads, config.headdim, config.d_state), _F32),
    )


class RMSNormGated(nnx.Module):
    """Gated RMSNorm of Mamba-2, per group of ``group_size`` channels, in float32.

    ``norm_before_gate=False`` (the reference default): ``rmsnorm(x * silu(z)) * weight``;
    ``True``: ``rmsnorm(x) * weight * silu(z)``. The output is cast to ``dtype``.
    """

    def __init__(
        self,
        dim: int,
        *,
        group_size: int,
        eps: float = 1e-5,
        norm_before_gate: bool = False,
        dtype: DType = _F32,
        param_dtype: DType = _F32,
        rngs: nnx.Rngs,
    ):
        del rngs
        if dim % group_size:
            raise ValueError(f"{group_size=} must divide {dim=}")
        self.group_size = group_size
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.dtype = dtype
        self.weight = nnx.Param(partitioned(nnx.initializers.ones, ("mlp",))(None, (dim,), param_dtype))

    def __call__(self, x: Float[Array, "... d"], z: Float[Array, "... d"] | None = None) -> Float[Array, "... d"]:
        x = x.astype(_F32)
        if z is not None and not self.norm_before_gate:
            x = x * jax.nn.silu(z.astype(_F32))
        groups = x.reshape(*x.shape[:-1], -1, self.group_size)
        groups = groups * jax.lax.rsqrt(jnp.mean(jnp.square(groups), axis=-1, keepdims=True) + self.eps)
        x = groups.reshape(x.shape) * self.weight[...].astype(_F32)
        if z is not None and self.norm_before_gate:
            x = x * jax.nn.silu(z.astype(_F32))
        return x.astype(self.dtype)


class Mamba2Mixer(nnx.Module):
    """in_proj -> conv1d over xBC -> SiLU -> SSD (dt_bias, A_log, D, dt_limit) -> gated RMSNorm -> out_proj.

    ``mixer(hidden)`` runs the parallel forward; ``mixer(hidden, cache)`` continues
    from a :class:`~mamba_jax.cache.MambaLayerCache` (conv state over ``xBC``,
    float32 SSD state (b, h, p, n)) and returns ``(out, new_cache)``: a one-token
    call is :func:`mamba_jax.ops.ssd_step`, a longer one :func:`mamba_jax.ops.ssd`
    from the cached state.

    Args:
      config: the model configuration (``layer="mamba2"`` fields).
      dtype: compute dtype; the SSD state and its arithmetic are float32.
      param_dtype: storage dtype of the parameters.
      rngs: random streams for initialisation.
    """

    def __init__(self, config: MambaConfig, *, dtype: DType = _F32, param_dtype: DType = _F32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        e, d = config.d_model, config.d_inner
        d_ssm, h, g, n = config.resolved_d_ssm, config.nheads, config.ngroups, config.d_state
        self.d_mlp = d - d_ssm
        self.conv_dim = d_ssm + 2 * g * n
        d_in_proj = 2 * self.d_mlp + d_ssm + self.conv_dim + h

        def linear(fan_in, fan_out, axes, kernel_init):
            return nnx.Linear(
                fan_in,
                fan_out,
                use_bias=config.bias,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=partitioned(kernel_init, axes),
                bias_init=partitioned(nnx.initializers.zeros, axes[1:]),
                rngs=rngs,
            )

        self.in_proj = linear(e, d_in_proj, ("embed", "mlp"), torch_linear_init(e))
        self.conv1d = CausalConv1d(
            self.conv_dim, config.d_conv, use_bias=config.conv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.dt_bias = nnx.Param(partitioned(dt_bias_init(config), ("heads",))(rngs.params(), (h,), param_dtype))
        self.A_log = nnx.Param(
            partitioned(a_log_uniform_init(config.A_init_range), ("heads",))(rngs.params(), (h,), param_dtype)
        )
        d_shape, d_axes = ((d_ssm,), ("mlp",)) if config.D_has_hdim else ((h,), ("heads",))
        self.D = nnx.Param(partitioned(nnx.initializers.ones, d_axes)(rngs.params(), d_shape, param_dtype))
        self.norm = RMSNormGated(
            d_ssm,
            group_size=d_ssm // g,
            eps=config.norm_epsilon,
            norm_before_gate=config.norm_before_gate,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        out_init = torch_linear_init(d, scale=1.0 / math.sqrt(config.n_residuals_per_layer * config.n_layer))
        self.out_proj = linear(d, e, ("mlp", "embed"), out_init)

    def __call__(
        self,
        hidden: Float[Array, "b l e"],
        cache: MambaLayerCache | None = None,
        mask: Array | None = None,
        seq_idx: Array | None = None,
    ) -> Float[Array, "b l e"] | tuple[Float[Array, "b l e"], MambaLayerCache]:
        """Mixes along time. ``mask`` (b, l) bool marks real tokens: masked steps
        feed zeros to the convolution and leave the SSD state unchanged (dt = 0),
        so left padding does not change the outputs of the real tokens.

        ``seq_idx`` (b, l) int, nondecreasing per row: packed documents. Neither the
        convolution nor the SSD state crosses a change of id, so every document gets
        the outputs it gets alone; with ``cache`` the cached state continues the first
        document of the call, and the returned one holds the last document only."""
        cfg = self.config
        b, l, _ = hidden.shape
        d_ssm, h, p, g, n = cfg.resolved_d_ssm, cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state
        proj = self.in_proj(hidden)
        m = self.d_mlp
        z0, x0 = proj[..., :m], proj[..., m : 2 * m]
        z = proj[..., 2 * m : 2 * m + d_ssm]
        xBC = proj[..., 2 * m + d_ssm : 2 * m + d_ssm + self.conv_dim]
        dt = proj[..., 2 * m + d_ssm + self.conv_dim :]
        keep = None if mask is None else mask[..., None]
        if keep is not None:
            xBC = jnp.where(keep, xBC, jnp.zeros_like(xBC))
        if cache is None:
            xBC = self.conv1d(xBC, seq_idx=seq_idx)
        else:
            xBC, conv_state = self.conv1d(xBC, cache.conv_state, seq_idx)
        xBC = jax.nn.silu(xBC)
        if keep is not None:
            xBC = jnp.where(keep, xBC, jnp.zeros_like(xBC))
        x = xBC[..., :d_ssm].reshape(b, l, h, p)
        B = xBC[..., d_ssm : d_ssm + g * n].reshape(b, l, g, n)
        C = xBC[..., d_ssm + g * n :].reshape(b, l, g, n)
        A = -jnp.exp(self.A_log[...].astype(_F32))
        D = self.D[...].astype(_F32)
        if cfg.D_has_hdim:
            D = D.reshape(h, p)
        dt_args = dict(dt_bias=self.dt_bias[...].astype(_F32), dt_softplus=True, dt_limit=cfg.dt_limit)
        if keep is not None:  # processed here so that padded steps are identity steps (dt = 0)
            dt = jax.nn.softplus(dt.astype(_F32) + dt_args["dt_bias"])
            if cfg.dt_limit != (0.0, float("inf")):
                dt = jnp.clip(dt, *cfg.dt_limit)
            dt = jnp.where(keep, dt, 0.0)
            dt_args = {}
        if cache is not None and l == 1:
            y, ssm_state = ssd_step(cache.ssm_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D=D, **dt_args)
            y = y[:, None]
        else:
            y = ssd(
                x,
                dt,
                A,
                B,
                C,
                chunk_size=cfg.chunk_size,
                D=D,
                initial_state=None if cache is None else cache.ssm_state,
                seq_idx=seq_idx,
                return_final_state=cache is not None,
                impl=cfg.ssd_impl,
                **dt_args,
            )
            if cache is not None:
                y, ssm_state = y
        y = self.norm(y.reshape(b, l, d_ssm), z)
        if m > 0:
            y = jnp.concatenate([(jax.nn.silu(z0.astype(_F32)) * x0.astype(_F32)).astype(y.dtype), y], axis=-1)
        out = self.out_proj(y)
        if cache is None:
            return out
        return out, MambaLayerCache(conv_state=conv_state, ssm_state=ssm_state)
