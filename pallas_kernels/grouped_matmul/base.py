"""The grouped matmul's contract, shared by every implementation.

`grouped_matmul(lhs [M, K], rhs [G, N, K], group_sizes [G])` → [M, N] fp32: rows are sorted by group, group g
owns rows [ends[g] - sizes[g], ends[g]) with ends = cumsum(sizes), and row m of group g is multiplied by
rhs[g]ᵀ (rhs in the checkpoint's [out, in] orientation, so no weight is ever transposed). Rows past
sum(group_sizes) belong to no group and come out zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["check_shapes", "group_of_rows"]


def check_shapes(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[2] or group_sizes.shape != rhs.shape[:1]:
        raise ValueError(f"grouped_matmul: lhs [M, K], rhs [G, N, K], group_sizes [G]; got lhs {lhs.shape}, "
                         f"rhs {rhs.shape}, group_sizes {group_sizes.shape}")


def group_of_rows(group_sizes: jax.Array, m: int) -> jax.Array:
    """[M] int32: the group of each row, or G for rows past sum(group_sizes)."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(m), side="right").astype(jnp.int32)
