"""The grouped matmul's oracles: one masked dense product per group, summed (no ragged primitive).

O(G·M·N·K) work: for tests, never for speed. The contract is in `base.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.base import group_of_rows

__all__ = ["grouped_matmul_reference", "grouped_matmul_transposed_reference"]


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """out [M, N] fp32, out[m] = rhs[g(m)] · lhs[m] for lhs [M, K], rhs [G, N, K]; zero rows past the groups."""
    group = group_of_rows(group_sizes, lhs.shape[0])

    def one(g, w):
        y = jnp.einsum("mk,nk->mn", lhs, w, precision="highest", preferred_element_type=jnp.float32)
        return jnp.where((group == g)[:, None], y, 0.0)

    return jnp.sum(jax.vmap(one)(jnp.arange(rhs.shape[0]), rhs), axis=0)


def grouped_matmul_transposed_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """out [G, N, K] fp32, out[g] = Σ_{m in g} lhs[m]ᵀ rhs[m] for lhs [M, N], rhs [M, K] (the weight gradient);
    zero for empty groups."""
    group = group_of_rows(group_sizes, lhs.shape[0])
    onehot = (group[:, None] == jnp.arange(group_sizes.shape[0])).astype(jnp.float32)  # [M, G]
    return jnp.einsum("mg,mn,mk->gnk", onehot, lhs.astype(jnp.float32), rhs.astype(jnp.float32),
                      precision="highest")
