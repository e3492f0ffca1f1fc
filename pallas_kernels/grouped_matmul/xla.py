"""The grouped matmul in XLA (the fallback everywhere): `jax.lax.ragged_dot_general`, or, with fewer rows than
groups (a decode step: batch x top-k rows, hundreds of experts), a gather of each row's weights: the work and
the bytes read then follow the rows, where XLA:CPU's ragged_dot reads every group (BENCHMARKS.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.base import group_of_rows

__all__ = ["grouped_matmul_xla", "RAGGED_DOT_DIMS"]

# lhs [M, K] rows grouped, rhs [G, N, K]: contract K with rhs's last axis
RAGGED_DOT_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def grouped_matmul_xla(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """[M, N] fp32 (contract in `base.py`); fp32 operands at HIGHEST precision, others accumulate in fp32."""
    precision = jax.lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
    rhs = rhs.astype(lhs.dtype)
    m, groups = lhs.shape[0], rhs.shape[0]
    if m < groups:
        group = jnp.minimum(group_of_rows(group_sizes, m), groups - 1)
        y = jnp.einsum("mk,mnk->mn", lhs, rhs[group], precision=precision, preferred_element_type=jnp.float32)
    else:
        y = jax.lax.ragged_dot_general(lhs, rhs, group_sizes, RAGGED_DOT_DIMS, precision=precision,
                                       preferred_element_type=jnp.float32)
    # rows of no group: zero by contract (ragged_dot's own value there is not promised on every backend)
    return jnp.where((jnp.arange(m) < jnp.sum(group_sizes))[:, None], y, 0.0)
