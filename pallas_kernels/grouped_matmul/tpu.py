"""Pallas TPU (Mosaic) grouped matmul for MoE experts, megablox-style, with a custom VJP.

`grouped_matmul_tpu(lhs [M, K], rhs [G, N, K], group_sizes [G])` → [M, N] fp32: rows sorted by group, row m of
group g times rhs[g]ᵀ (rhs in the checkpoint's [out, in] orientation); rows past sum(group_sizes) are zero.

Tiling: rows in tiles of tm. A row tile can hold rows of several groups, so the kernel walks *visits*: one per
(group, row tile it touches), in row order. The visit list is computed in XLA from group_sizes and handed to
the kernel as scalar-prefetched metadata (SMEM), which the index maps read to fetch the right lhs tile and
expert weight tile. There are at most tiles_m + G - 1 visits; the grid has tiles_m + G (a static bound), and
visits past the real count do no work. A visit multiplies the whole row tile and stores only its group's rows.

- gmm (forward, and the input gradient with rhs untransposed): grid (N tiles, visits, K tiles); fp32 accumulator
  in VMEM over the K axis; consecutive visits of one row tile keep the output block resident.
- tgmm (weight gradient, out[g] = Σ_{m in g} dy[m]ᵀ x[m]): grid (N tiles, K tiles, visits); consecutive visits
  of one group accumulate in VMEM and the group's block is written at its last visit. Empty groups get one
  visit that writes zeros.
Operands are the inputs' dtype (bf16 in practice) with fp32 accumulation; fp32 operands use HIGHEST precision.
`interpret=True` runs the kernels in Pallas' TPU interpreter (any backend; the CPU tests use it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouped_matmul.base import group_metadata
from pallas_kernels.tpu_common import F32, NN, NT, TN, dot, interpret_params

__all__ = ["grouped_matmul_tpu", "Tiling"]


@dataclasses.dataclass(frozen=True)
class Tiling:
    tm: int = 512  # rows
    tk: int = 512  # contraction
    tn: int = 512  # output columns


def _rows_of_group(meta_refs, i, tm):
    """[tm, 1] bool: which rows of visit i's row tile belong to its group."""
    group_ids, m_tile_ids, starts, ends, _ = meta_refs
    g = group_ids[i]
    rows = m_tile_ids[i] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    return (rows >= starts[g]) & (rows < ends[g])


def _gmm_kernel(*refs, transpose_rhs, tm):
    meta_refs, (lhs_ref, rhs_ref, out_ref, acc_ref) = refs[:5], refs[5:]
    i, k = pl.program_id(1), pl.program_id(2)
    real = i < meta_refs[4][0]

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(real)
    def _():
        acc_ref[...] += dot(lhs_ref[...], rhs_ref[...], NT if transpose_rhs else NN)

    @pl.when(real & (k == pl.num_programs(2) - 1))
    def _():
        out_ref[...] = jnp.where(_rows_of_group(meta_refs, i, tm), acc_ref[...].astype(out_ref.dtype), out_ref[...])


def _tgmm_kernel(*refs, tm):
    meta_refs, (lhs_ref, rhs_ref, out_ref, acc_ref) = refs[:5], refs[5:]
    group_ids, num_visits = meta_refs[0], meta_refs[4][0]
    i = pl.program_id(2)
    g = group_ids[i]
    first = (i == 0) | (g != group_ids[jnp.maximum(i - 1, 0)])
    last = (i == num_visits - 1) | (g != group_ids[jnp.minimum(i + 1, pl.num_programs(2) - 1)])
    real = i < num_visits

    @pl.when(first)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(real)
    def _():
        lhs = jnp.where(_rows_of_group(meta_refs, i, tm), lhs_ref[...], 0)
        acc_ref[...] += dot(lhs, rhs_ref[...], TN)

    @pl.when(real & last)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _tile(dim: int, preferred: int) -> tuple[int, int]:
    """(tile, padded dim): the whole dimension when it fits in one tile (any size is a legal block then),
    else the preferred tile with the dimension padded to a multiple of it."""
    if dim <= preferred:
        return dim, dim
    return preferred, pl.cdiv(dim, preferred) * preferred


def _pad(x, shape):
    pads = [(0, s - d) for s, d in zip(shape, x.shape)]
    return x if not any(p for _, p in pads) else jnp.pad(x, pads)


