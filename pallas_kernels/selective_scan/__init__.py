"""Pallas selective-scan kernels (TPU: Mosaic; GPU: Triton) with the state kept on chip."""

from pallas_kernels.selective_scan.block_sizes import SelectiveScanBlockSizes
from pallas_kernels.selective_scan.ops import selective_scan_pallas

__all__ = ["selective_scan_pallas", "SelectiveScanBlockSizes"]
