"""The gated delta rule's oracle: the token-by-token recurrence, as transformers' ``torch_recurrent_gated_delta_rule``
(``models/qwen3_5/modeling_qwen3_5.py``) computes it, plus packed-sequence support via ``segment_ids``.

Every implementation (`xla.py`, `tpu.py`) is tested against it. Recurrence, per value head (S in R^{K x V},
fp32)::

    S_t = exp(g_t) * S_{t-1}
    S_t = S_t + k_t (beta_t * (v_t - S_t^T k_t))^T
    o_t = S_t^T (scale * q_t)

All internal math runs in fp32 with ``Precision.HIGHEST`` matmuls (off CPU) so that the oracle does not
silently drop to bf16/tf32 passes on accelerators. It favours clarity and exactness over speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule.base import einsum, prepare, previous_doc, repeat_heads

__all__ = ["gated_delta_rule_recurrent"]


def gated_delta_rule_recurrent(q, k, v, g, beta, *, scale=None, initial_state=None,
                               segment_ids=None, use_qk_l2norm=True):
    """Token-by-token recurrence via jax.lax.scan. Returns (o, final_state).

    Args:
        q: Queries, [B, T, HK, K].
        k: Keys, [B, T, HK, K].
        v: Values, [B, T, HV, V]; HV must be a multiple of HK (GVA).
        g: Log-decay (<= 0), [B, T, HV].
        beta: Write strength, already passed through a sigmoid, [B, T, HV].
        scale: Query scale applied after the l2norm; defaults to K ** -0.5.
        initial_state: Optional [B, HV, K, V] state entering the first token
            (with segment_ids: entering the first segment of each row only).
        segment_ids: Optional int [B, T]. Wherever segment_ids[b, t] differs
            from segment_ids[b, t - 1] the state is reset to zero before token
            t is applied, so packed documents never see each other.
        use_qk_l2norm: L2-normalise q and k (in fp32, eps 1e-6) first.

    Returns:
        o: [B, T, HV, V] in v.dtype.
        final_state: fp32 [B, HV, K, V] after the last token.
    """
    out_dtype = v.dtype
    q, k, v, g, beta, state0, doc = prepare(
        q, k, v, g, beta, scale, initial_state, segment_ids, use_qk_l2norm)
    q, k = repeat_heads(q, v.shape[1]), repeat_heads(k, v.shape[1])
    reset = (doc != previous_doc(doc))[:, None, :]  # [B, 1, T], broadcast over heads

    def step(state, xs):
        q_t, k_t, v_t, g_t, beta_t, reset_t = xs
        state = jnp.where(reset_t[..., None, None], 0.0, state)
        state = state * jnp.exp(g_t)[..., None, None]
        kv_mem = einsum("bhkv,bhk->bhv", state, k_t)
        delta = (v_t - kv_mem) * beta_t[..., None]
        state = state + k_t[..., :, None] * delta[..., None, :]
        o_t = einsum("bhkv,bhk->bhv", state, q_t)
        return state, o_t

    time_major = lambda x: jnp.moveaxis(x, 2, 0)
    xs = tuple(time_major(x) for x in (q, k, v, g, beta, reset))
    final_state, o = jax.lax.scan(step, state0, xs)
    o = jnp.moveaxis(o, 0, 1)  # [T, B, HV, V] -> [B, T, HV, V]
    return o.astype(out_dtype), final_state