def _gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool, tiling: Tiling, interpret: bool, out_dtype=F32):
    """[M, N] = per-row rhs[g] products; rhs [G, N, K] (transpose_rhs) or [G, K, N]. Accumulated in fp32."""
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    (tm, mp), (tk, kp), (tn, np_) = _tile(m, tiling.tm), _tile(k, tiling.tk), _tile(n, tiling.tn)
    lhs = _pad(lhs, (mp, kp))
    rhs = _pad(rhs, (rhs.shape[0], np_, kp) if transpose_rhs else (rhs.shape[0], kp, np_))
    meta = group_metadata(group_sizes, mp, tm, visit_empty_groups=False)
    if transpose_rhs:
        rhs_spec = pl.BlockSpec((None, tn, tk), lambda j, i, kk, gid, *_: (gid[i], j, kk))
    else:
        rhs_spec = pl.BlockSpec((None, tk, tn), lambda j, i, kk, gid, *_: (gid[i], kk, j))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(np_ // tn, meta.group_ids.shape[0], kp // tk),
        in_specs=[pl.BlockSpec((tm, tk), lambda j, i, kk, gid, mt, *_: (mt[i], kk)), rhs_spec],
        out_specs=pl.BlockSpec((tm, tn), lambda j, i, kk, gid, mt, *_: (mt[i], j)),
        scratch_shapes=[pltpu.VMEM((tm, tn), F32)])
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, transpose_rhs=transpose_rhs, tm=tm),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret_params(interpret),
    )(*meta, lhs, rhs)[:m, :n]
    # rows of no group (past the groups, or in tiles no visit touched) hold whatever the buffers held
    return jnp.where(jnp.arange(m)[:, None] < jnp.sum(group_sizes), out, jnp.zeros((), out_dtype))


def _tgmm(lhs, rhs, group_sizes, *, tiling: Tiling, interpret: bool, out_dtype=F32):
    """[G, N, K], out[g] = Σ_{m in g} lhs[m]ᵀ rhs[m] for lhs [M, N], rhs [M, K]. Accumulated in fp32."""
    m, n = lhs.shape
    k = rhs.shape[1]
    (tm, mp), (tn, np_), (tk, kp) = _tile(m, tiling.tm), _tile(n, tiling.tn), _tile(k, tiling.tk)
    lhs, rhs = _pad(lhs, (mp, np_)), _pad(rhs, (mp, kp))
    meta = group_metadata(group_sizes, mp, tm, visit_empty_groups=True)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(np_ // tn, kp // tk, meta.group_ids.shape[0]),
        in_specs=[pl.BlockSpec((tm, tn), lambda j, kk, i, gid, mt, *_: (mt[i], j)),
                  pl.BlockSpec((tm, tk), lambda j, kk, i, gid, mt, *_: (mt[i], kk))],
        out_specs=pl.BlockSpec((None, tn, tk), lambda j, kk, i, gid, *_: (gid[i], j, kk)),
        scratch_shapes=[pltpu.VMEM((tn, tk), F32)])
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm),
        out_shape=jax.ShapeDtypeStruct((group_sizes.shape[0], np_, kp), out_dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret_params(interpret),
    )(*meta, lhs, rhs)
    return out[:, :n, :k]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_matmul(lhs, rhs, group_sizes, tiling, interpret):
    return _gmm(lhs, rhs, group_sizes, transpose_rhs=True, tiling=tiling, interpret=interpret)


def _grouped_matmul_fwd(lhs, rhs, group_sizes, tiling, interpret):
    return _grouped_matmul(lhs, rhs, group_sizes, tiling, interpret), (lhs, rhs, group_sizes)


def _grouped_matmul_bwd(tiling, interpret, res, dout):
    lhs, rhs, group_sizes = res
    dout = dout.astype(lhs.dtype)  # operands in the model's dtype, as the forward's
    # Written in the operands' dtype by the kernels (fp32 accumulators in VMEM): no fp32 copy of the weight
    # gradient in HBM.
    dlhs = _gmm(dout, rhs, group_sizes, transpose_rhs=False, tiling=tiling, interpret=interpret,
                out_dtype=lhs.dtype)
    drhs = _tgmm(dout, lhs, group_sizes, tiling=tiling, interpret=interpret, out_dtype=rhs.dtype)
    return dlhs, drhs, None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul_tpu(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tiling: Tiling = Tiling(),
                       interpret: bool = False) -> jax.Array:
    """[M, N] fp32: lhs [M, K] rows sorted by group times rhs [G, N, K] of their group; see the module doc."""
    return _grouped_matmul(lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32), tiling, interpret)
