"""The oracle of `x · Wᵀ` for a weight in the checkpoint's [out, in] orientation: fp32 operands at HIGHEST."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["matmul_reference"]


def matmul_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] · w[out, in]ᵀ → [..., out] fp32."""
    f32 = jnp.float32
    return jnp.einsum("...i,oi->...o", x.astype(f32), w.astype(f32), precision=jax.lax.Precision.HIGHEST)
