"""Block sizes of the selective-scan kernels: a frozen, validated dataclass.

Block sizes never live in the model config; pass one of these to
``selective_scan_pallas(..., block_sizes=...)`` to override the defaults.
"""

from __future__ import annotations

import dataclasses

MAX_STATE_SIZE = 128  # n above this does not fit the on-chip state budget we plan for


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class SelectiveScanBlockSizes:
    """Tiling of the selective scan.

    Attributes:
      block_l: time steps per grid step (TPU) / per chunk (GPU). The forward pass
        saves the state at every chunk boundary, so the residual memory of the
        backward pass is ``b * (l / block_l) * d * n`` float32 values, and the
        backward recomputes ``block_l`` states on chip per chunk.
      block_d: channels per tile, or None for the platform default for the
        shape. TPU: a multiple of 128 (tiles are (block_d / 128, 128) vregs;
        a multiple of 1024 fills whole (8, 128) f32 vregs). GPU: a power of two.
        Channel tiles never straddle a group: each group's channels are padded
        to a multiple of ``block_d``.
      num_warps: warps per program of the GPU kernel (a power of two).
    """

    block_l: int = 64
    block_d: int | None = None
    num_warps: int = 2


    def __post_init__(self):
        if not isinstance(self.block_l, int) or self.block_l < 1:
            raise ValueError(f"block_l={self.block_l!r} must be a positive int")
        if self.block_d is not None and (not isinstance(self.block_d, int) or self.block_d < 1):
            raise ValueError(f"block_d={self.block_d!r} must be a positive int or None")
        if not isinstance(self.num_warps, int) or self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps={self.num_warps!r} must be a power of two")

    def tpu_block_d(self, channels_per_group: int) -> int:
        """The TPU channel tile for groups of ``channels_per_group`` channels."""
        if self.block_d is None:
            return min(1024, _round_up(channels_per_group, 128))
        if self.block_d % 128:
            raise ValueError(f"block_d={self.block_d} must be a multiple of 128 for the TPU kernel")
        return self.block_d

    def gpu_block_d(self, channels_per_group: int) -> int:
        """The GPU channel tile (a power of two) for groups of ``channels_per_group`` channels."""
        if self.block_d is None:
            return min(32, max(16, _next_pow2(channels_per_group)))
        if self.block_d & (self.block_d - 1):
            raise ValueError(f"block_d={self.block_d} must be a power of two for the GPU kernel")
        return self.block_d
