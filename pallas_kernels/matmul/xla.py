"""`x · Wᵀ` in XLA, with fp32 accumulation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["matmul_xla"]


def matmul_xla(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] · w[out, in]ᵀ → [..., out] fp32, in the operands' dtype with fp32 accumulation.

    XLA:CPU sends a one-row bf16 product to a scalar loop at ~1 GB/s of weights; with two rows it takes the GEMM
    path at 7-13 GB/s, so there one row is padded to two.
    """
    if math.prod(x.shape[:-1]) == 1 and x.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        x2 = jnp.concatenate([x.reshape(1, -1), jnp.zeros((1, x.shape[-1]), x.dtype)])
        y = jnp.einsum("ri,oi->ro", x2, w, preferred_element_type=jnp.float32)[:1]
        return y.reshape(*x.shape[:-1], w.shape[0])
    return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32)
