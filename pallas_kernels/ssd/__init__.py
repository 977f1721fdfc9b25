"""Pallas SSD (Mamba-2) kernels: TPU (Mosaic) and GPU, forward and backward."""

from pallas_kernels.ssd.config import SsdKernelConfig
from pallas_kernels.ssd.ops import ssd_pallas

__all__ = ["ssd_pallas", "SsdKernelConfig"]
