"""Grouped matmul (MoE experts over rows sorted by expert): the oracle, the XLA path, the Pallas TPU kernels and the
Mosaic GPU kernels."""

from pallas_kernels.grouped_matmul.gpu import grouped_matmul_gpu
from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference, grouped_matmul_transposed_reference
from pallas_kernels.grouped_matmul.tpu import grouped_matmul_tpu
from pallas_kernels.grouped_matmul.xla import grouped_matmul_xla

__all__ = ["grouped_matmul_reference", "grouped_matmul_transposed_reference", "grouped_matmul_xla",
           "grouped_matmul_tpu", "grouped_matmul_gpu"]
