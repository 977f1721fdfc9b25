"""Tiling of the GPU (Triton) SSD kernels and the memory arithmetic behind it.

Every in-kernel array of the Triton backend must have power-of-two dimensions,
and ``tl.dot`` needs every matrix dimension >= 16. So the wrapper pads the head
dimension p to ``P`` and the state size n to ``N`` (zeros: padded channels and
state columns stay exactly zero and are cropped), and the chunk T itself must
be a power of two >= 16. Inside a chunk the kernels work on square tiles of
``block_t`` = min(T, 32) steps for 16-bit inputs, min(T, 16) for float32.

Registers and shared memory: the tile ``block_t`` and the warps per program
(4; 8 for the backward's row and column kernels) were chosen by
compiling the exported kernels to cubin for sm80 and sm90 without a GPU
(``experiments/ssd_gpu_cubin.py``: the Triton wheel's compiler and ptxas on
the Triton IR that ``jax.export`` embeds): with them no kernel spills
registers on bf16 inputs at p = 64, n = 64 and 128, chunk 256, and shared
memory stays far below an A100's or H100's. Tiles of 64 spilled in both
backward kernels even at 8 warps. float32 inputs (three TF32 passes per
matmul hold more operands) spilled kilobytes per thread at tiles of 32; at
16 only the two backward tile kernels spill, a few hundred bytes.
The per-kernel counts are in ``experiments/results/ssd_gpu_cubin.json``. What
each program holds (float32 unless noted):

* row kernels (chunk outputs, and the backward's dC): the (block_t, block_t)
  decay-masked ``C B^T`` tile, the (block_t, P) output accumulator, the
  (block_t, N) dC accumulator (backward), the (P, N) entering state.
* column kernel (dx, dB): the transposed tile, the (block_t, P) dx and
  (block_t, N) dB accumulators, the (P, N) state cotangent.
* chunk-state kernels: the (P, N) accumulator and one (block_t, P) and
  (block_t, N) input tile.
* state passing: a (``PASS_BLOCK``,) slice of the flattened (P N) state.

HBM beyond the inputs and outputs (:func:`gpu_extra_bytes`):

* forward, kept for the backward: the chunk-entering states
  ``4 b (L / T) h P N`` bytes (the only residual besides the inputs);
* forward, transient: the chunk-local states, the same size again; the
  processed dt and its within-chunk cumulative sum ``2 * 4 b h L`` bytes;
* backward, transient: the local state cotangents and the passed ones
  (2 x the states), per-head partial sums of dB and dC ``2 * 4 b L h N`` bytes
  reduced over each group's heads in XLA (at h = 24, n = 128 that is 24 KiB per
  step and sequence, the largest term at long L), and the row tiles' partial
  sums of d(dt A), ``4 b h L T / block_t`` bytes.
"""

from __future__ import annotations

from typing import NamedTuple

MAX_BLOCK_T = {2: 32, 4: 16}  # the square in-chunk tile (rows t x columns s), by input itemsize
MIN_DOT = 16  # tl.dot's smallest matrix dimension
PASS_BLOCK = 1024  # flattened state elements per state-passing program
NUM_WARPS = 4
NUM_WARPS_BACKWARD_TILES = 8  # the backward's row and column kernels
_F32_BYTES = 4


def next_pow2(x: int, floor: int = 1) -> int:
    """The smallest power of two >= max(x, floor)."""
    return max(floor, 1 << max(0, (int(x) - 1).bit_length()))


def is_pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


class GpuSsdTiles(NamedTuple):
    """Static tiling of one call.

    Attributes:
      chunk: T, steps per chunk (power of two >= 16).
      block_t: the in-chunk tile, min(T, 32) steps (16-bit inputs) or min(T, 16) (float32).
      P: the head dimension p padded to a power of two >= 16.
      N: the state size n padded to a power of two >= 16.
      pass_block: flattened (P N) state elements per state-passing program.
    """

    chunk: int
    block_t: int
    P: int
    N: int
    pass_block: int


def gpu_tiles(chunk: int, p: int, n: int, itemsize: int = 2) -> GpuSsdTiles:
    """The tiling for chunk T, head dimension p, state size n and inputs of ``itemsize``
    bytes (2: bf16/f16, 4: float32); errors name the bad value."""
    if not isinstance(chunk, int) or not is_pow2(chunk) or chunk < MIN_DOT:
        raise ValueError(
            f"chunk={chunk!r}: the GPU SSD kernel needs a chunk size that is a power of two >= {MIN_DOT} "
            "(Triton tensors have power-of-two shapes and tl.dot needs dimensions >= 16); use e.g. 64, 128 or 256"
        )
    P, N = next_pow2(p, MIN_DOT), next_pow2(n, MIN_DOT)
    if itemsize not in MAX_BLOCK_T:
        raise ValueError(f"{itemsize=}: the GPU SSD kernel takes 16-bit or float32 inputs")
    return GpuSsdTiles(chunk, min(chunk, MAX_BLOCK_T[itemsize]), P, N, min(PASS_BLOCK, P * N))


def gpu_extra_bytes(b: int, L: int, h: int, p: int, n: int, chunk: int, itemsize: int = 2) -> dict[str, int]:
    """HBM the kernels use beyond inputs and outputs, in bytes (see the module docstring)."""
    t = gpu_tiles(chunk, p, n, itemsize)
    states = _F32_BYTES * b * (L // chunk) * h * t.P * t.N
    dt_arrays = 2 * _F32_BYTES * b * h * L
    return {
        "residual_states": states,
        "forward_transient": states + dt_arrays,
        "backward_transient": 2 * states + dt_arrays + 2 * _F32_BYTES * b * L * h * t.N
        + _F32_BYTES * b * h * L * (chunk // t.block_t),
    }
