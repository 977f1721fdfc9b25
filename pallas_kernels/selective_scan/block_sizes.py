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

    The TPU and GPU tiles are separate fields because one jitted function
    carries both kernels (``jax.lax.platform_dependent``): each is validated
    here, for its own platform, whatever platform the call lowers for.

    Attributes:
      block_l: time steps per grid step (TPU) / per chunk (GPU). The forward pass
        saves the state at every chunk boundary, so the residual memory of the
        backward pass is ``b * (l / block_l) * d * n`` float32 values, and the
        backward recomputes ``block_l`` states on chip per chunk.
      tpu_block_d: channels per TPU tile, a multiple of 128 (tiles are
        (tpu_block_d / 128, 128) vregs; a multiple of 1024 fills whole (8, 128)
        float32 vregs), or None: ``min(1024, channels per group rounded up to 128)``.
      gpu_block_d: channels per GPU program, a power of two, or None: 16
        (the fastest of 16/32/64 channels x 2/4 warps on an H100 at
        b=1, l=32k, d=2048, n=16; experiments/results/bench_scan_h100.json).
      num_warps: warps per program of the GPU kernel (a power of two); 4
        measured best with 16 channels (same sweep).

    Channel tiles never straddle a group: each group's channels are padded to a
    multiple of the tile.
    """

    block_l: int = 64
    tpu_block_d: int | None = None
    gpu_block_d: int | None = None
    num_warps: int = 4

    def __post_init__(self):
        if not isinstance(self.block_l, int) or self.block_l < 1:
            raise ValueError(f"block_l={self.block_l!r} must be a positive int")
        if self.tpu_block_d is not None and (
            not isinstance(self.tpu_block_d, int) or self.tpu_block_d < 128 or self.tpu_block_d % 128
        ):
            raise ValueError(f"tpu_block_d={self.tpu_block_d!r} must be a positive multiple of 128 or None")
        if self.gpu_block_d is not None and not _is_pow2(self.gpu_block_d):
            raise ValueError(f"gpu_block_d={self.gpu_block_d!r} must be a power of two or None")
        if not _is_pow2(self.num_warps):
            raise ValueError(f"num_warps={self.num_warps!r} must be a power of two")

    def tpu_tile(self, channels_per_group: int) -> int:
        """The TPU channel tile for groups of ``channels_per_group`` channels."""
        if self.tpu_block_d is None:
            return min(1024, _round_up(channels_per_group, 128))
        return self.tpu_block_d

    def gpu_tile(self, channels_per_group: int) -> int:
        """The GPU channel tile for groups of ``channels_per_group`` channels."""
        del channels_per_group  # every group is padded to a multiple of the tile
        return 16 if self.gpu_block_d is None else self.gpu_block_d


def _is_pow2(x) -> bool:
    return isinstance(x, int) and x >= 1 and not x & (x - 1)
