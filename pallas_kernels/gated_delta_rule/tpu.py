"""Pallas TPU (Mosaic) kernels for the gated delta rule: the chunked form's state pass and the decode step.

Chunked form (`gated_delta_rule_chunked_tpu`), C = 64:
1. Chunk-parallel work in XLA (`xla.chunk_quantities`): gates, the triangular inverse, W, U, the gated
   Q K^T. Every chunk at once, no state: XLA batches it well, and it is differentiated by JAX's autodiff.
2. The state pass as a Pallas kernel, grid (B, HV, N) with the chunk axis "arbitrary": the fp32 state stays in
   VMEM scratch while the chunks stream through. Per chunk (S the incoming state):
       V_new = U - W S,   O = decay_in * (Q S) + attn V_new,   S' = decay_in[-1] * S + K^T (decay_out * V_new)
   A custom VJP runs a second kernel over the chunks in reverse with dS in VMEM scratch. It needs each chunk's
   incoming state: by default recomputed in the backward by a forward pass that writes them
   (`SAVE_STATES = False`); see BENCHMARKS.md for the compiled memory of both choices.
GVA: q and k blocks are read per q/k head through the index map (value head h reads q/k head h // (HV // HK));
nothing is repeated in memory. The per-value-head gradients of q and k are summed over the group after the
backward kernel.

Numerics: the state, V_new and every accumulation are fp32. Matmul operands are the model's dtype: bf16
inputs give bf16 operands (the state rounded to bf16 as an operand only, as flash-linear-attention does); fp32
inputs give fp32 operands at HIGHEST precision, since Mosaic's default fp32 matmul rounds operands to bf16.

Decode (`gated_delta_rule_step_tpu`): one token, grid (B, HV), the l2norm, gate and state update fused; the
state is updated in place (input/output aliased). Vector-unit work only, exact fp32.

`interpret=True` runs either kernel through Pallas' TPU interpreter (any backend; the CPU tests use it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gated_delta_rule.base import L2NORM_EPS, check_step
from pallas_kernels.gated_delta_rule.xla import check_initial_state, from_chunks, state_pass_inputs
from pallas_kernels.tpu_common import F32, NT, TN, dot, interpret_params

__all__ = ["gated_delta_rule_chunked_tpu", "gated_delta_rule_step_tpu", "SAVE_STATES"]

# Keep each chunk's incoming state from the forward for the backward (memory) or recompute it (one more
# forward state pass). Recompute: see the module docstring.
SAVE_STATES = False


def _div(h, ratio):
    # Truncating division: `//` on traced ints lowers through `sign`, whose Mosaic rule asks the default
    # backend for its TPU generation (and fails when compiling for a TPU from a CPU host).
    return jax.lax.div(h, ratio)


# ---------------------------------------------------------------------------------------------------------
# Chunked form: the state pass, forward and backward
# ---------------------------------------------------------------------------------------------------------

def _column(row):
    """[1, C] -> [C, 1] on the vector unit (a masked lane reduction; C x C work, small beside the matmuls)."""
    c = row.shape[1]
    eye = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0) == jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def _row(column):
    """[C, 1] -> [1, C], as `_column`."""
    c = column.shape[0]
    eye = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0) == jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    return jnp.sum(jnp.where(eye, column, 0.0), axis=0, keepdims=True)


def _gates(gates_ref, chunk, c):
    """decay_in, decay_out of a chunk as columns [C, 1], and the state decay decay_in[-1] as [1, 1]."""
    row = gates_ref[pl.ds(chunk, 1), :]
    return _column(row[:, :c]), _column(row[:, c:]), row[:, c - 1:c]


def _state_pass_forward_kernel(q_ref, k_ref, w_ref, u_ref, attn_ref, gates_ref, s0_ref, *refs,
                               emit_output, emit_states):
    refs = list(refs)
    o_ref = refs.pop(0) if emit_output else None
    final_ref = refs.pop(0) if emit_output else None
    states_ref = refs.pop(0) if emit_states else None
    (state_ref,) = refs
    n, c = pl.program_id(2), attn_ref.shape[0]

    @pl.when(n == 0)
    def _():
        state_ref[...] = s0_ref[...]

    s = state_ref[...]
    if emit_states:
        states_ref[...] = s
    dt = w_ref.dtype
    s_op = s.astype(dt)
    din, dout, state_decay = _gates(gates_ref, n, c)
    v_new = u_ref[...].astype(F32) - dot(w_ref[...], s_op)
    if emit_output:
        o = din * dot(q_ref[...], s_op) + dot(attn_ref[...], v_new.astype(dt))
        o_ref[...] = o.astype(o_ref.dtype)
    s_new = state_decay * s + dot(k_ref[...], (dout * v_new).astype(dt), TN)
    state_ref[...] = s_new
    if emit_output:
        @pl.when(n == pl.num_programs(2) - 1)
        def _():
            final_ref[...] = s_new


def _state_pass_backward_kernel(q_ref, k_ref, w_ref, u_ref, attn_ref, gates_ref, states_ref, do_ref,
                                dfinal_ref, dq_ref, dk_ref, dw_ref, du_ref, dattn_ref, dgates_ref, ds0_ref,
                                dstate_ref):
    n, c = pl.program_id(2), attn_ref.shape[0]
    chunk = pl.num_programs(2) - 1 - n  # the chunks in reverse

    @pl.when(n == 0)
    def _():
        dstate_ref[...] = dfinal_ref[...]

    ds = dstate_ref[...]   # d loss / d (state leaving this chunk)
    s = states_ref[...]    # the state entering it
    dt = w_ref.dtype
    s_op, ds_op = s.astype(dt), ds.astype(dt)
    q, k, w, attn = q_ref[...], k_ref[...], w_ref[...], attn_ref[...]
    din, dout, state_decay = _gates(gates_ref, chunk, c)
    do = do_ref[...]
    do_f = do.astype(F32)

    v_new = u_ref[...].astype(F32) - dot(w, s_op)
    k_ds = dot(k, ds_op)
    dv_new = dot(attn, do.astype(dt), TN) + dout * k_ds
    dv_new_op = dv_new.astype(dt)
    dq_in = (din * do_f).astype(dt)   # d (Q S)

    dattn_ref[...] = dot(do.astype(dt), v_new.astype(dt), NT).astype(dattn_ref.dtype)
    dq_ref[...] = dot(dq_in, s_op, NT)
    dk_ref[...] = dot((dout * v_new).astype(dt), ds_op, NT)
    du_ref[...] = dv_new.astype(du_ref.dtype)
    dw_ref[...] = (-dot(dv_new_op, s_op, NT)).astype(dw_ref.dtype)
    # decay_in's last entry also scales the state: its gradient takes sum(S * dS') on top.
    last = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
    state_decay_grad = jnp.sum(jnp.sum(s * ds, axis=1, keepdims=True), axis=0, keepdims=True)
    ddin = jnp.sum(do_f * dot(q, s_op), axis=1, keepdims=True) + jnp.where(last, state_decay_grad, 0.0)
    dgates_ref[pl.ds(chunk, 1), pl.ds(0, c)] = _row(ddin)
    dgates_ref[pl.ds(chunk, 1), pl.ds(c, c)] = _row(jnp.sum(v_new * k_ds, axis=1, keepdims=True))

    ds_prev = state_decay * ds + dot(q, dq_in, TN) - dot(w, dv_new_op, TN)
    dstate_ref[...] = ds_prev

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = ds_prev


def _specs(q, w, *, reverse=False):
    """BlockSpec makers over grid (B, HV, N): per q/k head, per value head, per row state."""
    b, hv, n, c, dk = w.shape
    ratio = hv // q.shape[1]
    chunk = (lambda i: n - 1 - i) if reverse else (lambda i: i)
    qk = pl.BlockSpec((None, None, None, c, dk), lambda bi, h, i: (bi, _div(h, ratio), chunk(i), 0, 0))
    per_head = lambda d: pl.BlockSpec((None, None, None, c, d), lambda bi, h, i: (bi, h, chunk(i), 0, 0))
    per_chunk_state = lambda dv: pl.BlockSpec((None, None, None, dk, dv), lambda bi, h, i: (bi, h, chunk(i), 0, 0))
    state = lambda dv: pl.BlockSpec((None, None, dk, dv), lambda bi, h, i: (bi, h, 0, 0))
    # The gates of all chunks of a (row, head): [N, 2C], resident in VMEM while the chunks pass; a kernel
    # step reads (or writes) its chunk's row. Per chunk [C, 1] blocks would pad each value to 128 lanes in HBM.
    gates = pl.BlockSpec((None, None, n, 2 * c), lambda bi, h, i: (bi, h, 0, 0))
    return qk, per_head, per_chunk_state, state, gates


_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _forward_call(q, k, w, u, attn, gates, s0, *, out_dtype, emit_output, emit_states, interpret):
    b, hv, n, c, dk = w.shape
    dv = u.shape[-1]
    qk, per_head, per_chunk_state, state, gates_spec = _specs(q, w)
    out_shape, out_specs = [], []
    if emit_output:
        out_shape += [jax.ShapeDtypeStruct(u.shape, out_dtype), jax.ShapeDtypeStruct(s0.shape, F32)]
        out_specs += [per_head(dv), state(dv)]
    if emit_states:
        out_shape.append(jax.ShapeDtypeStruct((b, hv, n, dk, dv), F32))
        out_specs.append(per_chunk_state(dv))
    kernel = functools.partial(_state_pass_forward_kernel, emit_output=emit_output, emit_states=emit_states)
    return pl.pallas_call(
        kernel, out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(b, hv, n),
            in_specs=[qk, qk, per_head(dk), per_head(dv), per_head(c), gates_spec, state(dv)],
            out_specs=out_specs, scratch_shapes=[pltpu.VMEM((dk, dv), F32)]),
        compiler_params=_SEMANTICS, interpret=interpret_params(interpret),
    )(q, k, w, u, attn, gates, s0)


def _backward_call(q, k, w, u, attn, gates, states, do, dfinal, *, interpret):
    b, hv, n, c, dk = w.shape
    dv = u.shape[-1]
    qk, per_head, per_chunk_state, state, gates_spec = _specs(q, w, reverse=True)
    per_value_head = lambda x, dtype=None: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype)
    return pl.pallas_call(
        _state_pass_backward_kernel,
        out_shape=[jax.ShapeDtypeStruct(w.shape, F32), jax.ShapeDtypeStruct(w.shape, F32),  # dq, dk per HV
                   per_value_head(w), per_value_head(u), per_value_head(attn), per_value_head(gates),
                   per_value_head(dfinal)],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(b, hv, n),
            in_specs=[qk, qk, per_head(dk), per_head(dv), per_head(c), gates_spec, per_chunk_state(dv),
                      per_head(dv), state(dv)],
            out_specs=[per_head(dk), per_head(dk), per_head(dk), per_head(dv), per_head(c), gates_spec,
                       state(dv)],
            scratch_shapes=[pltpu.VMEM((dk, dv), F32)]),
        compiler_params=_SEMANTICS, interpret=interpret_params(interpret),
    )(q, k, w, u, attn, gates, states, do, dfinal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _state_pass(q, k, w, u, attn, gates, s0, out_dtype, save_states, interpret):
    return _forward_call(q, k, w, u, attn, gates, s0, out_dtype=out_dtype, emit_output=True, emit_states=False,
                         interpret=interpret)


def _state_pass_fwd(q, k, w, u, attn, gates, s0, out_dtype, save_states, interpret):
    o, final, *states = _forward_call(q, k, w, u, attn, gates, s0, out_dtype=out_dtype, emit_output=True,
                                      emit_states=save_states, interpret=interpret)
    return (o, final), (q, k, w, u, attn, gates, s0, states[0] if save_states else None)


def _state_pass_bwd(out_dtype, save_states, interpret, residuals, cotangents):
    q, k, w, u, attn, gates, s0, states = residuals
    do, dfinal = cotangents
    if states is None:
        (states,) = _forward_call(q, k, w, u, attn, gates, s0, out_dtype=out_dtype, emit_output=False,
                                  emit_states=True, interpret=interpret)
    dq, dk, dw, du, dattn, dgates, ds0 = _backward_call(q, k, w, u, attn, gates, states, do, dfinal.astype(F32),
                                                        interpret=interpret)
    # Value heads that share a q/k head: their gradients add up.
    group_sum = lambda x: x.reshape(q.shape[:2] + (-1,) + x.shape[2:]).sum(axis=2).astype(q.dtype)
    return group_sum(dq), group_sum(dk), dw, du, dattn, dgates, ds0


_state_pass.defvjp(_state_pass_fwd, _state_pass_bwd)


def gated_delta_rule_chunked_tpu(q, k, v, g, beta, *, chunk_size=64, scale=None, initial_state=None,
                                 segment_ids=None, use_qk_l2norm=True, interpret=False, save_states=None):
    """The chunked gated delta rule with the state pass as a Mosaic kernel; same contract as
    `xla.gated_delta_rule_chunked` (o [B, T, HV, V] in v's dtype, fp32 final state [B, HV, K, V]).

    Args (beyond the reference's):
      interpret: run the kernels in Pallas' TPU interpreter (for tests off TPU).
      save_states: keep the per-chunk states for the backward instead of recomputing them
        (default `SAVE_STATES`).
    """
    operands, gates, state0, t = state_pass_inputs(q, k, v, g, beta, chunk_size=chunk_size, scale=scale,
                                                   initial_state=initial_state, segment_ids=segment_ids,
                                                   use_qk_l2norm=use_qk_l2norm)
    o, final_state = _state_pass(*operands, gates, state0, jnp.dtype(v.dtype),
                                 SAVE_STATES if save_states is None else bool(save_states), bool(interpret))
    return from_chunks(o, t, v.dtype), final_state


# ---------------------------------------------------------------------------------------------------------
# Decode: one fused step
# ---------------------------------------------------------------------------------------------------------

def _step_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, state_ref, o_ref, new_state_ref, *, scale,
                 use_qk_l2norm):
    # q, k are columns [K, 1]; v, o rows [1, V]; g, beta [1, 1]; the state [K, V].
    q, k = q_ref[...].astype(F32), k_ref[...].astype(F32)
    if use_qk_l2norm:
        q = q * jax.lax.rsqrt(jnp.sum(q * q, axis=0, keepdims=True) + L2NORM_EPS)
        k = k * jax.lax.rsqrt(jnp.sum(k * k, axis=0, keepdims=True) + L2NORM_EPS)
    q = q * scale
    decay = jnp.exp(g_ref[...])
    s = state_ref[...]
    state_k = jnp.sum(k * s, axis=0, keepdims=True)  # S^T k, [1, V]
    state_q = jnp.sum(q * s, axis=0, keepdims=True)
    delta = (v_ref[...].astype(F32) - decay * state_k) * beta_ref[...]
    new_state_ref[...] = decay * s + k * delta
    o = decay * state_q + jnp.sum(k * q, axis=0, keepdims=True) * delta
    o_ref[...] = o.astype(o_ref.dtype)


def gated_delta_rule_step_tpu(q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None,
                              use_qk_l2norm=True, interpret=False):
    """One token (T == 1) as one fused kernel; same contract as `xla.gated_delta_rule_step`.

    The state is read once and written once, in place when the caller donates it.
    """
    b, hk, dk, hv, dv = check_step(q, k, v, g, beta, "gated_delta_rule_step_tpu")
    state = check_initial_state(initial_state, k, v)
    ratio = hv // hk
    column = lambda x: jnp.moveaxis(x, 1, -1)                      # [B, 1, H, D] -> [B, H, D, 1]
    scalar = lambda x: x.astype(F32).reshape(b, hv, 1, 1)
    qk_spec = pl.BlockSpec((None, None, dk, 1), lambda bi, h: (bi, _div(h, ratio), 0, 0))
    row_spec = pl.BlockSpec((None, None, 1, dv), lambda bi, h: (bi, h, 0, 0))
    scalar_spec = pl.BlockSpec((None, None, 1, 1), lambda bi, h: (bi, h, 0, 0))
    state_spec = pl.BlockSpec((None, None, dk, dv), lambda bi, h: (bi, h, 0, 0))
    kernel = functools.partial(_step_kernel, scale=float(dk ** -0.5 if scale is None else scale),
                               use_qk_l2norm=use_qk_l2norm)
    o, new_state = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((b, hv, 1, dv), v.dtype), jax.ShapeDtypeStruct(state.shape, F32)],
        grid=(b, hv),
        in_specs=[qk_spec, qk_spec, row_spec, scalar_spec, scalar_spec, state_spec],
        out_specs=[row_spec, state_spec],
        input_output_aliases={5: 1},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret_params(interpret),
    )(column(q), column(k), jnp.swapaxes(v, 1, 2), scalar(g), scalar(beta), state)
    return jnp.swapaxes(o, 1, 2), new_state
