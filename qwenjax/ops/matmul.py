"""`x · Wᵀ` (every linear layer, the LM head) as the model calls it: one function that picks an implementation.

- "xla": XLA's dot (fp32 accumulation);
- "kernel": on the CPU, every product of bf16 or fp32 operands, whatever its number of rows, goes to a C++ kernel
  (`pallas_kernels/matmul/cpu.py`) that streams the weights at memory bandwidth when decoding and sums each output
  in one fixed order: a row's products are the same bits alone, in a decode batch of any size or in a padded
  prefill (batch invariance: a served request gets the tokens `generate` gives it alone).
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
