"""The gated delta rule as the model calls it: one function that picks an implementation.

Implementations (see `pallas_kernels/gated_delta_rule/`):
- "chunked": the pure-JAX chunked WY form (C=64), the default everywhere today;
- "recurrent": the token-by-token `lax.scan` oracle (slow; for checking);
- "step": one token (a decode step) in two passes over the state, taken whenever T == 1.
Pallas kernels register here as they land. `QWENJAX_GATED_DELTA_RULE=<name>` or the `implementation` argument
forces one.
"""

from __future__ import annotations

import os

import jax
from jax.sharding import PartitionSpec as P

from pallas_kernels.gated_delta_rule import (gated_delta_rule_chunked, gated_delta_rule_recurrent,
                                             gated_delta_rule_step)
from qwenjax import _compat, sharding

IMPLEMENTATIONS = {
    "chunked": gated_delta_rule_chunked,
    "recurrent": gated_delta_rule_recurrent,
    "step": gated_delta_rule_step,
}


def default_implementation() -> str:
    name = os.environ.get("QWENJAX_GATED_DELTA_RULE", "chunked")
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"QWENJAX_GATED_DELTA_RULE={name!r}: choose one of {sorted(IMPLEMENTATIONS)}")
    return name


def gated_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, *,
                     initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                     implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
    """o, final_state for q,k [B,T,HK,K], v [B,T,HV,V], g, beta [B,T,HV]; q/k are l2-normalised inside.

    A single token (T == 1, a decode step) takes "step" unless `implementation` says otherwise.

    Returns o [B, T, HV, V] (v's dtype) and the fp32 final state [B, HV, K, V].
    """
    # One token is one step of the recurrence: the chunked form would pad it to a whole chunk.
    name = implementation or ("step" if q.shape[1] == 1 else default_implementation())
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown gated delta rule implementation {name!r}; choose one of {sorted(IMPLEMENTATIONS)}")
    impl = IMPLEMENTATIONS[name]

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
    return _compat.shard_map(local, mesh=ctx[0], in_specs=in_specs, out_specs=(P(batch, None, heads, None), state))(
        q, k, v, g, beta, initial_state, segment_ids)
