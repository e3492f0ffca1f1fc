"""What the Pallas TPU (Mosaic) kernels share: the fp32-accumulating dot with explicit dimension numbers, and
the switch to Pallas' TPU interpreter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

__all__ = ["F32", "NN", "TN", "NT", "dot", "interpret_params"]

F32 = jnp.float32
NN, TN, NT = ((1,), (0,)), ((0,), (0,)), ((1,), (1,))  # contracting dimensions of a b, aᵀ b, a bᵀ


def dot(a: jax.Array, b: jax.Array, dims=NN) -> jax.Array:
    """a · b over `dims` with an fp32 result. Mosaic's default fp32 matmul rounds its operands to bf16: fp32
    operands ask for full precision."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == F32 else None
    return jax.lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=F32)


def interpret_params(interpret: bool):
    """`interpret=` for `pl.pallas_call`: the TPU interpreter (any backend; for tests), or compiled Mosaic."""
    return pltpu.InterpretParams() if interpret else False
