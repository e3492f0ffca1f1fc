"""The gated delta rule as the model calls it: one function that picks an implementation.

An implementation is a pair: the function for sequences, and the one for a single token (a decode step).
- "xla": the pure-JAX chunked WY form (C=64; 16 or 32 for shorter sequences), and a two-pass XLA decode step;
- "pallas_tpu": the Mosaic kernels (`pallas_kernels/gated_delta_rule/tpu.py`): the chunked form's state pass
  with a custom VJP, and a fused decode step;
- "pallas_tpu_interpret": the same kernels through Pallas' TPU interpreter, on any backend (slow; for tests);
- "pallas_gpu": the Mosaic GPU kernels for Hopper (`pallas_kernels/gated_delta_rule/gpu.py`): the chunked form's
  state passes forward and backward (bf16; fp32 inputs take the XLA form) and a fused decode step;
- "pallas_gpu_interpret": the same kernels in Mosaic GPU's interpreter with race detection (CPU, jax >= 0.11);
- "recurrent": the token-by-token `lax.scan` oracle for both (slow; for checking).
The choice is the model's `Kernels.gated_delta_rule` ("auto": pallas_tpu on TPU, pallas_gpu on NVIDIA Hopper,
xla elsewhere).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.gated_delta_rule.reference import gated_delta_rule_recurrent
from pallas_kernels.gated_delta_rule.gpu import gated_delta_rule_chunked_gpu, gated_delta_rule_step_gpu
from pallas_kernels.gated_delta_rule.tpu import gated_delta_rule_chunked_tpu, gated_delta_rule_step_tpu
from pallas_kernels.gated_delta_rule.xla import gated_delta_rule_chunked, gated_delta_rule_step
from qwenjax import _compat, sharding
from qwenjax.ops.platform import HOPPER, platform_of

IMPLEMENTATIONS = {  # name: (sequence, single token)
    "xla": (gated_delta_rule_chunked, gated_delta_rule_step),
    "pallas_tpu": (gated_delta_rule_chunked_tpu, gated_delta_rule_step_tpu),
    "pallas_tpu_interpret": (functools.partial(gated_delta_rule_chunked_tpu, interpret=True),
                             functools.partial(gated_delta_rule_step_tpu, interpret=True)),
    "pallas_gpu": (gated_delta_rule_chunked_gpu, gated_delta_rule_step_gpu),
    "pallas_gpu_interpret": (functools.partial(gated_delta_rule_chunked_gpu, interpret=True),
                             functools.partial(gated_delta_rule_step_gpu, interpret=True)),
    "recurrent": (gated_delta_rule_recurrent, gated_delta_rule_recurrent),
}


def auto(platform: str) -> str:
    return {"tpu": "pallas_tpu", HOPPER: "pallas_gpu"}.get(platform, "xla")


STEPWISE_MAX_TOKENS = 8  # up to this many tokens without documents run one at a time through the decode step


def gated_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, *,
                     initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                     implementation: str = "auto", every_state: bool = False) -> tuple[jax.Array, jax.Array]:
    """o, final_state for q,k [B,T,HK,K], v [B,T,HV,V], g, beta [B,T,HV]; q/k are l2-normalised inside.

    `implementation`: a name of IMPLEMENTATIONS ("auto" picks by the default backend). A few tokens (T <=
    STEPWISE_MAX_TOKENS, no segment_ids: a decode step, a speculative verify pass, a short continuation) go one
    at a time through the implementation's step function: the chunked form would pad them to a whole chunk
    (4 tokens: 2.8x slower through the whole model on XLA:CPU).
    `every_state` (a verify pass, whose caller keeps the state after any prefix of its tokens): the state after
    every token, [B, T, HV, K, V], instead of the final one; the tokens then always go one at a time.

    Returns o [B, T, HV, V] (v's dtype) and the fp32 final state [B, HV, K, V] (or every state).
    """
    if implementation == "auto":
        implementation = auto(platform_of())
    sequence, single_token = IMPLEMENTATIONS[implementation]
    t = q.shape[1]
    if every_state or (t <= STEPWISE_MAX_TOKENS and segment_ids is None):
        impl = functools.partial(_stepwise, single_token, every_state=every_state)
    else:
        impl = sequence

    def local(q, k, v, g, beta, initial_state, segment_ids):
        return impl(q, k, v, g, beta, initial_state=initial_state, segment_ids=segment_ids, use_qk_l2norm=True)

    ctx = sharding.active()
    if ctx is None:
        return local(q, k, v, g, beta, initial_state, segment_ids)
    # Every (sequence, value head) is independent: run per shard over batch and heads, with no collectives
    # inside (kernels cannot be auto-partitioned, and XLA's partitioning of the scan/solve is no better).
    batch = sharding.mesh_axes_for("batch", q.shape[0]) or None
    heads = sharding.mesh_axes_for("gdn_heads", v.shape[2])
    if heads and sharding.mesh_axes_for("gdn_heads", q.shape[2]) != heads:
        heads = ()  # key heads must split the same way for GVA to stay local
    heads = heads or None
    tok, state = P(batch, None, heads), P(batch, heads)
    in_specs = (P(batch, None, heads, None), P(batch, None, heads, None), P(batch, None, heads, None), tok, tok,
                None if initial_state is None else state, None if segment_ids is None else P(batch, None))
    out_specs = (P(batch, None, heads, None), tok if every_state else state)
    return _compat.shard_map(local, mesh=ctx[0], in_specs=in_specs, out_specs=out_specs)(
        q, k, v, g, beta, initial_state, segment_ids)


def _stepwise(single_token, q, k, v, g, beta, *, initial_state, segment_ids, use_qk_l2norm, every_state):
    """The tokens one at a time through `single_token` (no segment_ids): (o, final state or every state)."""
    del segment_ids
    outs, states, state = [], [], initial_state
    for i in range(q.shape[1]):
        o_i, state = single_token(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], g[:, i:i + 1], beta[:, i:i + 1],
                                  initial_state=state, use_qk_l2norm=use_qk_l2norm)
        outs.append(o_i)
        states.append(state)
    return jnp.concatenate(outs, axis=1), (jnp.stack(states, axis=1) if every_state else state)
