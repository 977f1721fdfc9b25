"""Model configuration: one frozen dataclass with the reference presets."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """Configuration of a Mamba-1 language model (names follow ``mamba_ssm``).

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

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        """The resolved delta rank (``ceil(d_model / 16)`` when ``dt_rank`` is None)."""
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)

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
