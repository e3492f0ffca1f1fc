"""The Qwen3.5 causal language model: embedding → scanned hybrid blocks → norm → LM head.

`layer_types` repeats a short block (3 Gated DeltaNet layers, then 1 gated attention layer); the block's
parameters are stacked along a leading axis and the blocks run under `jax.lax.scan`, so a 64-layer model
compiles as fast as a 4-layer one. Attribute names follow the Hugging Face modules so checkpoint keys map 1:1:
`model.layers.{b * P + j}.X` ↔ `blocks.layers[j].X[b]` for block pattern length P.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.config import LINEAR_ATTENTION, Qwen35Config
from qwenjax.model.attention import Attention
from qwenjax.model.gated_deltanet import GatedDeltaNet
from qwenjax.model.layers import MLP, Embed, Linear, RMSNorm, rope_cos_sin
from qwenjax.sharding import constrain

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LayerInputs(NamedTuple):
    """What every layer of a forward pass shares, computed once."""
    cos: jax.Array                 # [B, T, rotary_dim]
    sin: jax.Array
    mask: jax.Array                # [B or 1, T, T] boolean, attention layers
    valid: jax.Array | None        # [B, T] boolean, GDN layers zero padding tokens


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen35Config, layer_type: str, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.is_linear = layer_type == LINEAR_ATTENTION
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(cfg, **kw)
        else:
            self.self_attn = Attention(cfg, **kw)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, inputs: LayerInputs) -> jax.Array:
        h = self.input_layernorm(x)
        if self.is_linear:
            h = self.linear_attn(h, valid=inputs.valid)
        else:
            h = self.self_attn(h, cos=inputs.cos, sin=inputs.sin, mask=inputs.mask)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "seq", "act_embed"))


class DecoderBlock(nnx.Module):
    """One period of `layer_types` (Qwen3.5: linear, linear, linear, full)."""

    def __init__(self, cfg: Qwen35Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        self.layers = nnx.List([DecoderLayer(cfg, t, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
                                for t in cfg.block_pattern])

    def __call__(self, x: jax.Array, inputs: LayerInputs) -> jax.Array:
        for layer in self.layers:
            x = layer(x, inputs)
        return x


def stack_modules(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """`n` independently initialised copies of a module, as one module whose parameters have a leading axis n."""
    keys = jax.random.split(rngs.params(), n)
    graphdef = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))[0]
    states = jax.vmap(lambda k: nnx.state(make(nnx.Rngs(k))))(keys)
    return nnx.merge(graphdef, states)


class Qwen35ForCausalLM(nnx.Module):
    def __init__(self, cfg: Qwen35Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        if cfg.is_moe:
            raise NotImplementedError("Qwen3.5-MoE models are not implemented yet (config has num_experts > 0)")
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.blocks = stack_modules(
            lambda r: DecoderBlock(cfg, rngs=r, param_dtype=param_dtype, dtype=dtype), cfg.num_blocks, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, ("vocab", "embed"), rngs=rngs, param_dtype=param_dtype, dtype=dtype)

    def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, remat: str = "none", logits_to_keep: int = 0) -> jax.Array:
        """Logits [B, T, vocab] for input_ids [B, T].

        Args:
          attention_mask: [B, T], 1 for real tokens and 0 for padding (right padding).
          positions: [B, T] or [3, B, T] rotary positions; default 0..T-1 for every row.
          remat: rematerialisation policy of the scanned blocks: "none", "full" or "dots".
          logits_to_keep: if > 0, logits for the last `logits_to_keep` positions only (prefill needs one).
        """
        b, t = input_ids.shape
        valid = None if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_cos_sin(self.config, positions)
        mask = jnp.tril(jnp.ones((t, t), bool))[None]
        if valid is not None:
            mask = mask & valid[:, None, :]
        inputs = LayerInputs(cos=cos, sin=sin, mask=mask, valid=valid)

        x = constrain(self.embed_tokens(input_ids), ("batch", "seq", "act_embed"))
        graphdef, stacked = nnx.split(self.blocks)

        def body(h, block_state):
            return nnx.merge(graphdef, block_state)(h, inputs), None

        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}: choose one of {sorted(REMAT_POLICIES)}")
        if REMAT_POLICIES[remat] is not None:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
        x, _ = jax.lax.scan(body, x, stacked)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return constrain(logits, ("batch", "seq", "vocab"))
