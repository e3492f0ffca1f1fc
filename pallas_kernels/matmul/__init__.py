"""`x · Wᵀ` for a weight in the checkpoint's [out, in] orientation: the oracles, the XLA path, and the CPU path
with its C++ kernel for any number of rows (batch-invariant: a row's products do not depend on the rows beside it)."""

from pallas_kernels.matmul.cpu import matmul_cpu
from pallas_kernels.matmul.reference import matmul_canonical, matmul_reference
from pallas_kernels.matmul.xla import matmul_xla

__all__ = ["matmul_reference", "matmul_canonical", "matmul_xla", "matmul_cpu"]
