"""Flax NNX layers of Mamba-1: RMSNorm, the Mamba mixer and the residual block.

The residual :class:`Block` also hosts the other mixer of the hybrid layouts
(:class:`mamba_jax.nn.attention.CausalSelfAttention`) and the optional gated
MLP (:class:`mamba_jax.nn.mlp.GatedMLP`), as the reference ``Block``
(``mamba_ssm/modules/block.py``) does.

Parameter names, layouts and initialisation follow the reference
implementation (``mamba_ssm/modules/mamba_simple.py``), with Flax's layout for
linear layers (``kernel`` is the transpose of torch's ``weight``) and the
convolution kernel stored as (k, d).

Every parameter carries logical axis names (``nnx.get_partition_spec`` reads
them): ``embed`` (d_model), ``mlp`` (d_inner), ``state`` (d_state), ``rank``
(dt_rank), ``conv`` (d_conv), ``vocab``; the attention and MLP layers add
``heads`` (their own modules say where).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.cache import MambaLayerCache
from mamba_jax.config import MambaConfig
from mamba_jax.nn.attention import CausalSelfAttention
from mamba_jax.nn.conv import CausalConv1d
from mamba_jax.nn.init import a_log_init, dt_bias_init, dt_weight_init, partitioned, torch_linear_init
from mamba_jax.nn.mamba2 import Mamba2Mixer
from mamba_jax.nn.mlp import GatedMLP
from mamba_jax.ops import selective_scan
from mamba_jax.typing import Array, DType, Float

# The initialisers were defined here before nn/init.py; their names stay importable from here.
__all__ = ["RMSNorm", "CausalConv1d", "MambaMixer", "Block", "MambaBlock",
           "partitioned", "torch_linear_init", "dt_bias_init", "dt_weight_init", "a_log_init"]

_F32 = jnp.float32


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32; the output is cast to ``dtype``."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype: DType = _F32, param_dtype: DType = _F32, rngs: nnx.Rngs):
        del rngs
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(partitioned(nnx.initializers.ones, ("embed",))(None, (dim,), param_dtype))

    def __call__(self, x: Float[Array, "... e"]) -> Float[Array, "... e"]:
        x = x.astype(_F32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (x * self.weight[...].astype(_F32)).astype(self.dtype)


class MambaMixer(nnx.Module):
    """in_proj -> conv1d -> SiLU -> x_proj -> dt_proj -> selective scan (D, z gate) -> out_proj.

    With ``config.selective=False`` it is the LTI ablation: delta = softplus(dt_bias)
    and B, C are learned vectors (n,), the same at every step (no ``x_proj`` and
    no ``dt_proj`` weight); everything else is unchanged.
    """

    def __init__(self, config: MambaConfig, *, dtype: DType = _F32, param_dtype: DType = _F32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        e, d, n, r = config.d_model, config.d_inner, config.d_state, config.resolved_dt_rank
        linear = lambda fan_in, fan_out, axes, use_bias, kernel_init=None, bias_init=None: nnx.Linear(
            fan_in,
            fan_out,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=partitioned(kernel_init or torch_linear_init(fan_in), axes),
            bias_init=partitioned(bias_init or nnx.initializers.zeros, axes[1:]),
            rngs=rngs,
        )
        self.in_proj = linear(e, 2 * d, ("embed", "mlp"), config.bias)
        self.conv1d = CausalConv1d(
            d, config.d_conv, use_bias=config.conv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        if config.selective:
            self.x_proj = linear(d, r + 2 * n, ("mlp", None), False)
            self.dt_proj = linear(r, d, ("rank", "mlp"), True, dt_weight_init(config), dt_bias_init(config))
        else:
            self.dt_bias = nnx.Param(partitioned(dt_bias_init(config), ("mlp",))(rngs.params(), (d,), param_dtype))
            self.B = nnx.Param(partitioned(nnx.initializers.ones, ("state",))(rngs.params(), (n,), param_dtype))
            self.C = nnx.Param(
                partitioned(nnx.initializers.normal(1.0), ("state",))(rngs.params(), (n,), param_dtype)
            )
        self.A_log = nnx.Param(partitioned(a_log_init, ("mlp", "state"))(rngs.params(), (d, n), param_dtype))
        self.D = nnx.Param(partitioned(nnx.initializers.ones, ("mlp",))(rngs.params(), (d,), param_dtype))
        # The reference (_init_weights, rescale_prenorm_residual) divides out_proj's
        # range by sqrt(n_residuals_per_layer * n_layer): 1 residual per block, 2 with an MLP.
        out_init = torch_linear_init(d, scale=1.0 / math.sqrt(config.n_residuals_per_layer * config.n_layer))
        self.out_proj = linear(d, e, ("mlp", "embed"), config.bias, out_init)

    def __call__(
        self,
        hidden: Float[Array, "b l e"],
        cache: MambaLayerCache | None = None,
        mask: Array | None = None,
        seq_idx: Array | None = None,
    ) -> Float[Array, "b l e"] | tuple[Float[Array, "b l e"], MambaLayerCache]:
        """Mixes along time. ``mask`` (b, l) bool marks real tokens: masked steps
        feed zeros to the convolution and leave the SSM state unchanged (delta = 0),
        so left padding does not change the outputs of the real tokens. ``seq_idx``
        (b, l) int: packed documents; neither the convolution nor the scan state
        crosses a change of id (a cache continues the first document of the call
        and keeps the last one's state)."""
        cfg = self.config
        b, l, _ = hidden.shape
        x, z = jnp.split(self.in_proj(hidden), 2, axis=-1)
        keep = None if mask is None else mask[..., None]
        if keep is not None:
            x = jnp.where(keep, x, jnp.zeros_like(x))
        if cache is None:
            x = self.conv1d(x, seq_idx=seq_idx)
        else:
            x, conv_state = self.conv1d(x, cache.conv_state, seq_idx)
        x = jax.nn.silu(x)
        if keep is not None:
            x = jnp.where(keep, x, jnp.zeros_like(x))
        if cfg.selective:
            r, n = cfg.resolved_dt_rank, cfg.d_state
            x_dbl = self.x_proj(x)
            dt, B, C = x_dbl[..., :r], x_dbl[..., r : r + n], x_dbl[..., r + n :]
            dt = dt @ self.dt_proj.kernel[...].astype(self.dtype)  # bias goes in the scan
            delta_bias = self.dt_proj.bias[...]
        else:
            dt = jnp.zeros_like(x)
            B = jnp.broadcast_to(self.B[...].astype(self.dtype), (b, l, cfg.d_state))
            C = jnp.broadcast_to(self.C[...].astype(self.dtype), (b, l, cfg.d_state))
            delta_bias = self.dt_bias[...]
        A = -jnp.exp(self.A_log[...].astype(_F32))
        delta_bias = delta_bias.astype(_F32)
        if keep is not None:  # identity steps: exp(0 * A) = 1 and no input
            dt = jnp.where(keep, jax.nn.softplus(dt.astype(_F32) + delta_bias), 0.0)
            delta_bias = None
        y, ssm_state = selective_scan(
            x,
            dt,
            A,
            B,
            C,
            D=self.D[...].astype(_F32),
            z=z,
            delta_bias=delta_bias,
            delta_softplus=keep is None,
            initial_state=None if cache is None else cache.ssm_state,
            return_final_state=True,
            impl=cfg.scan_impl,
            seq_idx=seq_idx,
        )
        out = self.out_proj(y)
        if cache is None:
            return out
        return out, MambaLayerCache(conv_state=conv_state, ssm_state=ssm_state)


class Block(nnx.Module):
    """Pre-norm residual block (the reference ``Block``):

    ``residual += hidden; hidden = mixer(norm(residual))``, then, when
    ``config.d_intermediate > 0``, ``residual += hidden; hidden = mlp(norm2(residual))``.

    The mixer is :class:`MambaMixer` (``config.layer="mamba1"``) or
    :class:`~mamba_jax.nn.mamba2.Mamba2Mixer` (``"mamba2"``), or causal
    self-attention for the layers in ``config.attn_layer_idx``. Parameter names are the reference's: ``norm``,
    ``mixer.*``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``; a pure Mamba block has only
    ``norm`` and ``mixer`` (``norm2`` and ``mlp`` are None).

    Args:
      config: the model configuration.
      layer_idx: the index of this block in the model (picks the mixer).
      dtype: compute dtype.
      param_dtype: storage dtype of the parameters.
      rngs: random streams for initialisation.
    """

    def __init__(
        self,
        config: MambaConfig,
        *,
        layer_idx: int = 0,
        dtype: DType = _F32,
        param_dtype: DType = _F32,
        rngs: nnx.Rngs,
    ):
        self.residual_in_fp32 = config.residual_in_fp32
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = RMSNorm(config.d_model, eps=config.norm_epsilon, **common)
        if config.is_attention_layer(layer_idx):
            self.mixer = CausalSelfAttention(config, **common)
        elif config.is_mamba2:
            self.mixer = Mamba2Mixer(config, **common)
        else:
            self.mixer = MambaMixer(config, **common)
        if config.d_intermediate > 0:
            self.norm2 = RMSNorm(config.d_model, eps=config.norm_epsilon, **common)
            out_scale = 1.0 / math.sqrt(config.n_residuals_per_layer * config.n_layer)
            self.mlp = GatedMLP(config.d_model, config.d_intermediate, out_scale=out_scale, **common)
        else:
            self.norm2 = None
            self.mlp = None

    def __call__(self, hidden, residual, cache=None, mask=None, seq_idx=None):
        """``(hidden, residual, cache)`` -> the same, for the next block. ``residual`` is
        None in the first block; ``cache`` is this layer's cache or None. ``seq_idx``
        (b, l) int marks packed documents: no mixer lets anything cross a change of id."""
        residual = self._add(hidden, residual)
        hidden = self.norm(residual)
        extra = {} if seq_idx is None else dict(seq_idx=seq_idx)
        if cache is None:
            hidden = self.mixer(hidden, mask=mask, **extra)
        else:
            hidden, cache = self.mixer(hidden, cache, mask, **extra)
        if self.mlp is not None:
            residual = self._add(hidden, residual)
            hidden = self.mlp(self.norm2(residual))
        return hidden, residual, cache

    def _add(self, hidden, residual):
        residual = hidden if residual is None else residual + hidden.astype(residual.dtype)
        return residual.astype(_F32) if self.residual_in_fp32 else residual


# The name of the block before hybrids: a pure Mamba config builds the same block.
MambaBlock = Block
