"""Mosaic GPU (Hopper, sm_90a) kernels for the gated delta rule: the chunked form's state passes, forward and
backward, and the fused decode step.

Chunked form (`gated_delta_rule_chunked_gpu`), C = 64, bf16:
1. Chunk-parallel work in XLA (`xla.state_pass_inputs`, as for the TPU kernels): gates, the triangular inverse,
   W, U, the gated Q Kᵀ, differentiated by JAX's autodiff.
2. The forward state pass: one block of one warpgroup per (row, value head, 64 columns of the state), walking
   the chunks in order with its fp32 slice of the state [K, 64] in shared memory; per chunk (S entering it)
       V_new = U - W S,   O = decay_in * (Q S) + attn V_new,   S' = decay_in[-1] * S + Kᵀ (decay_out * V_new)
   with the products on `wgmma` (bf16 operands, the state rounded to bf16 as an operand only, fp32 accumulation),
   the chunk's operands brought in by TMA. Columns are independent (every product reduces over K or C, never V),
   so B·HV·V/64 blocks fill the SMs without any exchange between them.
3. The backward (custom VJP) as flash-linear-attention splits it: the states entering each chunk are recomputed
   by the forward kernel (the TPU kernels' default: nothing [B, HV, N, K, V] is kept from the forward); a
   gradient pass walks the chunks in reverse with dS in shared memory, the only sequential part,
       dV_new = attnᵀ dO + decay_out * (K dS),   dS_entering = decay * dS + Qᵀ (decay_in * dO) - Wᵀ dV_new,
   and writes dS per chunk; every other gradient (dq, dk, dw, dattn, the gates') is then a batched matmul over
   all chunks at once in XLA.
fp32 inputs take the XLA chunked form: `wgmma` would round fp32 operands to tf32.

Decode (`gated_delta_rule_step_gpu`): one token for every (row, value head), the q/k l2norm, the gate and the
state update fused. One block of one warpgroup per (row, value head, 64 columns of the state): the fp32 state
slice [K, 64] comes in by TMA and leaves by TMA once, the token's q, k (read per q/k head: GVA without repeating)
and v slice beside it. With a = exp(g) and delta = beta (v - a Sᵀk):

    S' = a S + k deltaᵀ,    o = a Sᵀq + (k·q) delta,

Sᵀk and Sᵀq reduce over K (the rows), so the columns of the state split into independent blocks. Exact fp32 on
the CUDA cores (no tensor-core rounding), as the XLA step and the TPU kernel. The state is updated in place, as
on TPU.

GVA everywhere: a value head's block reads its q/k head (h // (HV // HK)); nothing is repeated in memory.
K and V are zero-padded to multiples of 64 where they are not (tiny test configs; real heads are 128), which
leaves every result unchanged. Registers, spills and shared memory per kernel at real shapes, compiled for an
H100 with no GPU: `scripts/gpu_kernel_resources.py` (BENCHMARKS.md).

`interpret=True` runs the kernels in Mosaic GPU's interpreter with race detection (CPU; jax >= 0.11).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule.base import L2NORM_EPS, check_step
from pallas_kernels.gated_delta_rule.xla import (check_initial_state, from_chunks, gated_delta_rule_chunked,
                                                 state_pass_inputs)
from pallas_kernels.gpu_common import interpreted, pad_to_multiple

__all__ = ["gated_delta_rule_chunked_gpu", "gated_delta_rule_step_gpu"]

F32 = jnp.float32
_CHUNK = 64  # tokens per chunk: wgmma's 64-row tiles
_COLUMNS = 64  # state columns per block: a [K, 64] fp32 slice, 64 registers a thread at K = 128


def _step_call(q, k, v, g, beta, state, *, scale, use_qk_l2norm):
    """q, k [B, HK, K]; v [B, HV, V]; g, beta fp32 [B, HV]; state fp32 [B, HV, K, V] (K, V multiples of 64)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    b, hk, dk = q.shape
    hv, dv = v.shape[1], v.shape[2]
    ratio = hv // hk
    # WGMMA's register layout for the [K, 64] slice; a vector over K (one value per row) and one over the columns
    tile, per_row, per_column = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

    def decode_step(q_gmem, k_gmem, v_gmem, g_gmem, beta_gmem, state_gmem, o_gmem):
        bi, h, ci = jax.lax.axis_index("b"), jax.lax.axis_index("h"), jax.lax.axis_index("c")
        columns = pl.ds(ci * _COLUMNS, _COLUMNS)

        def scope(s_smem, q_smem, k_smem, v_smem, o_smem, barriers):
            plgpu.copy_gmem_to_smem(state_gmem.at[bi, h, :, columns], s_smem, barriers.at[0])
            plgpu.copy_gmem_to_smem(q_gmem.at[bi, jax.lax.div(h, ratio)], q_smem, barriers.at[1])
            plgpu.copy_gmem_to_smem(k_gmem.at[bi, jax.lax.div(h, ratio)], k_smem, barriers.at[2])
            plgpu.copy_gmem_to_smem(v_gmem.at[bi, h, columns], v_smem, barriers.at[3])
            decay, beta_ = jnp.exp(g_gmem[bi, h]), beta_gmem[bi, h]
            for i in range(1, 4):
                plgpu.barrier_wait(barriers.at[i])
            qv = plgpu.layout_cast(q_smem[...], per_row).astype(F32)
            kv = plgpu.layout_cast(k_smem[...], per_row).astype(F32)
            if use_qk_l2norm:
                qv = qv * jax.lax.rsqrt(jnp.sum(qv * qv) + L2NORM_EPS)
                kv = kv * jax.lax.rsqrt(jnp.sum(kv * kv) + L2NORM_EPS)
            qv = qv * scale
            plgpu.barrier_wait(barriers.at[0])
            s = plgpu.layout_cast(s_smem[...], tile)
            state_k = jnp.sum(kv[:, None] * s, axis=0)  # Sᵀk over this block's columns
            state_q = jnp.sum(qv[:, None] * s, axis=0)
            delta = (plgpu.layout_cast(v_smem[...], per_column).astype(F32) - decay * state_k) * beta_
            s_smem[...] = decay * s + kv[:, None] * delta[None, :]
            o_smem[...] = (decay * state_q + jnp.sum(kv * qv) * delta).astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(s_smem, state_gmem.at[bi, h, :, columns])
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[bi, h, columns])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scope, plgpu.SMEM((dk, _COLUMNS), F32), plgpu.SMEM((dk,), q.dtype), plgpu.SMEM((dk,), k.dtype),
                      plgpu.SMEM((_COLUMNS,), v.dtype), plgpu.SMEM((_COLUMNS,), v.dtype),
                      plgpu.Barrier(num_barriers=4))

    # The state goes in as a mutable ref and the kernel writes the new one over it: a decode step's state is read
    # once and written once (a new buffer would cost XLA a copy of the whole state into the cache, 18 per step
    # at the 0.8B shape; `plgpu.kernel` has no input/output aliasing, a written ref operand is what it offers).
    state_ref = jax.new_ref(state)
    o = plgpu.kernel(
        decode_step, out_type=jax.ShapeDtypeStruct((b, hv, dv), v.dtype),
        grid=(b, hv, dv // _COLUMNS), grid_names=("b", "h", "c"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(q, k, v, g, beta, state_ref)
    return o, jax.freeze(state_ref)


def _product(a, b, shape, *more):
    """a · b (+ the products of the further pairs in `more`) in fp32 by `wgmma` into one accumulator, the
    operands in shared memory (a transposed view reads the other way)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def scope(acc):
        for lhs, rhs in ((a, b),) + more:
            plgpu.wgmma(acc, lhs, rhs)
        return acc[...]

    return pl.run_scoped(scope, plgpu.ACC(shape))


def _state_pass_forward_call(q, k, w, u, attn, gates, s0, *, out_dtype, emit_output, emit_states):
    """The chunks of every (row, value head) in order, the fp32 state in shared memory (module doc, step 2).

    q, k [B, HK, N, C, K]; w [B, HV, N, C, K]; u [B, HV, N, C, V]; attn [B, HV, N, C, C] (bf16); gates fp32
    [B, HV, N, 2C] (decay_in | decay_out); s0 fp32 [B, HV, K, V]. Returns [o, final] if emit_output, then
    [states] (the state entering each chunk, fp32 [B, HV, N, K, V]) if emit_states.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    b, hv, n, c, dk = w.shape
    dv = u.shape[-1]
    ratio = hv // q.shape[1]
    dt = w.dtype
    tile, per_row = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)
    rows = (c, _COLUMNS)  # a chunk's rows of this block's state columns

    def state_pass_kernel(q_gmem, k_gmem, w_gmem, u_gmem, attn_gmem, gates_gmem, s0_gmem, *outs):
        outs = list(outs)
        o_gmem = outs.pop(0) if emit_output else None
        final_gmem = outs.pop(0) if emit_output else None
        states_gmem = outs.pop(0) if emit_states else None
        bi, h, ci = jax.lax.axis_index("b"), jax.lax.axis_index("h"), jax.lax.axis_index("c")
        hq = jax.lax.div(h, ratio)
        cols = pl.ds(ci * _COLUMNS, _COLUMNS)

        def scope(s_smem, s_op, q_smem, k_smem, w_smem, u_smem, attn_smem, gates_smem, vn_smem, kv_smem, o_smem,
                  barriers):
            plgpu.copy_gmem_to_smem(s0_gmem.at[bi, h, :, cols], s_smem, barriers.at[0])
            plgpu.barrier_wait(barriers.at[0])

            @pl.loop(0, n)
            def chunk(i):
                for j, (src, dst) in enumerate(((q_gmem.at[bi, hq, i], q_smem), (k_gmem.at[bi, hq, i], k_smem),
                                                (w_gmem.at[bi, h, i], w_smem), (u_gmem.at[bi, h, i, :, cols], u_smem),
                                                (attn_gmem.at[bi, h, i], attn_smem),
                                                (gates_gmem.at[bi, h, i], gates_smem))):
                    plgpu.copy_gmem_to_smem(src, dst, barriers.at[1 + j])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's stores have read their buffers
                if emit_states:
                    plgpu.copy_smem_to_gmem(s_smem, states_gmem.at[bi, h, i, :, cols])
                s_op[...] = plgpu.layout_cast(s_smem[...], tile).astype(dt)
                plgpu.commit_smem()
                for j in range(6):
                    plgpu.barrier_wait(barriers.at[1 + j])
                v_new = plgpu.layout_cast(u_smem[...], tile).astype(F32) - _product(w_smem, s_op, rows)
                vn_smem[...] = v_new.astype(dt)
                decay_out = plgpu.layout_cast(gates_smem[c:], per_row)
                kv_smem[...] = (decay_out[:, None] * v_new).astype(dt)
                plgpu.commit_smem()
                if emit_output:
                    decay_in = plgpu.layout_cast(gates_smem[:c], per_row)
                    o = decay_in[:, None] * _product(q_smem, s_op, rows) + _product(attn_smem, vn_smem, rows)
                    o_smem[...] = o.astype(o_smem.dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[bi, h, i, :, cols])
                state_decay = gates_gmem[bi, h, i, c - 1]
                # the state is read back from shared memory, not kept in registers: with the [K, V] accumulator
                # both would take 256 registers a thread
                s_new = (_product(k_smem.transpose((1, 0)), kv_smem, (dk, _COLUMNS))
                         + state_decay * plgpu.layout_cast(s_smem[...], tile))
                if emit_states:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                s_smem[...] = s_new
                plgpu.commit_smem()

            if emit_output:
                plgpu.copy_smem_to_gmem(s_smem, final_gmem.at[bi, h, :, cols])
            plgpu.wait_smem_to_gmem(0)

        cv = _COLUMNS
        pl.run_scoped(scope, plgpu.SMEM((dk, cv), F32), plgpu.SMEM((dk, cv), dt), plgpu.SMEM((c, dk), dt),
                      plgpu.SMEM((c, dk), dt), plgpu.SMEM((c, dk), dt), plgpu.SMEM((c, cv), dt),
                      plgpu.SMEM((c, c), dt), plgpu.SMEM((2 * c,), F32), plgpu.SMEM((c, cv), dt),
                      plgpu.SMEM((c, cv), dt), plgpu.SMEM((c, cv), out_dtype), plgpu.Barrier(num_barriers=7))

    out_type = []
    if emit_output:
        out_type += [jax.ShapeDtypeStruct(u.shape, out_dtype), jax.ShapeDtypeStruct(s0.shape, F32)]
    if emit_states:
        out_type.append(jax.ShapeDtypeStruct((b, hv, n, dk, dv), F32))
    # named for what it emits: the ptxas and resource reports tell the two variants apart by name
    state_pass_kernel.__name__ = "state_pass_forward" if emit_output else "state_pass_states"
    call = plgpu.kernel(state_pass_kernel, out_type=tuple(out_type), grid=(b, hv, dv // _COLUMNS),
                        grid_names=("b", "h", "c"),
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return call(q, k, w, u, attn, gates, s0)


def gated_delta_rule_step_gpu(q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None,
                              use_qk_l2norm=True, interpret=False):
    """One token (T == 1) as one fused kernel; same contract as `xla.gated_delta_rule_step`: o [B, 1, HV, V] in
    v's dtype and the fp32 new state [B, HV, K, V]. segment_ids cannot matter for one token."""
    del segment_ids
    b, hk, dk, hv, dv = check_step(q, k, v, g, beta, "gated_delta_rule_step_gpu")
    state = check_initial_state(initial_state, k, v)
    scale = float(dk ** -0.5 if scale is None else scale)
    q, k = (pad_to_multiple(x[:, 0], 2, 64) for x in (q, k))
    v = pad_to_multiple(v[:, 0], 2, _COLUMNS)
    padded = pad_to_multiple(pad_to_multiple(state, 2, 64), 3, _COLUMNS)
    with interpreted(interpret):
        o, new_state = _step_call(q, k, v, g[:, 0].astype(F32), beta[:, 0].astype(F32), padded, scale=scale,
                                  use_qk_l2norm=use_qk_l2norm)
    return o[:, None, :, :dv], new_state[:, :, :dk, :dv]


def _state_gradient_pass_call(q, k, w, dv_intra, dq_in, gates, dfinal, *, du_dtype):
    """The chunks in reverse, d(state) in shared memory: the one sequential part of the backward.

    Per chunk, dS the gradient of the state leaving it (the chunk's other gradients need no recurrence and are
    formed afterwards for all chunks at once, see `_state_pass_bwd`):

        dV_new = attnᵀ dO + decay_out * (K dS),    dS_entering = decay * dS + Qᵀ (decay_in * dO) - Wᵀ dV_new.

    q, k [B, HK, N, C, K], w [B, HV, N, C, K] (bf16); dv_intra = attnᵀ dO fp32 and dq_in = decay_in * dO (bf16)
    [B, HV, N, C, V]; gates and dfinal as the forward's gates and final state. Returns dstates fp32
    [B, HV, N, K, V] (dS leaving each chunk), du = dV_new [B, HV, N, C, V] in du_dtype, and ds0 fp32.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    b, hv, n, c, dk = w.shape
    dv = dv_intra.shape[-1]
    ratio = hv // q.shape[1]
    dt = w.dtype
    tile, per_row = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)
    rows = (c, _COLUMNS)

    def state_gradient_pass(q_gmem, k_gmem, w_gmem, dvi_gmem, dqin_gmem, gates_gmem, dfinal_gmem, dstates_gmem,
                            du_gmem, ds0_gmem):
        bi, h, ci = jax.lax.axis_index("b"), jax.lax.axis_index("h"), jax.lax.axis_index("c")
        hq = jax.lax.div(h, ratio)
        cols = pl.ds(ci * _COLUMNS, _COLUMNS)

        def scope(ds_smem, ds_op, q_smem, k_smem, w_smem, dvi_smem, dqin_smem, gates_smem, neg_dvn_smem, du_smem,
                  barriers):
            plgpu.copy_gmem_to_smem(dfinal_gmem.at[bi, h, :, cols], ds_smem, barriers.at[0])
            plgpu.barrier_wait(barriers.at[0])

            @pl.loop(0, n)
            def chunk(step):
                i = n - 1 - step
                loads = ((q_gmem.at[bi, hq, i], q_smem), (k_gmem.at[bi, hq, i], k_smem), (w_gmem.at[bi, h, i], w_smem),
                         (dvi_gmem.at[bi, h, i, :, cols], dvi_smem), (dqin_gmem.at[bi, h, i, :, cols], dqin_smem),
                         (gates_gmem.at[bi, h, i], gates_smem))
                for j, (src, dst) in enumerate(loads):
                    plgpu.copy_gmem_to_smem(src, dst, barriers.at[1 + j])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's stores have read du_smem
                plgpu.copy_smem_to_gmem(ds_smem, dstates_gmem.at[bi, h, i, :, cols])
                ds_op[...] = plgpu.layout_cast(ds_smem[...], tile).astype(dt)
                plgpu.commit_smem()
                for j in range(len(loads)):
                    plgpu.barrier_wait(barriers.at[1 + j])
                decay_out = plgpu.layout_cast(gates_smem[c:], per_row)
                dv_new = plgpu.layout_cast(dvi_smem[...], tile) + decay_out[:, None] * _product(k_smem, ds_op, rows)
                neg_dvn_smem[...] = (-dv_new).astype(dt)
                du_smem[...] = dv_new.astype(du_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(du_smem, du_gmem.at[bi, h, i, :, cols])
                ds_entering = (_product(q_smem.transpose((1, 0)), dqin_smem, (dk, _COLUMNS),
                                        (w_smem.transpose((1, 0)), neg_dvn_smem))
                               + gates_gmem[bi, h, i, c - 1] * plgpu.layout_cast(ds_smem[...], tile))
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the dstates store has read ds_smem
                ds_smem[...] = ds_entering
                plgpu.commit_smem()

            plgpu.copy_smem_to_gmem(ds_smem, ds0_gmem.at[bi, h, :, cols])
            plgpu.wait_smem_to_gmem(0)

        cv = _COLUMNS
        pl.run_scoped(scope, plgpu.SMEM((dk, cv), F32), plgpu.SMEM((dk, cv), dt), plgpu.SMEM((c, dk), dt),
                      plgpu.SMEM((c, dk), dt), plgpu.SMEM((c, dk), dt), plgpu.SMEM((c, cv), F32),
                      plgpu.SMEM((c, cv), dt), plgpu.SMEM((2 * c,), F32), plgpu.SMEM((c, cv), dt),
                      plgpu.SMEM((c, cv), du_dtype), plgpu.Barrier(num_barriers=7))

    out_type = (jax.ShapeDtypeStruct((b, hv, n, dk, dv), F32), jax.ShapeDtypeStruct(dv_intra.shape, du_dtype),
                jax.ShapeDtypeStruct(dfinal.shape, F32))
    call = plgpu.kernel(state_gradient_pass, out_type=out_type, grid=(b, hv, dv // _COLUMNS),
                        grid_names=("b", "h", "c"),
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return call(q, k, w, dv_intra, dq_in, gates, dfinal)


def _matmul(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=F32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _state_pass(q, k, w, u, attn, gates, s0, out_dtype, interpret):
    with interpreted(interpret):
        return _state_pass_forward_call(q, k, w, u, attn, gates, s0, out_dtype=out_dtype, emit_output=True,
                                        emit_states=False)


def _state_pass_fwd(q, k, w, u, attn, gates, s0, out_dtype, interpret):
    return _state_pass(q, k, w, u, attn, gates, s0, out_dtype, interpret), (q, k, w, u, attn, gates, s0)


def _state_pass_bwd(out_dtype, interpret, residuals, cotangents):
    q, k, w, u, attn, gates, s0 = residuals
    do, dfinal = cotangents
    b, hk, n, c, dk = q.shape
    hv = w.shape[1]
    dt = w.dtype
    decay_in, decay_out = gates[..., :c, None], gates[..., c:, None]
    do = do.astype(F32)
    dq_in = (decay_in * do).astype(dt)  # d(Q S)
    with interpreted(interpret):
        # the state entering each chunk, recomputed (a second forward pass, as the TPU kernels do by default)
        (states,) = _state_pass_forward_call(q, k, w, u, attn, gates, s0, out_dtype=out_dtype, emit_output=False,
                                             emit_states=True)
        dstates, du, ds0 = _state_gradient_pass_call(q, k, w, _matmul("bhnij,bhniv->bhnjv", attn, do.astype(dt)),
                                                     dq_in, gates, dfinal.astype(F32),
                                                     du_dtype=u.dtype)
    # Everything else for all chunks at once (batched matmuls), from each chunk's entering state S and the
    # gradient dS of its leaving one: the TPU backward kernel's per-chunk formulas.
    grouped = lambda x: x.reshape((b, hk, hv // hk) + x.shape[2:])   # value heads by the q/k head they read
    s_op, ds_op = grouped(states.astype(dt)), grouped(dstates.astype(dt))
    v_new = grouped(u.astype(F32)) - _matmul("bgrnck,bgrnkv->bgrncv", grouped(w), s_op)
    k_ds = _matmul("bgnck,bgrnkv->bgrncv", k, ds_op)
    q_s = _matmul("bgnck,bgrnkv->bgrncv", q, s_op)
    do_g = grouped(do)
    dq = _matmul("bgrncv,bgrnkv->bgnck", grouped(dq_in), s_op)
    dk = _matmul("bgrncv,bgrnkv->bgnck", (grouped(decay_out) * v_new).astype(dt), ds_op)
    dw = -_matmul("bgrncv,bgrnkv->bgrnck", grouped(du.astype(dt)), s_op)
    dattn = _matmul("bgrniv,bgrnjv->bgrnij", do_g.astype(dt), v_new.astype(dt))
    # decay_in's last entry also scales the state: its gradient takes sum(S * dS) on top
    state_decay = jnp.sum(states * dstates, axis=(-2, -1))
    ddin = jnp.sum(do_g * q_s, axis=-1).reshape(gates.shape[:3] + (c,)).at[..., -1].add(state_decay)
    ddout = jnp.sum(v_new * k_ds, axis=-1).reshape(ddin.shape)
    per_value_head = lambda x: x.reshape((b, hv) + x.shape[3:])
    return (dq.astype(q.dtype), dk.astype(k.dtype), per_value_head(dw).astype(w.dtype), du,
            per_value_head(dattn).astype(attn.dtype), jnp.concatenate([ddin, ddout], axis=-1), ds0)


_state_pass.defvjp(_state_pass_fwd, _state_pass_bwd)


def gated_delta_rule_chunked_gpu(q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None,
                                 use_qk_l2norm=True, interpret=False):
    """The chunked gated delta rule (C = 64) with its state passes as Mosaic GPU kernels; same contract as
    `xla.gated_delta_rule_chunked` (o [B, T, HV, V] in v's dtype, fp32 final state [B, HV, K, V]).

    fp32 inputs take the XLA chunked form: `wgmma` rounds fp32 operands to tf32, which the fp32 contract
    (HIGHEST precision products) does not allow.
    """
    if v.dtype != jnp.bfloat16:
        return gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=_CHUNK, scale=scale, initial_state=initial_state,
                                        segment_ids=segment_ids, use_qk_l2norm=use_qk_l2norm)
    dk, dv = k.shape[-1], v.shape[-1]
    (qc, kc, w, u, attn), gates, state0, t = state_pass_inputs(
        q, k, v, g, beta, chunk_size=_CHUNK, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
        use_qk_l2norm=use_qk_l2norm)
    qc, kc, w = (pad_to_multiple(x, 4, 64) for x in (qc, kc, w))
    u = pad_to_multiple(u, 4, _COLUMNS)
    state0 = pad_to_multiple(pad_to_multiple(state0, 2, 64), 3, _COLUMNS)
    o, final_state = _state_pass(qc, kc, w, u, attn, gates, state0, jnp.dtype(v.dtype), bool(interpret))
    return from_chunks(o[..., :dv], t, v.dtype), final_state[:, :, :dk, :dv]
