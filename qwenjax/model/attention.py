"""Gated full attention of Qwen3.5: q/gate from one projection, zero-centred q/k norms, partial mRoPE, GQA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.config import Qwen35Config
from qwenjax.model.cache import AttentionCache
from qwenjax.model.layers import Linear, RMSNorm, apply_rope
from qwenjax.ops.attention import dot_product_attention
from qwenjax.ops.kernels import Kernels


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen35Config, *, rngs: nnx.Rngs, kernels: Kernels, param_dtype=jnp.float32,
                 dtype=None):
        d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        kw = dict(rngs=rngs, kernels=kernels, param_dtype=param_dtype, dtype=dtype, use_bias=cfg.attention_bias)
        # q_proj rows are per head [query (hd) | gate (hd)], i.e. query and gate interleaved head by head.
        self.q_proj = Linear(d, h * hd * 2, ("q_heads", "embed"), **kw)
        self.k_proj = Linear(d, kv * hd, ("kv_heads", "embed"), **kw)
        self.v_proj = Linear(d, kv * hd, ("kv_heads", "embed"), **kw)
        self.o_proj = Linear(h * hd, d, ("embed", "q_heads"), **kw)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype, axes=("head_dim",))
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype, axes=("head_dim",))

    def __call__(self, x: jax.Array, *, cos: jax.Array, sin: jax.Array, mask: jax.Array | None,
                 cache: AttentionCache | None = None, write_index: jax.Array | None = None,
                 attend_cache: bool = False) -> tuple[jax.Array, AttentionCache | None]:
        """x [B, T, D] -> ([B, T, D], updated cache or None); cos/sin [B, T, rotary_dim].

        Without `attend_cache`, x attends to itself: mask [B, T, T] (True = may attend) lies within causal.
        With a cache, the new keys/values are written at `write_index` [B, T] (indices past the buffer are
        dropped); with `attend_cache`, queries attend to the whole buffer under mask [B, T, max_len].
        """
        b, t, _ = x.shape
        h, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qg = self.q_proj(x).reshape(b, t, h, 2 * hd)
        q, gate = qg[..., :hd], qg[..., hd:].reshape(b, t, h * hd)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(self.k_proj(x).reshape(b, t, kv, hd)), cos, sin)
        v = self.v_proj(x).reshape(b, t, kv, hd)
        new_cache = None
        if cache is not None:
            new_cache = cache.write(write_index, k, v)
            if attend_cache:
                k, v = (x.astype(k.dtype) for x in new_cache.read())
        with jax.named_scope("dot_product_attention"):
            o = dot_product_attention(q, k, v, mask, scale=hd ** -0.5, causal=not attend_cache,
                                      kv_heads_first=attend_cache)
        return self.o_proj(o.reshape(b, t, h * hd) * jax.nn.sigmoid(gate)), new_cache
