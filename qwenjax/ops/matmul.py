"""`x · Wᵀ` (every linear layer, the LM head) as the model calls it: one function that picks an implementation.

- "xla": XLA's dot (fp32 accumulation);
- "kernel": on the CPU, products of 1-4 rows (decode at batch 1-4) go to a C++ kernel that streams the weights at
  memory bandwidth (`pallas_kernels/matmul/cpu.py`), the rest to XLA's dot.
The choice is the model's `Kernels.cpu_matvec` ("auto": the kernel on CPU when it builds, XLA elsewhere).
"""

from __future__ import annotations

import jax

from pallas_kernels.matmul import cpu
from pallas_kernels.matmul.cpu import matmul_cpu
from pallas_kernels.matmul.xla import matmul_xla
from qwenjax.ops.platform import platform_of

IMPLEMENTATIONS = {"kernel": matmul_cpu, "xla": matmul_xla}


def auto(platform: str) -> str:
    return "kernel" if platform == "cpu" and cpu.available() else "xla"


def matmul_wt(x: jax.Array, w: jax.Array, *, implementation: str = "auto") -> jax.Array:
    """x [..., in] · w[out, in]ᵀ → [..., out] fp32 (operands in their dtype, fp32 accumulation).

    `implementation` is a name of IMPLEMENTATIONS; "auto" picks by the default backend.
    """
    if implementation == "auto":
        implementation = auto(platform_of())
    return IMPLEMENTATIONS[implementation](x, w)
