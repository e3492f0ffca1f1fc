"""Mosaic GPU (Hopper, sm_90a) grouped matmul for the MoE experts, with a custom VJP.

`grouped_matmul_gpu(lhs [M, K], rhs [G, N, K], group_sizes [G])` → [M, N] fp32 (contract: `base.py`).
- forward and the input gradient (`_gmm`, ours): one persistent block per SM walks the output tiles; a tile takes
  one product per group among its rows from the visit list `base.group_metadata` makes in XLA (the TPU kernels'
  list: no per-group scan in the kernel, empty groups cost nothing), and stores once, in fp32. JAX's
  `ragged_dot_mgpu` scans every group per tile, in registers (255 registers and spills at 256 experts, compiled
  for an H100), and writes the operands' dtype.
- the weight gradient, out[g] = Σ_{m in g} dy[m]ᵀ x[m]: JAX's `transposed_ragged_dot_mgpu`, called from the
  installed package, in the operands' dtype (as the TPU kernel writes it).
Beside the kernels:
- fp32 operands go through XLA's ragged_dot at HIGHEST precision: tensor cores would round them to tf32;
- fewer rows than groups (a decode step) take the XLA path's gather of each row's weights, which reads only
  the experts the rows use;
- shapes are zero-padded to whole blocks where they are not (tiny test configs; real ones are multiples of 128):
  exact.
`interpret=True` runs the kernels in Mosaic GPU's interpreter with race detection (CPU; jax >= 0.11).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from unittest import mock

import jax
import jax.numpy as jnp

from pallas_kernels.gpu_common import H100, GpuFacts, interpreted, pad_to_multiple
from pallas_kernels.grouped_matmul.base import group_metadata
from pallas_kernels.grouped_matmul.xla import grouped_matmul_xla

__all__ = ["grouped_matmul_gpu", "Blocks"]


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The kernels' tiles: block_m rows (a multiple of 64: one warpgroup's wgmma), block_n output columns, block_k
    contraction (64 bf16 = one 128-byte swizzle row), pipelined `max_concurrent_steps` deep. The default takes
    176 registers (no spills) and 192 KiB of shared memory on an H100 (BENCHMARKS.md)."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4
    grid_block_n: int = 1

    def smem_bytes(self, dtype) -> int:
        """Shared memory of `_gmm`: the pipeline's lhs and rhs blocks, and the fp32 output tile."""
        stage = (self.block_m + self.block_n) * self.block_k * jnp.dtype(dtype).itemsize
        return self.max_concurrent_steps * stage + self.block_m * self.block_n * 4


