"""The Gated DeltaNet (linear attention) token mixer of Qwen3.5."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.config import Qwen35Config
from qwenjax.model.cache import GatedDeltaNetCache
from qwenjax.model.layers import GatedRMSNorm, Linear
from qwenjax.ops.gated_delta_rule import gated_delta_rule
from qwenjax.ops.kernels import Kernels


class DepthwiseCausalConv1d(nnx.Module):
    """Causal depthwise conv1d with the checkpoint's [channels, 1, kernel] weight (no bias).

    out[t, c] = Σ_j w[c, j] · x[t - (K-1) + j, c], accumulated in fp32.
    """

    def __init__(self, channels: int, kernel: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        bound = kernel ** -0.5
        self.weight = nnx.Param(jax.random.uniform(rngs.params(), (channels, 1, kernel), param_dtype, -bound, bound),
                                logical_axes=("gdn_qkv", None, "conv_kernel"))

    def __call__(self, x: jax.Array, history: jax.Array | None = None, n_new: jax.Array | None = None,
                 documents: jax.Array | None = None, every_step: bool = False) -> tuple[jax.Array, jax.Array | None]:
        """x [B, T, C] -> (fp32 output [B, T, C], the window a continuation needs).

        `history` [B, K-1, C] holds the inputs before x (zeros at the start of a sequence). Given `n_new` [B]
        (real tokens per row; right padding after them), also returns each row's last K-1 real inputs; with
        `every_step`, the window after each new token instead, [B, T, K-1, C].
        `documents` [B, T] (packed rows, no history): a tap reads only inputs of the same document, so each
        document's convolution starts from zeros as if it ran alone.
        """
        w = self.weight[...][:, 0, :].astype(jnp.float32)
        k, (b, t, c) = w.shape[-1], x.shape
        if history is None:
            history = jnp.zeros((b, k - 1, c), x.dtype)
        xp = jnp.concatenate([history.astype(x.dtype), x], axis=1)
        xp32 = xp.astype(jnp.float32)
        if documents is None:
            out = sum(xp32[:, j:j + t, :] * w[:, j] for j in range(k))
        else:
            docs = jnp.concatenate([jnp.full((b, k - 1), -1, documents.dtype), documents], axis=1)
            out = sum(jnp.where((docs[:, j:j + t] == documents)[..., None], xp32[:, j:j + t, :], 0.0) * w[:, j]
                      for j in range(k))
        if every_step:
            return out, jnp.stack([xp[:, i + 1:i + k] for i in range(t)], axis=1)
        if n_new is None:
            return out, None
        window = jax.vmap(lambda row, n: jax.lax.dynamic_slice_in_dim(row, n, k - 1, axis=0))(xp, n_new)
        return out, window


class GatedDeltaNet(nnx.Module):
    def __init__(self, cfg: Qwen35Config, *, rngs: nnx.Rngs, kernels: Kernels, param_dtype=jnp.float32,
                 dtype=None):
        d = cfg.hidden_size
        self.cfg = cfg
        self.dtype = dtype
        self.kernels = kernels
        kw = dict(rngs=rngs, kernels=kernels, param_dtype=param_dtype, dtype=dtype)
        hv = cfg.linear_num_value_heads
        self.in_proj_qkv = Linear(d, cfg.linear_conv_dim, ("gdn_qkv", "embed"), **kw)
        self.in_proj_z = Linear(d, cfg.linear_value_dim, ("gdn_v", "embed"), **kw)
        self.in_proj_b = Linear(d, hv, ("gdn_heads", "embed"), **kw)
        self.in_proj_a = Linear(d, hv, ("gdn_heads", "embed"), **kw)
        self.conv1d = DepthwiseCausalConv1d(cfg.linear_conv_dim, cfg.linear_conv_kernel_dim, rngs=rngs,
                                            param_dtype=param_dtype)
        # The decay parameters stay fp32 whatever the model dtype (A = exp(A_log) is sensitive).
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (hv,), jnp.float32, 0.01, 16.0)),
                               logical_axes=("gdn_heads",))
        self.dt_bias = nnx.Param(jnp.ones((hv,), jnp.float32), logical_axes=("gdn_heads",))
        self.norm = GatedRMSNorm(cfg.linear_value_head_dim, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.out_proj = Linear(cfg.linear_value_dim, d, ("embed", "gdn_v"), **kw)

    def __call__(self, x: jax.Array, *, valid: jax.Array | None = None, documents: jax.Array | None = None,
                 cache: GatedDeltaNetCache | None = None,
                 step_states: bool = False) -> tuple[jax.Array, GatedDeltaNetCache | None]:
        """x [B, T, D] -> ([B, T, D], updated cache or None).

        `step_states` (with a cache; a speculative verify pass of a few tokens): the cache returned holds the
        conv window and recurrent state after each new token, [B, T, ...], so that the caller can keep those
        after any prefix (`qwenjax.model.cache.accept_steps`).

        `valid` [B, T] marks real tokens (right padding after them): padding tokens are zeroed and neither
        decay nor update the state, so the state and conv window a cache keeps are those after each row's
        last real token. `documents` [B, T] (packed rows): the conv window and the recurrent state restart
        wherever the document index changes.
        """
        cfg = self.cfg
        b, t, _ = x.shape
        if valid is not None:
            x = x * valid[..., None].astype(x.dtype)
        qkv = self.in_proj_qkv(x)
        z = self.in_proj_z(x).reshape(b, t, cfg.linear_num_value_heads, cfg.linear_value_head_dim)
        beta = jax.nn.sigmoid(self.in_proj_b(x).astype(jnp.float32))
        a = self.in_proj_a(x).astype(jnp.float32)
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a + self.dt_bias[...].astype(jnp.float32))

        if valid is not None:
            beta = jnp.where(valid[..., None], beta, 0.0)
            g = jnp.where(valid[..., None], g, 0.0)

        n_new = None
        if cache is not None:
            n_new = jnp.full((b,), t, jnp.int32) if valid is None else valid.sum(-1, dtype=jnp.int32)
        qkv, window = self.conv1d(qkv, None if cache is None else cache.conv, n_new, documents,
                                  every_step=step_states)
        qkv = jax.nn.silu(qkv).astype(x.dtype)
        kd = cfg.linear_key_dim
        q = qkv[..., :kd].reshape(b, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim)
        k = qkv[..., kd:2 * kd].reshape(b, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim)
        v = qkv[..., 2 * kd:].reshape(b, t, cfg.linear_num_value_heads, cfg.linear_value_head_dim)

        with jax.named_scope("gated_delta_rule"):
            o, state = gated_delta_rule(q, k, v, g, beta, segment_ids=documents,
                                        initial_state=None if cache is None else cache.state,
                                        implementation=self.kernels.gated_delta_rule, every_state=step_states)
        o = self.norm(o, z).reshape(b, t, cfg.linear_value_dim)
        new_cache = None if cache is None else GatedDeltaNetCache(conv=window, state=state)
        return self.out_proj(o), new_cache
