"""Model configuration: one frozen dataclass with the reference presets.

``layer`` picks the state space mixer of the non-attention layers: ``"mamba1"``
(the selective scan, ``mamba_ssm/modules/mamba_simple.py``) or ``"mamba2"``
(SSD, ``mamba_ssm/modules/mamba2.py``; the fields ``headdim``, ``ngroups``,
``chunk_size``, ``d_ssm``, ``D_has_hdim``, ``norm_before_gate``, ``dt_limit``,
``A_init_range`` and ``ssd_impl`` apply to it only).

Besides pure Mamba models it describes the layouts of the reference
``MixerModel`` (``mamba_ssm/models/mixer_seq_simple.py``): layers listed in
``attn_layer_idx`` use causal multi-head attention instead of Mamba as their
mixer, and ``d_intermediate > 0`` adds a gated MLP after every mixer. The
paper's Transformer++ baseline is :meth:`MambaConfig.transformer_pp`.
"""

from __future__ import annotations

import dataclasses
import math

import jax


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """Configuration of a Mamba-1, Mamba-2, hybrid or Transformer++ language model (names follow ``mamba_ssm``).

    Attributes:
      d_model: model width (e).
      n_layer: number of residual blocks.
      vocab_size: vocabulary size before padding.
      d_state: SSM state size per channel (n).
      d_conv: width of the causal depthwise convolution (k).
      expand: ``d_inner = expand * d_model`` channels inside the mixer (d).
      dt_rank: rank of the delta projection (r); ``None`` means ``ceil(d_model / 16)``.
      dt_min: smallest initial time step.
      dt_max: largest initial time step.
      dt_init: ``"random"`` or ``"constant"`` initialisation of ``dt_proj.weight``.
      dt_scale: scale of the ``dt_proj.weight`` initialisation range.
      dt_init_floor: floor applied to the initial time steps.
      conv_bias: whether the convolution has a bias.
      bias: whether ``in_proj`` and ``out_proj`` have biases.
      norm_epsilon: epsilon of RMSNorm.
      residual_in_fp32: keep the residual stream in float32 whatever the compute dtype.
      pad_vocab_size_multiple: the embedding has ``vocab_size`` rounded up to this multiple.
      tie_embeddings: the LM head reuses the embedding matrix.
      selective: ``False`` turns the mixer into the LTI ablation (S4D-real: delta,
        B and C are learned parameters, not functions of the input).
      scan_impl: ``impl`` passed to :func:`mamba_jax.ops.selective_scan`.
      d_intermediate: width of the gated MLP (SwiGLU) that follows the mixer in
        every block; 0 means no MLP (pure Mamba blocks). The block is then
        ``residual += mixer_out; mlp(norm2(residual))`` as in the reference
        ``Block`` (the reference ``GatedMLP`` rounds its width up to a multiple
        of 128; here the width is exactly ``d_intermediate``).
      attn_layer_idx: indices of the layers whose mixer is causal multi-head
        attention instead of Mamba (distinct, in ``[0, n_layer)``; a list is
        converted to a tuple). ``()`` is a pure Mamba model.
      attn_num_heads: query heads of the attention layers (h).
      attn_num_heads_kv: key/value heads (grouped-query attention); ``None``
        means ``attn_num_heads``. Must divide ``attn_num_heads``.
      attn_head_dim: dimension per head (p); ``None`` means ``d_model // attn_num_heads``
        (which must then divide exactly).
      attn_rotary_dim: RoPE is applied to the first ``attn_rotary_dim`` dims of
        each query and key head (rotate-half / GPT-NeoX convention); ``None``
        means the whole head, 0 disables RoPE. Must be even and <= the head dim.
      attn_rope_base: base of the RoPE frequencies.
      attn_qkv_bias: whether the fused q/k/v projection has a bias.
      attn_out_bias: whether the attention output projection has a bias.
      attn_d_conv: width of a causal depthwise convolution (with bias, no
        activation) over the fused q/k/v projection before RoPE, as the
        reference ``MHA(d_conv=...)`` of ``mamba2attn-2.7b``; 0 means none.
      layer: ``"mamba1"`` or ``"mamba2"``, the mixer of the non-attention layers.
        Mamba-2 ignores ``dt_rank``, ``dt_init`` and ``dt_scale`` (its time step
        is one bias per head) and uses ``d_state`` per head (the reference
        default is 128: the ``mamba2_*`` presets set it; the field's default 16
        is Mamba-1's).
      headdim: Mamba-2 channels per head (p); ``d_ssm % headdim == 0``.
      ngroups: Mamba-2 groups of B and C (g); the heads ``d_ssm / headdim``
        must be a multiple of it. The gated RMSNorm normalises each group of
        ``d_ssm / ngroups`` channels separately.
      chunk_size: Mamba-2 SSD chunk length (``ops.ssd(chunk_size=...)``).
      d_ssm: Mamba-2 channels that go through the SSM; ``None`` means
        ``d_inner``. With ``d_ssm < d_inner`` the other ``d_inner - d_ssm``
        channels form a gated MLP branch (``silu(z0) * x0``) concatenated
        before ``out_proj``, as in the reference.
      D_has_hdim: Mamba-2 skip ``D`` per channel (``d_ssm``) instead of per head.
      norm_before_gate: Mamba-2 gated RMSNorm order: ``False`` (the reference
        default) is ``norm(y * silu(z))``, ``True`` is ``norm(y) * silu(z)``.
      dt_limit: Mamba-2 clamp ``(lo, hi)`` of the time step after the softplus;
        ``(0, inf)`` (the default) means no clamp. A list is converted to a tuple.
      A_init_range: Mamba-2 ``A = -U(lo, hi)`` per head at initialisation (stored as ``A_log``).
      ssd_impl: ``impl`` passed to :func:`mamba_jax.ops.ssd`.
      scan_layers: run the blocks (without a cache) as one ``jax.lax.scan`` over their
        parameters stacked at call time, so compile time does not grow with depth; every
        layer must be of one kind (no ``attn_layer_idx`` in a model with Mamba layers).
        Same parameters, names and checkpoints; the stacked copy costs one more copy of
        the blocks' parameters while it lives.
      remat: rematerialise each block in the backward pass (``jax.checkpoint`` of the
        block, without a cache): ``"none"``, ``"full"`` (save nothing), ``"dots"``
        (save matmul outputs without batch dimensions), or any name in
        ``jax.checkpoint_policies`` (e.g. ``"dots_with_no_batch_dims_saveable"``).
    """

    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init: str = "random"
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    selective: bool = True
    scan_impl: str = "auto"
    d_intermediate: int = 0
    attn_layer_idx: tuple[int, ...] = ()
    attn_num_heads: int = 8
    attn_num_heads_kv: int | None = None
    attn_head_dim: int | None = None
    attn_rotary_dim: int | None = None
    attn_rope_base: float = 10000.0
    attn_qkv_bias: bool = False
    attn_out_bias: bool = False
    attn_d_conv: int = 0
    layer: str = "mamba1"
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    d_ssm: int | None = None
    D_has_hdim: bool = False
    norm_before_gate: bool = False
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    A_init_range: tuple[float, float] = (1.0, 16.0)
    ssd_impl: str = "auto"
    scan_layers: bool = False
    remat: str = "none"

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MambaConfig.{name}={value!r} must be a positive int")
        if self.dt_rank is not None and (not isinstance(self.dt_rank, int) or self.dt_rank < 1):
            raise ValueError(f"MambaConfig.dt_rank={self.dt_rank!r} must be None or a positive int")
        if self.dt_init not in ("random", "constant"):
            raise ValueError(f"MambaConfig.dt_init={self.dt_init!r} must be 'random' or 'constant'")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min=} {self.dt_max=}")
        from mamba_jax.ops.selective_scan import IMPLS

        if self.scan_impl not in IMPLS + ("auto",):
            raise ValueError(f"MambaConfig.scan_impl={self.scan_impl!r} is not one of {('auto',) + IMPLS}")
        self._validate_mlp_and_attention()
        self._validate_mamba2()
        self._validate_layer_loop()

    def _validate_layer_loop(self):
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"MambaConfig.scan_layers={self.scan_layers!r} must be a bool")
        if self.remat not in ("none", "full", "dots") and (
            str(self.remat).startswith("_") or not hasattr(jax.checkpoint_policies, str(self.remat))
        ):
            raise ValueError(
                f"MambaConfig.remat={self.remat!r} must be 'none', 'full', 'dots' or a jax.checkpoint_policies name"
            )
        if self.scan_layers and 0 < len(self.attn_layer_idx) < self.n_layer:
            raise ValueError(
                f"MambaConfig.scan_layers=True needs every layer of one kind, but attn_layer_idx="
                f"{self.attn_layer_idx} mixes attention and Mamba layers"
            )

    def _validate_mamba2(self):
        if self.layer not in ("mamba1", "mamba2"):
            raise ValueError(f"MambaConfig.layer={self.layer!r} must be 'mamba1' or 'mamba2'")
        for name in ("dt_limit", "A_init_range"):
            value = getattr(self, name)
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, name, value)  # frozen: keep the config hashable
            if (
                not isinstance(value, tuple)
                or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            ):
                raise ValueError(f"MambaConfig.{name}={value!r} must be a pair of numbers (lo, hi)")
            object.__setattr__(self, name, (float(value[0]), float(value[1])))
        lo, hi = self.dt_limit
        if not 0.0 <= lo <= hi:
            raise ValueError(f"MambaConfig.dt_limit={self.dt_limit!r} must have 0 <= lo <= hi")
        lo, hi = self.A_init_range
        if not 0.0 < lo <= hi:
            raise ValueError(f"MambaConfig.A_init_range={self.A_init_range!r} must have 0 < lo <= hi")
        for name in ("headdim", "ngroups", "chunk_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"MambaConfig.{name}={value!r} must be a positive int")
        for name in ("D_has_hdim", "norm_before_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MambaConfig.{name}={getattr(self, name)!r} must be a bool")
        from mamba_jax.ops.ssd import SSD_IMPLS

        if self.ssd_impl not in SSD_IMPLS + ("auto",):
            raise ValueError(f"MambaConfig.ssd_impl={self.ssd_impl!r} is not one of {('auto',) + SSD_IMPLS}")
        if self.d_ssm is not None and (not _is_int(self.d_ssm) or self.d_ssm < 1):
            raise ValueError(f"MambaConfig.d_ssm={self.d_ssm!r} must be None or a positive int")
        if self.layer != "mamba2":
            return  # the geometry below only matters for Mamba-2 layers
        if not self.selective:
            raise ValueError("MambaConfig.selective=False (the LTI ablation) exists for layer='mamba1' only")
        d_ssm = self.resolved_d_ssm
        if d_ssm > self.d_inner:
            raise ValueError(f"MambaConfig.d_ssm={d_ssm} must be <= d_inner = expand * d_model = {self.d_inner}")
        if d_ssm % self.headdim:
            raise ValueError(
                f"MambaConfig.headdim={self.headdim} must divide d_ssm={d_ssm} "
                f"({'d_inner = expand * d_model' if self.d_ssm is None else 'd_ssm'})"
            )
        if self.nheads % self.ngroups:
            raise ValueError(
                f"MambaConfig.ngroups={self.ngroups} must divide the number of heads d_ssm / headdim = {self.nheads}"
            )

    def _validate_mlp_and_attention(self):
        if not _is_int(self.d_intermediate) or self.d_intermediate < 0:
            raise ValueError(f"MambaConfig.d_intermediate={self.d_intermediate!r} must be an int >= 0 (0: no MLP)")
        idx = self.attn_layer_idx
        if isinstance(idx, list):
            idx = tuple(idx)
            object.__setattr__(self, "attn_layer_idx", idx)  # frozen: keep the config hashable
        if not isinstance(idx, tuple) or not all(_is_int(i) for i in idx):
            raise ValueError(f"MambaConfig.attn_layer_idx={idx!r} must be a tuple (or list) of ints")
        if len(set(idx)) != len(idx):
            raise ValueError(f"MambaConfig.attn_layer_idx={idx!r} has repeated layer indices")
        bad = [i for i in idx if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"MambaConfig.attn_layer_idx={idx!r} has indices {bad} outside [0, n_layer={self.n_layer})")
        for name in ("attn_num_heads_kv", "attn_head_dim"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"MambaConfig.{name}={value!r} must be None or a positive int")
        if not _is_int(self.attn_num_heads) or self.attn_num_heads < 1:
            raise ValueError(f"MambaConfig.attn_num_heads={self.attn_num_heads!r} must be a positive int")
        rd = self.attn_rotary_dim
        if rd is not None and (not _is_int(rd) or rd < 0 or rd % 2):
            raise ValueError(f"MambaConfig.attn_rotary_dim={rd!r} must be None or an even int >= 0 (0: no RoPE)")
        if not isinstance(self.attn_rope_base, (int, float)) or not self.attn_rope_base > 1:
            raise ValueError(f"MambaConfig.attn_rope_base={self.attn_rope_base!r} must be a number > 1")
        for name in ("attn_qkv_bias", "attn_out_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MambaConfig.{name}={getattr(self, name)!r} must be a bool")
        if not _is_int(self.attn_d_conv) or self.attn_d_conv < 0:
            raise ValueError(f"MambaConfig.attn_d_conv={self.attn_d_conv!r} must be an int >= 0 (0: no convolution)")
        if not idx:
            return  # the head geometry only matters when some layer is attention
        h, g = self.attn_num_heads, self.resolved_attn_num_heads_kv
        if h % g:
            raise ValueError(
                f"MambaConfig.attn_num_heads_kv={g} must divide attn_num_heads={h} (grouped-query attention)"
            )
        if self.attn_head_dim is None and self.d_model % h:
            raise ValueError(
                f"MambaConfig.attn_num_heads={h} must divide d_model={self.d_model} when attn_head_dim is None"
            )
        if self.resolved_attn_rotary_dim > self.resolved_attn_head_dim:
            raise ValueError(f"MambaConfig.attn_rotary_dim={rd} exceeds the head dimension {self.resolved_attn_head_dim}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_d_ssm(self) -> int:
        """Mamba-2 channels through the SSM (``d_inner`` when ``d_ssm`` is None)."""
        return self.d_inner if self.d_ssm is None else self.d_ssm

    @property
    def nheads(self) -> int:
        """Mamba-2 heads (h = ``d_ssm / headdim``)."""
        return self.resolved_d_ssm // self.headdim

    @property
    def is_mamba2(self) -> bool:
        return self.layer == "mamba2"

    @property
    def resolved_dt_rank(self) -> int:
        """The resolved delta rank (``ceil(d_model / 16)`` when ``dt_rank`` is None)."""
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)

    @property
    def resolved_attn_num_heads_kv(self) -> int:
        """Key/value heads of the attention layers (``attn_num_heads`` when ``attn_num_heads_kv`` is None)."""
        return self.attn_num_heads if self.attn_num_heads_kv is None else self.attn_num_heads_kv

    @property
    def resolved_attn_head_dim(self) -> int:
        """Head dimension of the attention layers (``d_model // attn_num_heads`` when ``attn_head_dim`` is None)."""
        return self.d_model // self.attn_num_heads if self.attn_head_dim is None else self.attn_head_dim

    @property
    def resolved_attn_rotary_dim(self) -> int:
        """Number of RoPE dims per head (the head dimension when ``attn_rotary_dim`` is None)."""
        return self.resolved_attn_head_dim if self.attn_rotary_dim is None else self.attn_rotary_dim

    @property
    def has_attention(self) -> bool:
        return bool(self.attn_layer_idx)

    def is_attention_layer(self, i: int) -> bool:
        return i in self.attn_layer_idx

    @property
    def n_residuals_per_layer(self) -> int:
        """Residual branches per block: 2 with an MLP, else 1 (the reference's output-projection
        rescale is ``1 / sqrt(n_residuals_per_layer * n_layer)``)."""
        return 2 if self.d_intermediate > 0 else 1

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    def replace(self, **changes) -> "MambaConfig":
        return dataclasses.replace(self, **changes)

    # Presets of the reference checkpoints (state-spaces/mamba-*).
    @classmethod
    def tiny(cls, **kw) -> "MambaConfig":
        """A small model for tests and CPU demos."""
        return cls(**{"d_model": 64, "n_layer": 2, "vocab_size": 256, **kw})

    @classmethod
    def transformer_pp(
        cls,
        d_model: int = 768,
        n_layer: int = 12,
        vocab_size: int = 50277,
        attn_num_heads: int = 12,
        d_intermediate: int | None = None,
        **kw,
    ) -> "MambaConfig":
        """The paper's Transformer++ baseline: every layer causal attention with RoPE,
        followed by a SwiGLU MLP; RMSNorm, no biases.

        ``n_layer`` counts blocks of one attention and one MLP each; the defaults are
        the paper's 125M Transformer++ (12 blocks, width 768, 12 heads), which has
        about as many parameters as the 24-layer Mamba of the same width. The MLP
        width defaults to 8/3 * d_model rounded up to a multiple of 8, which keeps
        the parameter count of a 4 * d_model GELU MLP.
        """
        if d_intermediate is None:
            d_intermediate = -(-8 * d_model // 24) * 8
        return cls(
            **{
                "d_model": d_model,
                "n_layer": n_layer,
                "vocab_size": vocab_size,
                "attn_num_heads": attn_num_heads,
                "d_intermediate": d_intermediate,
                "attn_layer_idx": tuple(range(n_layer)),
                **kw,
            }
        )

    @classmethod
    def mamba_130m(cls, **kw) -> "MambaConfig":
        return cls(**{"d_model": 768, "n_layer": 24, **kw})

    @classmethod
    def mamba_370m(cls, **kw) -> "MambaConfig":
        return cls(**{"d_model": 1024, "n_layer": 48, **kw})

    @classmethod
    def mamba_790m(cls, **kw) -> "MambaConfig":
        return cls(**{"d_model": 1536, "n_layer": 48, **kw})

    @classmethod
    def mamba_1_4b(cls, **kw) -> "MambaConfig":
        return cls(**{"d_model": 2048, "n_layer": 48, **kw})

    @classmethod
    def mamba_2_8b(cls, **kw) -> "MambaConfig":
        return cls(**{"d_model": 2560, "n_layer": 64, **kw})

    # Presets of the reference Mamba-2 checkpoints (state-spaces/mamba2-*, config.json:
    # ssm_cfg {"layer": "Mamba2"} with the Mamba2 defaults d_state 128, headdim 64,
    # ngroups 1, expand 2, d_conv 4, chunk_size 256; vocab 50277 padded to 16; tied).
    @classmethod
    def mamba2(cls, d_model: int, n_layer: int, **kw) -> "MambaConfig":
        """A Mamba-2 model with the reference defaults (the ``mamba2_*`` presets)."""
        return cls(
            **{
                "d_model": d_model,
                "n_layer": n_layer,
                "vocab_size": 50277,
                "pad_vocab_size_multiple": 16,
                "layer": "mamba2",
                "d_state": 128,
                "headdim": 64,
                "ngroups": 1,
                "chunk_size": 256,
                **kw,
            }
        )

    @classmethod
    def mamba2_130m(cls, **kw) -> "MambaConfig":
        return cls.mamba2(768, 24, **kw)

    @classmethod
    def mamba2_370m(cls, **kw) -> "MambaConfig":
        return cls.mamba2(1024, 48, **kw)

    @classmethod
    def mamba2_780m(cls, **kw) -> "MambaConfig":
        return cls.mamba2(1536, 48, **kw)

    @classmethod
    def mamba2_1_3b(cls, **kw) -> "MambaConfig":
        return cls.mamba2(2048, 48, **kw)

    @classmethod
    def mamba2_2_7b(cls, **kw) -> "MambaConfig":
        return cls.mamba2(2560, 64, **kw)

    @classmethod
    def mamba2attn_2_7b(cls, **kw) -> "MambaConfig":
        """``state-spaces/mamba2attn-2.7b``: Mamba-2 with six attention layers (config.json
        ``attn_layer_idx`` [9, 18, 27, 36, 45, 56], ``attn_cfg`` 30 heads of 128, RoPE on 64
        dims, ``d_conv`` 4, no biases)."""
        attn = dict(
            attn_layer_idx=(9, 18, 27, 36, 45, 56), attn_num_heads=30, attn_head_dim=128, attn_rotary_dim=64,
            attn_d_conv=4, attn_qkv_bias=False, attn_out_bias=False,
        )
        return cls.mamba2(2560, 64, **{**attn, **kw})
