"""Grouped-query softmax attention as the model calls it: the dispatch point for attention implementations.

Only the XLA path exists (`pallas_kernels/attention/xla.py`); a Pallas flash/splash kernel joins the table
without touching the model.
"""

from __future__ import annotations

import jax

from pallas_kernels.attention.xla import attention_xla

IMPLEMENTATIONS = {"xla": attention_xla}


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float, *,
                          causal: bool = False, kv_heads_first: bool = False, implementation: str = "xla") -> jax.Array:
    """softmax(q·kᵀ·scale, masked)·v for q [B, T, H, D], k/v [B, S, KV, D] (or [B, KV, S, D] with
    `kv_heads_first`: a cache's); see `attention_xla`."""
    return IMPLEMENTATIONS[implementation](q, k, v, mask, scale, causal=causal, kv_heads_first=kv_heads_first)
