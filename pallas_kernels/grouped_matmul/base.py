"""The grouped matmul's contract, shared by every implementation.

`grouped_matmul(lhs [M, K], rhs [G, N, K], group_sizes [G])` → [M, N] fp32: rows are sorted by group, group g
owns rows [ends[g] - sizes[g], ends[g]) with ends = cumsum(sizes), and row m of group g is multiplied by
rhs[g]ᵀ (rhs in the checkpoint's [out, in] orientation, so no weight is ever transposed). Rows past
sum(group_sizes) belong to no group and come out zero.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["check_shapes", "group_of_rows", "GroupMetadata", "group_metadata"]


def check_shapes(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[2] or group_sizes.shape != rhs.shape[:1]:
        raise ValueError(f"grouped_matmul: lhs [M, K], rhs [G, N, K], group_sizes [G]; got lhs {lhs.shape}, "
                         f"rhs {rhs.shape}, group_sizes {group_sizes.shape}")


def group_of_rows(group_sizes: jax.Array, m: int) -> jax.Array:
    """[M] int32: the group of each row, or G for rows past sum(group_sizes)."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(m), side="right").astype(jnp.int32)


class GroupMetadata(NamedTuple):
    group_ids: jax.Array   # [V] the group of each visit
    m_tile_ids: jax.Array  # [V] the row tile of each visit
    starts: jax.Array      # [G] first row of each group
    ends: jax.Array        # [G] one past its last row
    num_visits: jax.Array  # [1] visits that do work (the rest repeat the last one's blocks)


def group_metadata(group_sizes: jax.Array, m: int, tm: int, *, visit_empty_groups: bool) -> GroupMetadata:
    """The kernels' work list over rows in tiles of tm: one *visit* per (group, row tile it touches), in row order
    (so the visits of one row tile are consecutive), padded to the static bound tiles_m + G by repeating the last
    real one. Empty groups get one visit (at the tile their start falls in) when `visit_empty_groups`."""
    sizes = group_sizes.astype(jnp.int32)
    g = sizes.shape[0]
    ends = jnp.cumsum(sizes, dtype=jnp.int32)
    starts = ends - sizes
    tiles_m = -(-m // tm)
    first = jnp.minimum(starts // tm, tiles_m - 1)
    last = (jnp.maximum(ends, 1) - 1) // tm
    visits = jnp.where(sizes > 0, last - first + 1, 1 if visit_empty_groups else 0)
    offsets = jnp.cumsum(visits, dtype=jnp.int32)
    total = offsets[-1]
    i = jnp.minimum(jnp.arange(tiles_m + g, dtype=jnp.int32), jnp.maximum(total - 1, 0))
    group = jnp.minimum(jnp.searchsorted(offsets, i, side="right"), g - 1).astype(jnp.int32)
    tile = first[group] + i - (offsets[group] - visits[group])
    return GroupMetadata(group, tile, starts, ends, total[None])
