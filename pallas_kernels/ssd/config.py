"""The static configuration shared by the SSD kernels of every platform."""

from __future__ import annotations

from typing import NamedTuple


class SsdKernelConfig(NamedTuple):
    """What a platform kernel (``tpu.ssd_tpu`` / ``gpu.ssd_gpu``) needs to know statically.

    Attributes:
      length: the true sequence length l; steps ``t >= length`` are padding (the
        kernels force their processed dt to 0: identity steps).
      chunk: T, steps per chunk; the padded length L is a multiple of T.
      softplus: ``dt = softplus(dt + dt_bias)`` inside the kernel.
      dt_limit: ``(lo, hi)`` floats, the clamp applied after the softplus;
        ``(0.0, inf)`` means no clamp.
      interpret: ``pallas_call(interpret=...)``: False, True, or (TPU) a
        ``pltpu.InterpretParams``.
    """

    length: int
    chunk: int
    softplus: bool
    dt_limit: tuple
    interpret: object
