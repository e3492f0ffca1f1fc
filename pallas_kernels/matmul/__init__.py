"""`x · Wᵀ` for a weight in the checkpoint's [out, in] orientation: the oracle, the XLA path, and the CPU path
with its C++ kernel for products of 1-4 rows (decode)."""

from pallas_kernels.matmul.cpu import matmul_cpu
from pallas_kernels.matmul.reference import matmul_reference
from pallas_kernels.matmul.xla import matmul_xla

__all__ = ["matmul_reference", "matmul_xla", "matmul_cpu"]
