"""VMEM arithmetic of the TPU SSD kernels (``tpu.py``).

One grid step works on one head's chunk of T steps. In VMEM, a float32 block
(rows, cols) takes ``rows_p * cols_p * 4`` bytes with rows rounded up to 8 and
cols to 128 (the (8, 128) tiling; p = 64 fills half the lanes). Pallas
double-buffers every pipelined block. With every optional operand present:

* forward:  blocks x, z in, y out (T, p); B, C (T, n); dt and document rows
            (1, T); D (1, p); h0, the saved state, hT (p, n)
            scratch: the state (p, n)
* backward: blocks x, z, dy in, dx, dz out (T, p); B, C in, dB, dC out (T, n);
            dt and document rows in, ddt and dA rows out (1, T); D in, dD out
            (1, p); the saved state, dhT in, dh0 out (p, n)
            scratch: the state cotangent (p, n)

plus the chunk's (T, T) float32 temporaries (the decay matrix, its masks and
index grids, C B^T, their products and transposes): ``TT_TEMPORARIES`` of them
is the estimate used here (Mosaic decides what is live at once). At T = 256,
p = 64, n = 128 the backward's estimate is under 7 MiB, within the 12 MiB
budget under the 16 MiB ``vmem_limit_bytes`` the kernels ask for (the scoped
VMEM of v4 and v5e, the smallest targets); the compile tests
(``experiments/tpu_compile_ssd.py``) check the real compiler agrees.
"""

from __future__ import annotations

MiB = 1 << 20
TPU_VMEM_LIMIT_BYTES = 16 * MiB  # asked of Mosaic: the scoped VMEM of v4/v5e
TPU_VMEM_BUDGET_BYTES = 12 * MiB  # for our own buffers; the rest is Mosaic's
TT_TEMPORARIES = 14
_F32_BYTES = 4


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _tile_bytes(rows: int, cols: int) -> int:
    return _round_up(rows, 8) * _round_up(cols, 128) * _F32_BYTES


def tpu_vmem_bytes(pass_: str, chunk: int, headdim: int, state_size: int) -> int:
    """Estimated VMEM bytes of one grid step (``pass_``: "fwd" or "bwd"), every operand present."""
    T, p, n = chunk, headdim, state_size
    seq, seq_n, row, chan, state = _tile_bytes(T, p), _tile_bytes(T, n), _tile_bytes(1, T), _tile_bytes(1, p), _tile_bytes(p, n)
    if pass_ == "fwd":
        blocks = 3 * seq + 2 * seq_n + 2 * row + chan + 3 * state
    elif pass_ == "bwd":
        blocks = 5 * seq + 4 * seq_n + 4 * row + 2 * chan + 3 * state
    else:
        raise ValueError(f"{pass_=} must be 'fwd' or 'bwd'")
    return 2 * blocks + state + TT_TEMPORARIES * _tile_bytes(T, T)


def check_tpu_vmem(chunk: int, headdim: int, state_size: int) -> None:
    """Raises before lowering when the backward's estimate exceeds the budget."""
    need = tpu_vmem_bytes("bwd", chunk, headdim, state_size)
    if need > TPU_VMEM_BUDGET_BYTES:
        raise ValueError(
            f"the TPU SSD kernel at chunk={chunk}, headdim p={headdim}, state size n={state_size} needs about "
            f"{need} bytes of VMEM in the backward, over the budget of {TPU_VMEM_BUDGET_BYTES}: lower chunk_size"
        )
