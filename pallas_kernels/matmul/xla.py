"""`x · Wᵀ` in XLA, with fp32 accumulation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["matmul_xla"]


def matmul_xla(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] · w[out, in]ᵀ → [..., out] fp32, in the operands' dtype with fp32 accumulation.

    XLA:CPU sends a one-row bf16 product to a scalar loop at ~1 GB/s of weights; with two rows it takes the GEMM
    path at 7-13 GB/s, so there one row is padded to two. Which platform is chosen when lowering, for the platform
    compiled for (`lax.platform_dependent`), not by the default backend: a GPU program compiled on a CPU host
    must not get the CPU's padding.
    """
    if math.prod(x.shape[:-1]) == 1 and x.dtype == jnp.bfloat16:
        return jax.lax.platform_dependent(x, w, cpu=_one_row_as_two, default=_product)
    return _product(x, w)


def _product(x, w):
    return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32)


def _one_row_as_two(x, w):
    x2 = jnp.concatenate([x.reshape(1, -1), jnp.zeros((1, x.shape[-1]), x.dtype)])
    return _product(x2, w)[:1].reshape(*x.shape[:-1], w.shape[0])
