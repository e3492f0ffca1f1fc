"""The Qwen3.5-MoE feed-forward block: top-k routed SwiGLU experts plus a gated shared expert.

Attribute names follow transformers' `Qwen3_5MoeSparseMoeBlock` (`gate`, `experts.gate_up_proj`,
`experts.down_proj`, `shared_expert`, `shared_expert_gate`), with the experts' weights stacked as its fused
layout stores them: gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj [E, H, I]. Checkpoints with
one tensor per expert are stacked on load and split again on export (`qwenjax.checkpoint.hf`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.config import Qwen35Config
from qwenjax.model.layers import MLP, Linear, normal_init
from qwenjax.ops.kernels import Kernels
from qwenjax.ops.moe import Routing, moe_experts, route


class RouterStats(NamedTuple):
    """Sums over the routed tokens (and over layers, when added up) that the auxiliary losses need."""
    counts: jax.Array    # [E] top-k selections of each expert
    probs: jax.Array     # [E] router probabilities of each expert
    z: jax.Array         # [] logsumexp(router logits)²
    tokens: jax.Array    # [] tokens counted (each layer counts its tokens again)

    @staticmethod
    def of(logits: jax.Array, experts: jax.Array, valid: jax.Array | None = None) -> "RouterStats":
        """Stats of one layer's routing of N tokens: router logits [N, E], chosen experts [N, k]; `valid` [N]
        leaves padding out."""
        n, e = logits.shape
        logits = logits.astype(jnp.float32)
        w = jnp.ones((n,), jnp.float32) if valid is None else valid.astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        counts = jnp.bincount(experts.reshape(-1), weights=jnp.repeat(w, experts.shape[1]), length=e)
        z = jax.nn.logsumexp(logits, axis=-1) ** 2
        return RouterStats(counts, jnp.sum(probs * w[:, None], axis=0), jnp.sum(z * w), jnp.sum(w))

    def __add__(self, other: "RouterStats") -> "RouterStats":
        return RouterStats(*(a + b for a, b in zip(self, other)))


class TopKRouter(nnx.Module):
    def __init__(self, cfg: Qwen35Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        # every token needs every expert's logit: the router is replicated over the expert axis
        self.weight = nnx.Param(normal_init()(rngs.params(), (cfg.num_experts, cfg.hidden_size), param_dtype),
                                logical_axes=(None, "embed"))
        self.top_k = cfg.num_experts_per_tok
        self.normalize = cfg.norm_topk_prob

    def __call__(self, x: jax.Array) -> Routing:
        return route(x, self.weight[...], self.top_k, self.normalize)


class Experts(nnx.Module):
    def __init__(self, cfg: Qwen35Config, *, rngs: nnx.Rngs, kernels: Kernels, param_dtype=jnp.float32,
                 dtype=None):
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        init = normal_init()
        # The fused gate|up rows stay whole on a device (a split would part gate from up): "expert_mlp".
        self.gate_up_proj = nnx.Param(init(rngs.params(), (e, 2 * i, h), param_dtype),
                                      logical_axes=("experts", "expert_mlp", "embed"))
        self.down_proj = nnx.Param(init(rngs.params(), (e, h, i), param_dtype),
                                   logical_axes=("experts", "embed", "expert_mlp"))
        self.dtype = dtype
        self.kernels = kernels

    def __call__(self, x: jax.Array, routing: Routing) -> jax.Array:
        dtype = self.dtype or x.dtype
        with jax.named_scope("moe_dispatch"):
            return moe_experts(x.astype(dtype), routing, self.gate_up_proj[...].astype(dtype),
                               self.down_proj[...].astype(dtype), implementation=self.kernels.grouped_matmul,
                               expert_parallel=self.kernels.expert_parallel)


class SparseMoeBlock(nnx.Module):
    """y = Σ_topk w_e · expert_e(x) + sigmoid(shared_expert_gate(x)) · shared_expert(x)."""

    def __init__(self, cfg: Qwen35Config, *, rngs: nnx.Rngs, kernels: Kernels, param_dtype=jnp.float32,
                 dtype=None):
        kw = dict(rngs=rngs, kernels=kernels, param_dtype=param_dtype, dtype=dtype)
        self.gate = TopKRouter(cfg, rngs=rngs, param_dtype=param_dtype)
        self.experts = Experts(cfg, **kw)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, **kw)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, (None, "embed"), **kw)

    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, RouterStats]:
        """x [B, T, H] → (y [B, T, H], the routing's stats over the tokens `valid` [B, T] marks real)."""
        b, t, h = x.shape
        flat = x.reshape(b * t, h)
        routing = self.gate(flat)
        routed = self.experts(flat, routing)
        shared = self.shared_expert(flat).astype(jnp.float32)
        shared_gate = jax.nn.sigmoid(self.shared_expert_gate(flat).astype(jnp.float32))
        y = (routed + shared_gate * shared).astype(x.dtype).reshape(b, t, h)
        return y, RouterStats.of(routing.logits, routing.experts, None if valid is None else valid.reshape(-1))
