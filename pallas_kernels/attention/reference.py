"""The oracle of grouped-query softmax attention: key/value heads repeated for their query heads, fp32 at
HIGHEST precision, one dense masked softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["attention_reference"]


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                        scale: float) -> jax.Array:
    """softmax(q·kᵀ·scale, masked)·v for q [B, T, H, D], k/v [B, S, KV, D] (query head h reads kv head
    h // (H // KV)), mask [B or 1, T, S] (True = may attend) or None; [B, T, H, D] fp32. A fully masked row
    averages every value, as a large finite mask value does."""
    f32, hi = jnp.float32, jax.lax.Precision.HIGHEST
    group = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x.astype(f32), group, axis=2) for x in (k, v))
    s = jnp.einsum("bthd,bshd->bhts", q.astype(f32), k, precision=hi) * scale
    if mask is not None:
        s = jnp.where(mask[:, None], s, jnp.finfo(f32).min)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v, precision=hi)