def _gmm(lhs, rhs, group_sizes, *, transpose_rhs, blocks, gpu: GpuFacts):
    """[M, n] fp32: lhs [M, k] rows by group times rhs[g] ([G, n, k] if transpose_rhs, else [G, k, n]).

    One persistent block per SM walks the output tiles (block_m rows x block_n columns). A tile takes one product
    per group among its rows, read from the visit list of `group_metadata` (computed in XLA: no per-group work in
    the kernel, empty groups cost nothing): the whole row tile times that group's weights, a TMA pipeline over K
    into a `wgmma` accumulator, of which the group's own rows are kept. The tile is stored once, in fp32; rows of
    no group stay zero.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
    if blocks.smem_bytes(lhs.dtype) > gpu.smem_bytes:
        raise ValueError(f"grouped_matmul_gpu: {blocks} take {blocks.smem_bytes(lhs.dtype)} bytes of shared memory, "
                         f"more than the {gpu.smem_bytes} a block has ({gpu})")
    m = lhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    lhs = pad_to_multiple(pad_to_multiple(lhs, 1, bk), 0, bm)
    rhs = pad_to_multiple(pad_to_multiple(rhs, 2 if transpose_rhs else 1, bk), 1 if transpose_rhs else 2, bn)
    mp, kp = lhs.shape
    np_ = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiles_m, tiles_n = mp // bm, np_ // bn
    meta = group_metadata(group_sizes, mp, bm, visit_empty_groups=False)
    real = jnp.arange(meta.group_ids.shape[0]) < meta.num_visits[0]
    # the visits of row tile t are [first_visit[t], first_visit[t + 1])
    first_visit = jnp.searchsorted(jnp.where(real, meta.m_tile_ids, tiles_m), jnp.arange(tiles_m + 1),
                                   side="left").astype(jnp.int32)

    def grouped_matmul_kernel(first_visit_gmem, group_ids_gmem, starts_gmem, ends_gmem, lhs_gmem, rhs_gmem, out_gmem):
        @plgpu.nd_loop((tiles_m * tiles_n,), collective_axes="sm")
        def tile_loop(loop_info):
            mi, ni = plgpu.planar_snake(loop_info.index[0], (tiles_m, tiles_n), 1, blocks.grid_block_n)
            rows = mi * bm + plgpu.broadcasted_iota(jnp.int32, (bm, bn), 0, layout=plgpu.Layout.WGMMA)

            def tile_scope(out_smem):
                # the tile is assembled in shared memory, visit by visit: registers hold one accumulator only
                out_smem[...] = plgpu.layout_cast(jnp.zeros((bm, bn), jnp.float32), plgpu.Layout.WGMMA)

                @pl.loop(first_visit_gmem[mi], first_visit_gmem[mi + 1])
                def visit(v):
                    g = group_ids_gmem[v]

                    def product(acc_ref):
                        plgpu.emit_pipeline(
                            lambda _, lhs_smem, rhs_smem: plgpu.wgmma(
                                acc_ref, lhs_smem, rhs_smem.transpose((1, 0)) if transpose_rhs else rhs_smem),
                            grid=(kp // bk,),
                            in_specs=[plgpu.BlockSpec((bm, bk), lambda kk: (mi, kk), delay_release=1),
                                      plgpu.BlockSpec((bn, bk) if transpose_rhs else (bk, bn),
                                                      (lambda kk: (ni, kk)) if transpose_rhs else (lambda kk: (kk, ni)),
                                                      delay_release=1)],
                            max_concurrent_steps=blocks.max_concurrent_steps,
                        )(lhs_gmem, rhs_gmem.at[g])
                        return acc_ref[...]

                    acc = pl.run_scoped(product, plgpu.ACC((bm, bn)))
                    out_smem[...] = jnp.where((rows >= starts_gmem[g]) & (rows < ends_gmem[g]), acc, out_smem[...])

                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[pl.ds(mi * bm, bm), pl.ds(ni * bn, bn)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            pl.run_scoped(tile_scope, plgpu.SMEM((bm, bn), jnp.float32))

    kernel = plgpu.kernel(
        grouped_matmul_kernel, out_type=jax.ShapeDtypeStruct((mp, np_), jnp.float32), grid=(gpu.num_sms,),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return kernel(first_visit, meta.group_ids, meta.starts, meta.ends, lhs, rhs)[:m, :n]


def _transposed_ragged_dot(lhs, rhs, group_sizes, *, blocks, gpu: GpuFacts):
    """[G, N, K] in lhs's dtype, out[g] = Σ_{m in g} lhs[m]ᵀ rhs[m] for lhs [M, N], rhs [M, K]."""
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
    n, k = lhs.shape[1], rhs.shape[1]
    lhs, rhs = pad_to_multiple(lhs, 1, blocks.block_m), pad_to_multiple(rhs, 1, blocks.block_n)
    # The kernel reads the rows (its contraction) by TMA in tiles of 8: M off a multiple of 8 does not lower for
    # a GPU (the interpreter runs it). Zero rows past every group add nothing.
    lhs, rhs = pad_to_multiple(lhs, 0, 8), pad_to_multiple(rhs, 0, 8)
    # The kernel sizes its persistent grid by `jax.devices()[0].core_count`: give it the SM count of the GPU we
    # build for (the CPU devices of the tests and of a deviceless compile have none).
    devices = [types.SimpleNamespace(core_count=gpu.num_sms)]
    with mock.patch.object(transposed_ragged_dot_mgpu.jax, "devices", lambda *_: devices):
        out = transposed_ragged_dot_mgpu.transposed_ragged_dot(
            lhs, rhs, group_sizes=group_sizes, block_m=blocks.block_m, block_n=blocks.block_n,
            block_k=blocks.block_k, max_concurrent_steps=blocks.max_concurrent_steps,
            grid_block_n=blocks.grid_block_n)
    return out[:, :n, :k]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _grouped_matmul(lhs, rhs, group_sizes, blocks, gpu, interpret):
    with interpreted(interpret):
        return _gmm(lhs, rhs, group_sizes, transpose_rhs=True, blocks=blocks, gpu=gpu)


def _grouped_matmul_fwd(lhs, rhs, group_sizes, blocks, gpu, interpret):
    return _grouped_matmul(lhs, rhs, group_sizes, blocks, gpu, interpret), (lhs, rhs, group_sizes)


def _grouped_matmul_bwd(blocks, gpu, interpret, residuals, dout):
    lhs, rhs, group_sizes = residuals
    dout = dout.astype(lhs.dtype)  # operands in the model's dtype, as the forward's
    with interpreted(interpret):
        dlhs = _gmm(dout, rhs, group_sizes, transpose_rhs=False, blocks=blocks, gpu=gpu).astype(lhs.dtype)
        drhs = _transposed_ragged_dot(dout, lhs, group_sizes, blocks=blocks, gpu=gpu)
    return dlhs, drhs.astype(rhs.dtype), None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul_gpu(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, blocks: Blocks = Blocks(),
                       gpu: GpuFacts = H100, interpret: bool = False) -> jax.Array:
    """[M, N] fp32: lhs [M, K] rows sorted by group times rhs [G, N, K] of their group; see the module doc."""
    rhs = rhs.astype(lhs.dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    if lhs.dtype == jnp.float32 or lhs.shape[0] < rhs.shape[0]:
        return grouped_matmul_xla(lhs, rhs, group_sizes)
    return _grouped_matmul(lhs, rhs, group_sizes, blocks, gpu, bool(interpret))
