"""Block sizes of the selective-scan kernels and the memory arithmetic behind them.

Block sizes never live in the model config; pass a :class:`SelectiveScanBlockSizes`
to ``selective_scan_pallas(..., block_sizes=...)`` to override the defaults.

TPU: scoped VMEM
================

Every buffer below is float32 (the wrappers cast the inputs), ``W`` is the
channel tile (``tpu_block_d``), ``T`` the time block (``block_l``), ``n`` the
state size. Pallas double-buffers every pipelined input and output block.
Per grid step, with every optional operand present (the worst case):

* forward:  4 blocks (T, W): u, dt, z in, y out             x 2 buffers
            4 blocks (n, W): A, h0 in, states, hT out        x 2 buffers
            2 blocks (W,):   D, bias                         x 2 buffers
            scratch (n, W):  the carried state
* backward: 7 blocks (T, W): u, dt, dy, z in, du, ddt, dz out   x 2 buffers
            6 blocks (n, W): A, states, dhT, dstates in, dA, dh0 out   x 2 buffers
            3 blocks (W,):   D, bias in, dD out              x 2 buffers
            scratch (T n + 2 n + 1, W): the block's recomputed states,
            the carried adjoint, the dA and dD accumulators

The backward dominates through its recompute scratch, ``4 T n W`` bytes: at
T = 64, n = 128, W = 1024 that alone is 32 MiB. The smallest target is the
scoped VMEM of v4 and v5e (16 MiB; v4 has no more VMEM at all), so the kernels
ask for exactly ``TPU_VMEM_LIMIT_BYTES`` = 16 MiB and the default channel tile
is the widest of 1024, 512, 256, 128 that divides the group's channels
(rounded up to 128) and whose backward footprint stays within
``TPU_VMEM_BUDGET_BYTES`` = 12 MiB, leaving 4 MiB to Mosaic's own scratch
(register spills of the ``n`` state vregs). At T = 64 that gives
W = 1024 for n <= 16 (8.4 MiB at n = 16), 512 for n = 32 and 64 (11.5 MiB
at n = 64) and 256 for n = 128 (10.6 MiB)
(:func:`tpu_vmem_bytes`; the compile tests in ``tests/test_tpu_compile.py``
check every such choice with the real compiler on v4, v5e, v5p and v6e).

B and C travel through SMEM as one (1, T n) row per time block (two in the
forward, four with dB and dC in the backward, double-buffered): 256 KiB at
T = 64, n = 128.

GPU: registers, L1/L2 and HBM
=============================

One program per (sequence, channel tile of ``W = gpu_block_d`` channels):

* registers: the state (W, N) float32, N = n rounded up to a power of two, over
  ``num_warps * 32`` threads: ``W N / (32 num_warps)`` registers per thread
  (16 at W = 16, N = 128, 4 warps), plus one unrolled group of input rows.
* backward scratch: the chunk's recomputed states, ``4 T W N`` bytes per
  program in global memory (64 KiB at n = 16, 512 KiB at n = 128 with the
  defaults), read back while still in L1/L2 only when the programs' total
  ``4 b d T N`` bytes fits the L2 (50 MiB on an H100: n = 16 up to
  b d = 12k channels-sequences, n = 128 only up to b d = 1.5k).
* backward partial sums of dB and dC: ``2 * 4 b (d / W) L N`` bytes of HBM
  (:func:`gpu_backward_extra_bytes`), reduced in XLA; this, not the scratch,
  dominates the backward's extra memory at large d and n.
"""

from __future__ import annotations

import dataclasses

MAX_STATE_SIZE = 128  # n above this is refused by the kernels (see the budget above)

MiB = 1 << 20
TPU_VMEM_LIMIT_BYTES = 16 * MiB  # asked of Mosaic: the scoped VMEM of v4/v5e, the smallest targets
TPU_VMEM_BUDGET_BYTES = 12 * MiB  # for our own buffers; the rest is Mosaic's
TPU_TILES = (1024, 512, 256, 128)
_F32_BYTES = 4


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _is_pow2(x) -> bool:
    return isinstance(x, int) and x >= 1 and not x & (x - 1)


