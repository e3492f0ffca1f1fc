"""Grouped matmul as the MoE calls it: one function that picks an implementation.

`grouped_matmul(lhs [M, K], rhs [G, N, K], group_sizes [G])` → [M, N] fp32: rows of group g (the g-th run of
`group_sizes[g]` rows) times rhs[g]ᵀ; rows past sum(group_sizes) are zero. rhs is in the checkpoint's
[out, in] orientation, so no weight is ever transposed.

- "ragged_dot": `jax.lax.ragged_dot_general` (XLA; the fallback everywhere). With fewer rows than groups (a
  decode step: batch x top-k rows, hundreds of experts) it gathers each row's weights instead: the work and the
  bytes read follow the rows, where XLA:CPU's ragged_dot reads every group (BENCHMARKS.md);
- "pallas_tpu": the megablox-style Mosaic kernels with their custom VJP (`pallas_kernels/grouped_matmul/tpu.py`);
- "pallas_tpu_interpret": the same kernels through Pallas' TPU interpreter, on any backend (slow; for tests).
"auto" (the default) takes "pallas_tpu" on TPU and "ragged_dot" elsewhere. `QWENJAX_GROUPED_MATMUL=<name>` or
the `implementation` argument forces one; the choice is made when a function is traced.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.reference import group_of_rows
from pallas_kernels.grouped_matmul.tpu import grouped_matmul_tpu
from qwenjax.ops._choice import resolve_choice

ENV = "QWENJAX_GROUPED_MATMUL"

_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def grouped_matmul_xla(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    precision = jax.lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
    rhs = rhs.astype(lhs.dtype)
    m, groups = lhs.shape[0], rhs.shape[0]
    if m < groups:
        group = jnp.minimum(group_of_rows(group_sizes, m), groups - 1)
        y = jnp.einsum("mk,mnk->mn", lhs, rhs[group], precision=precision, preferred_element_type=jnp.float32)
    else:
        y = jax.lax.ragged_dot_general(lhs, rhs, group_sizes, _DIMS, precision=precision,
                                       preferred_element_type=jnp.float32)
    # rows of no group: zero by contract (ragged_dot's own value there is not promised on every backend)
    return jnp.where((jnp.arange(m) < jnp.sum(group_sizes))[:, None], y, 0.0)


IMPLEMENTATIONS = {
    "ragged_dot": grouped_matmul_xla,
    "pallas_tpu": grouped_matmul_tpu,
    "pallas_tpu_interpret": functools.partial(grouped_matmul_tpu, interpret=True),
}


def resolve(name: str | None = None) -> str:
    """The implementation `name` (default: $QWENJAX_GROUPED_MATMUL, else "auto") stands for on this backend."""
    return resolve_choice(name, env=ENV, choices=IMPLEMENTATIONS, what="grouped matmul implementation",
                          auto=lambda: "pallas_tpu" if jax.default_backend() == "tpu" else "ragged_dot")


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   implementation: str | None = None) -> jax.Array:
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[2] or group_sizes.shape != rhs.shape[:1]:
        raise ValueError(f"grouped_matmul: lhs [M, K], rhs [G, N, K], group_sizes [G]; got lhs {lhs.shape}, "
                         f"rhs {rhs.shape}, group_sizes {group_sizes.shape}")
    return IMPLEMENTATIONS[resolve(implementation)](lhs, rhs, group_sizes.astype(jnp.int32))
