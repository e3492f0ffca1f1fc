"""Grouped matmul as the MoE calls it: one function that picks an implementation.

`grouped_matmul(lhs [M, K], rhs [G, N, K], group_sizes [G])` → [M, N] fp32 (contract:
`pallas_kernels/grouped_matmul/base.py`).
- "ragged_dot": XLA (`pallas_kernels/grouped_matmul/xla.py`; the fallback everywhere);
- "pallas_tpu": the megablox-style Mosaic kernels with their custom VJP (`pallas_kernels/grouped_matmul/tpu.py`);
- "pallas_tpu_interpret": the same kernels through Pallas' TPU interpreter, on any backend (slow; for tests);
- "pallas_gpu": JAX's Mosaic GPU kernels (Hopper) under our custom VJP (`pallas_kernels/grouped_matmul/gpu.py`);
- "pallas_gpu_interpret": the same through Mosaic GPU's interpreter with race detection (CPU; jax >= 0.11).
The choice is the model's `Kernels.grouped_matmul` ("auto": pallas_tpu on TPU, pallas_gpu on NVIDIA Hopper,
ragged_dot elsewhere).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.base import check_shapes
from pallas_kernels.grouped_matmul.gpu import grouped_matmul_gpu
from pallas_kernels.grouped_matmul.tpu import grouped_matmul_tpu
from pallas_kernels.grouped_matmul.xla import grouped_matmul_xla
from qwenjax.ops.platform import HOPPER, platform_of

IMPLEMENTATIONS = {
    "ragged_dot": grouped_matmul_xla,
    "pallas_tpu": grouped_matmul_tpu,
    "pallas_tpu_interpret": functools.partial(grouped_matmul_tpu, interpret=True),
    "pallas_gpu": grouped_matmul_gpu,
    "pallas_gpu_interpret": functools.partial(grouped_matmul_gpu, interpret=True),
}


def auto(platform: str) -> str:
    return {"tpu": "pallas_tpu", HOPPER: "pallas_gpu"}.get(platform, "ragged_dot")


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   implementation: str = "auto") -> jax.Array:
    """`implementation` is a name of IMPLEMENTATIONS; "auto" picks by the first default device."""
    check_shapes(lhs, rhs, group_sizes)
    if implementation == "auto":
        implementation = auto(platform_of())
    return IMPLEMENTATIONS[implementation](lhs, rhs, group_sizes.astype(jnp.int32))