def tpu_vmem_bytes(pass_: str, block_l: int, block_d: int, state_size: int) -> int:
    """Bytes of VMEM one grid step of the TPU kernel uses (``pass_``: "fwd" or "bwd"),
    with every optional operand present; the arithmetic is in the module docstring."""
    T, W, n = block_l, block_d, state_size
    if pass_ == "fwd":
        blocks = 4 * T * W + 4 * n * W + 2 * W
        scratch = n * W
    elif pass_ == "bwd":
        blocks = 7 * T * W + 6 * n * W + 3 * W
        scratch = (T * n + 2 * n + 1) * W
    else:
        raise ValueError(f"{pass_=} must be 'fwd' or 'bwd'")
    return _F32_BYTES * (2 * blocks + scratch)


def default_tpu_tile(block_l: int, state_size: int, channels_per_group: int) -> int:
    """The widest tile of ``TPU_TILES`` whose backward fits ``TPU_VMEM_BUDGET_BYTES``
    and that divides the group's channels rounded up to 128 (so a group is
    padded by fewer than 128 channels: 1536 channels take 512-wide tiles)."""
    channels = _round_up(channels_per_group, 128)
    for W in TPU_TILES:
        if channels % W == 0 and tpu_vmem_bytes("bwd", block_l, W, state_size) <= TPU_VMEM_BUDGET_BYTES:
            return W
    raise ValueError(
        f"no TPU channel tile fits the VMEM budget of {TPU_VMEM_BUDGET_BYTES} bytes at "
        f"block_l={block_l}, state size n={state_size}: lower block_l"
    )


def gpu_backward_extra_bytes(batch: int, seq_len: int, channels: int, state_size: int, bs: "SelectiveScanBlockSizes"):
    """HBM the GPU backward allocates beyond its inputs and outputs: the recompute
    scratch and the per-tile partial sums of dB and dC (module docstring)."""
    T, W, N = bs.block_l, bs.gpu_tile(channels), _next_pow2(state_size)
    Dp, L = _round_up(channels, W), _round_up(seq_len, T)
    scratch = batch * Dp * T * N
    partials = 2 * batch * (Dp // W) * L * N
    return _F32_BYTES * (scratch + partials)


@dataclasses.dataclass(frozen=True)
class SelectiveScanBlockSizes:
    """Tiling of the selective scan.

    The TPU and GPU tiles are separate fields because one jitted function can
    carry both kernels (``impl="auto"`` lowers one branch per platform): each
    is validated here, for its own platform.

    Attributes:
      block_l: time steps per grid step (TPU) / per chunk (GPU). The forward pass
        saves the state at every block boundary, so the residual memory of the
        backward pass is ``b * (l / block_l) * d * n`` float32 values, and the
        backward recomputes ``block_l`` states on chip per block.
      tpu_block_d: channels per TPU tile, a multiple of 128 (tiles are
        (tpu_block_d / 128, 128) float32 arrays; 1024 fills whole (8, 128) vregs),
        or None: :func:`default_tpu_tile`, derived from the VMEM budget and the
        group's width.
        An explicit tile whose backward exceeds the budget is an error.
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

    def tpu_tile(self, channels_per_group: int, state_size: int) -> int:
        """The TPU channel tile for groups of ``channels_per_group`` channels."""
        if self.tpu_block_d is None:
            return default_tpu_tile(self.block_l, state_size, channels_per_group)
        need = tpu_vmem_bytes("bwd", self.block_l, self.tpu_block_d, state_size)
        if need > TPU_VMEM_BUDGET_BYTES:
            raise ValueError(
                f"tpu_block_d={self.tpu_block_d} with block_l={self.block_l} and n={state_size} needs "
                f"{need} bytes of VMEM in the backward, over the budget of {TPU_VMEM_BUDGET_BYTES}"
            )
        return self.tpu_block_d

    def gpu_tile(self, channels_per_group: int) -> int:
        """The GPU channel tile for groups of ``channels_per_group`` channels."""
        del channels_per_group  # every group is padded to a multiple of the tile
        return 16 if self.gpu_block_d is None else self.gpu_block_d
