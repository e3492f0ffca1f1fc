"""Dropless mixture-of-experts: route → sort token copies by expert → grouped matmuls → unsort and combine.

Every token goes to its top-k experts, none is dropped (no capacity factor): the N·k (token, expert) pairs are
sorted by expert, so each expert's inputs are one contiguous run of rows, and two grouped matmuls (gate+up
fused, then down) run over the runs. The permutations have a custom VJP: the backward of "copy token t to its k
slots" is a gather of the k slot gradients and a sum, not the scatter-add autodiff would write.

Expert parallelism (the `expert` mesh axis), two ways (the model's `Kernels.expert_parallel`):
- "ragged_all_to_all" (auto on TPU and GPU): each shard sends every token copy to the shard holding its expert,
  laid out there already grouped by expert, and the results come back the same way: only routed copies move.
- "allgather" (auto elsewhere): each shard gathers the tokens of its expert group, runs its experts on the pairs
  routed to them, and a reduce-scatter returns every token's sum to its shard. XLA:CPU has no
  `ragged_all_to_all`; with P expert shards and top-k routing this moves P/k times the copies the other way does.
- "ragged_all_to_all_emulated": the first, with the collective emulated by an all-gather (its documented
  semantics), so the CPU tests check the bookkeeping that the real collective runs on TPU and GPU.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwenjax import _compat, sharding
from qwenjax.ops.grouped_matmul import grouped_matmul
from qwenjax.ops.platform import is_gpu, platform_of


class Routing(NamedTuple):
    weights: jax.Array  # [N, k] fp32 combine weights of the chosen experts
    experts: jax.Array  # [N, k] int32 expert ids, best first
    logits: jax.Array   # [N, E] fp32 router logits (for the auxiliary losses)


def route(x: jax.Array, router_weight: jax.Array, top_k: int, normalize: bool = True) -> Routing:
    """Softmax over the experts' logits, top-k, renormalised over the k (`norm_topk_prob`); all in fp32.

    x [N, H], router_weight [E, H]. The logits are computed in fp32 from the model-dtype inputs: a bf16 router
    would flip near-tied expert choices.
    """
    logits = jnp.einsum("nh,eh->ne", x.astype(jnp.float32), router_weight.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights, experts.astype(jnp.int32), logits)


# ---- permutations with gather-only gradients ---------------------------------------------------------------------
def sort_by_expert(experts: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For expert ids [N, k] in [0, num_groups): (order [N·k]: the pair index at each sorted slot, inverse
    [N·k]: the sorted slot of each pair, group_sizes [num_groups] int32). The sort is stable."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
    group_sizes = jnp.bincount(flat, length=num_groups).astype(jnp.int32)
    return order, inverse, group_sizes


@jax.custom_vjp
def gather_tokens(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """xs [N·k, H] with xs[s] = x[order[s] // k]: each token copied to the sorted slots of its k pairs."""
    k = order.shape[0] // x.shape[0]
    return jnp.take(x, order // k, axis=0)


def _gather_tokens_fwd(x, order, inverse):
    return gather_tokens(x, order, inverse), (inverse, x.shape[0])


def _gather_tokens_bwd(res, dxs):
    inverse, n = res
    dx = jnp.take(dxs, inverse, axis=0).reshape(n, -1, dxs.shape[-1])  # [N, k, H]: the token's k slots
    return jnp.sum(dx.astype(jnp.float32), axis=1).astype(dxs.dtype), None, None


gather_tokens.defvjp(_gather_tokens_fwd, _gather_tokens_bwd)


@jax.custom_vjp
def combine_tokens(ys: jax.Array, weights: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """out [N, H] fp32, out[t] = Σ_j weights[t, j] · ys[inverse[t·k + j]]: each token's k expert outputs, weighed."""
    n, k = weights.shape
    per_pair = jnp.take(ys, inverse, axis=0).reshape(n, k, ys.shape[-1]).astype(jnp.float32)
    return jnp.einsum("nkh,nk->nh", per_pair, weights.astype(jnp.float32))


def _combine_tokens_fwd(ys, weights, order, inverse):
    return combine_tokens(ys, weights, order, inverse), (ys, weights, order, inverse)


def _combine_tokens_bwd(res, dout):
    ys, weights, order, inverse = res
    n, k = weights.shape
    dout = dout.astype(jnp.float32)
    # slot s holds pair order[s] = (token order[s] // k, choice order[s] % k)
    dys = jnp.take(dout, order // k, axis=0) * jnp.take(weights.reshape(-1), order)[:, None].astype(jnp.float32)
    per_pair = jnp.take(ys, inverse, axis=0).reshape(n, k, ys.shape[-1]).astype(jnp.float32)
    dweights = jnp.einsum("nkh,nh->nk", per_pair, dout)
    return dys.astype(ys.dtype), dweights.astype(weights.dtype), None, None


combine_tokens.defvjp(_combine_tokens_fwd, _combine_tokens_bwd)


# ---- the expert computation --------------------------------------------------------------------------------------
def expert_ffn(xs: jax.Array, gate_up: jax.Array, down: jax.Array, group_sizes: jax.Array,
               implementation: str = "auto") -> jax.Array:
    """SwiGLU experts over sorted rows xs [M, H]: gate_up [G, 2I, H] (gate rows, then up rows), down [G, H, I].
    Rows past sum(group_sizes) belong to no expert and come out zero. Returns [M, H] fp32."""
    h = grouped_matmul(xs, gate_up, group_sizes, implementation=implementation)  # [M, 2I] fp32
    inter = gate_up.shape[1] // 2
    a = (jax.nn.silu(h[:, :inter]) * h[:, inter:]).astype(xs.dtype)
    return grouped_matmul(a, down, group_sizes, implementation=implementation)


def _local_experts(x, weights, experts, gate_up, down, first_expert, implementation):
    """The pairs routed to experts [first_expert, first_expert + G) of gate_up/down, combined per token
    (the other pairs contribute zero). x [N, H], weights/experts [N, k]; returns [N, H] fp32."""
    num_local = gate_up.shape[0]
    local = experts - first_expert
    mine = (local >= 0) & (local < num_local)
    # Pairs of other shards sort after every local expert, into one group that no matmul reads.
    order, inverse, group_sizes = sort_by_expert(jnp.where(mine, local, num_local), num_local + 1)
    xs = gather_tokens(x, order, inverse)
    ys = expert_ffn(xs, gate_up, down, group_sizes[:num_local], implementation).astype(x.dtype)
    return combine_tokens(ys, jnp.where(mine, weights, 0.0), order, inverse)


def _ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name, num_shards, shard):
    """`jax.lax.ragged_all_to_all`'s documented semantics built from all-gathers: every shard receives every
    operand and keeps the slices sent to it (for backends without the collective; P times the traffic)."""
    del recv_sizes  # implied by the senders' send_sizes
    slices = input_offsets.shape[0] // num_shards
    rows = operand.shape[0]
    ops, starts, sizes, dests = (jax.lax.all_gather(a, axis_name) for a in
                                 (operand, input_offsets, send_sizes, output_offsets))  # [P, ...]
    mine = lambda a: jax.lax.dynamic_slice_in_dim(a, shard * slices, slices, axis=1)[:, None, :]  # [P, 1, s]
    starts, sizes, dests = mine(starts), mine(sizes), mine(dests)
    r = jnp.arange(rows)[None, :, None]
    hit = (r >= starts) & (r < starts + sizes)                                 # [P, M, s]: row r of source q
    dest = jnp.min(jnp.where(hit, dests + r - starts, output.shape[0]), axis=-1)  # out of range: not for me
    return output.at[dest.reshape(-1)].set(ops.reshape(-1, *operand.shape[1:]), mode="drop")


def _exchanged_experts(x, weights, experts, gate_up, down, *, axes, num_shards, exchange, implementation):
    """Expert parallelism by ragged all-to-all: x [n, H] and its routing are this shard's tokens; gate_up/down
    hold this shard's E/P experts. Returns [n, H] fp32."""
    n, k = experts.shape
    e_local = gate_up.shape[0]
    order, inverse, sizes = sort_by_expert(experts, e_local * num_shards)
    xs = gather_tokens(x, order, inverse)                # [n·k, H], grouped by expert
    starts = jnp.cumsum(sizes) - sizes                   # where each expert's rows start in xs
    # One slice per (destination shard, its local expert). got[p, l]: rows source p sends to my expert l.
    got = jax.lax.all_to_all(sizes.reshape(num_shards, e_local), axes, 0, 0, tiled=True)
    totals = jnp.sum(got, axis=0)
    # Received rows grouped by my expert, then by source: the grouped matmul reads them as they land.
    recv_at = (jnp.cumsum(totals) - totals)[None, :] + jnp.cumsum(got, axis=0) - got   # [P, E/P]
    send_to = jax.lax.all_to_all(recv_at, axes, 0, 0, tiled=True).reshape(-1)        # where my slices land
    buf = exchange(xs, jnp.zeros((num_shards * n * k, x.shape[1]), x.dtype), starts, sizes, send_to,
                   got.reshape(-1))
    ys = expert_ffn(buf, gate_up, down, totals, implementation).astype(x.dtype)
    # ... and back, to where each copy came from
    came_from = jax.lax.all_to_all(starts.reshape(num_shards, e_local), axes, 0, 0, tiled=True).reshape(-1)
    back = exchange(ys, jnp.zeros_like(xs), recv_at.reshape(-1), got.reshape(-1), came_from, sizes)
    return combine_tokens(back, weights, order, inverse)


EXPERT_PARALLEL = ("allgather", "ragged_all_to_all", "ragged_all_to_all_emulated")


def auto_expert_parallel(platform: str) -> str:
    return "ragged_all_to_all" if platform == "tpu" or is_gpu(platform) else "allgather"


def moe_experts(x: jax.Array, routing: Routing, gate_up: jax.Array, down: jax.Array, *,
                implementation: str = "auto", expert_parallel: str = "auto") -> jax.Array:
    """The routed experts' weighted sum for tokens x [N, H] (fp32 [N, H]).

    `implementation`: the grouped matmul's; `expert_parallel`: a name of EXPERT_PARALLEL ("auto" for either
    picks by the default backend).

    Under `qwenjax.sharding.activation_sharding`, runs inside `shard_map`: tokens split like the batch, experts
    over the `expert` mesh axis. When the expert axis also splits the tokens (the default rules: it is a batch
    axis outside the MoE), the shards of an expert group exchange token copies (see the module doc for the two
    ways); when it does not (a batch it does not divide), each shard runs its experts and the sums are added.
    """
    ctx = sharding.active()
    if ctx is None:
        return _local_experts(x, routing.weights, routing.experts, gate_up, down, 0, implementation)
    mesh = ctx[0]
    expert_axes = sharding.mesh_axes_for("experts", gate_up.shape[0])
    token_axes = sharding.mesh_axes_for("batch", x.shape[0])
    gathered = tuple(a for a in token_axes if a in expert_axes)
    method = auto_expert_parallel(platform_of()) if expert_parallel == "auto" else expert_parallel
    ragged = method != "allgather" and gathered and gathered == expert_axes
    num_shards = math.prod(mesh.shape[a] for a in expert_axes)

    def local(x, weights, experts, gate_up, down):
        shard = jnp.int32(0)
        for a in expert_axes:  # row-major index over the expert axes, as the PartitionSpec splits them
            shard = shard * mesh.shape[a] + jax.lax.axis_index(a)
        if ragged:
            exchange = (functools.partial(jax.lax.ragged_all_to_all, axis_name=expert_axes)
                        if method == "ragged_all_to_all" else
                        functools.partial(_ragged_all_to_all_emulated, axis_name=expert_axes, num_shards=num_shards,
                                          shard=shard))
            return _exchanged_experts(x, weights, experts, gate_up, down, axes=expert_axes, num_shards=num_shards,
                                      exchange=exchange, implementation=implementation)
        if gathered:
            x, weights, experts = (jax.lax.all_gather(a, gathered, axis=0, tiled=True) for a in (x, weights, experts))
        out = _local_experts(x, weights, experts, gate_up, down, shard * gate_up.shape[0], implementation)
        if gathered:
            out = jax.lax.psum_scatter(out, gathered, scatter_dimension=0, tiled=True)
        rest = tuple(a for a in expert_axes if a not in gathered)
        return jax.lax.psum(out, rest) if rest else out

    tok = P(token_axes or None)
    exp = P(expert_axes or None)
    return _compat.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, exp, exp), out_specs=tok)(
        x, routing.weights, routing.experts, gate_up, down)
