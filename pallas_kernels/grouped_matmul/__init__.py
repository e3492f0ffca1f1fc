"""Grouped matmul (MoE experts over rows sorted by expert): the pure-JAX reference and the Pallas TPU kernels."""

from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference, grouped_matmul_transposed_reference

__all__ = ["grouped_matmul_reference", "grouped_matmul_transposed_reference"]
