"""The Qwen3.5 causal language model: embedding → hybrid decoder layers → norm → LM head.

Attribute names follow the Hugging Face modules, so checkpoint keys map 1:1 (`model.layers.{i}.X` ↔
`layers[i].X`). Each layer's parameters are separate arrays: a decode step reads every weight in place, where a
slice of a stacked array would be copied first on CPU. A full-sequence forward (training, scoring) still compiles
once per *period* of `layer_types` (3 Gated DeltaNet layers, then 1 gated attention layer): it stacks the periods'
parameters inside the jitted function and runs them under `jax.lax.scan`.

Two entry points:
- `__call__`: logits for whole sequences (no cache), optionally rematerialised, and with `mtp=True` the
  multi-token-prediction head's logits beside them;
- `extend`: appends tokens to a `Cache` (prefill when the cache is fresh, a decode step for one token) and
  returns each row's next-token logits.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.config import FULL_ATTENTION, LINEAR_ATTENTION, Qwen35Config
from qwenjax.inputs import PackedVision, VisionInputs
from qwenjax.model.attention import Attention
from qwenjax.model.cache import AttentionCache, Cache, GatedDeltaNetCache
from qwenjax.model.gated_deltanet import GatedDeltaNet
from qwenjax.model.layers import MLP, Embed, Linear, RMSNorm, rope_cos_sin
from qwenjax.model.moe import RouterStats, SparseMoeBlock
from qwenjax.model.vision import VisionTower
from qwenjax.ops.kernels import Kernels, resolve_kernels
from qwenjax.ops.platform import platform_of
from qwenjax.sharding import constrain

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LayerInputs(NamedTuple):
    """What every layer of a forward pass shares, computed once."""
    cos: jax.Array                     # [B, T, rotary_dim]
    sin: jax.Array
    mask: jax.Array                    # attention: [B or 1, T, T] (self) or [B, T, max_len] (attend_cache)
    valid: jax.Array | None            # [B, T] real tokens (right padding after them); None: all real
    documents: jax.Array | None = None  # [B, T] document index of each token in packed rows
    write_index: jax.Array | None = None  # [B, T] cache slots of the new tokens
    attend_cache: bool = False         # attention reads the whole cache buffer (not only the new tokens)
    step_states: bool = False          # GDN layers keep their state after every new token (`verify`)


def _causal_mask(t: int, valid: jax.Array | None, documents: jax.Array | None = None) -> jax.Array:
    """[B or 1, T, T]: each token sees itself and the real tokens before it (of its own document)."""
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    if documents is not None:
        mask = mask & (documents[:, :, None] == documents[:, None, :])
    return mask if valid is None else mask & valid[:, None, :]


def documents_and_positions(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For packed rows [B, T]: a document index that grows at every change of segment id (so a reused id
    starts a new document, as in the gated delta rule), and each token's position within its document."""
    b, t = segment_ids.shape
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    documents = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
    index = jnp.arange(t, dtype=jnp.int32)
    first = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return documents, index - first


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen35Config, layer_type: str, *, rngs: nnx.Rngs, kernels: Kernels,
                 param_dtype=jnp.float32, dtype=None):
        kw = dict(rngs=rngs, kernels=kernels, param_dtype=param_dtype, dtype=dtype)
        self.is_linear = layer_type == LINEAR_ATTENTION
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(cfg, **kw)
        else:
            self.self_attn = Attention(cfg, **kw)
        self.is_moe = cfg.is_moe
        self.mlp = SparseMoeBlock(cfg, **kw) if cfg.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, inputs: LayerInputs,
                 cache: AttentionCache | GatedDeltaNetCache | None = None):
        """(x after the layer, the updated cache, the MoE routing's stats or None for a dense layer)."""
        h = self.input_layernorm(x)
        if self.is_linear:
            with jax.named_scope("gated_deltanet"):
                h, cache = self.linear_attn(h, valid=inputs.valid, documents=inputs.documents, cache=cache,
                                            step_states=inputs.step_states)
        else:
            with jax.named_scope("attention"):
                h, cache = self.self_attn(h, cos=inputs.cos, sin=inputs.sin, mask=inputs.mask, cache=cache,
                                          write_index=inputs.write_index, attend_cache=inputs.attend_cache)
        x = x + h
        h = self.post_attention_layernorm(x)
        stats = None
        if self.is_moe:
            with jax.named_scope("moe"):
                h, stats = self.mlp(h, inputs.valid)
        else:
            with jax.named_scope("mlp"):
                h = self.mlp(h)
        return constrain(x + h, ("batch", "seq", "act_embed")), cache, stats


class MultiTokenPrediction(nnx.Module):
    """The checkpoint's draft layer (`mtp.*`; vLLM's `qwen3_5_mtp.py`): from the embedding of token t+1 and the
    main model's final-normed hidden state at t, one full-attention decoder layer at position t predicts token
    t+2 through the shared LM head:

        u = fc([norm_e(embed(x[t+1])); norm_h(hidden[t])])  →  layer (own KV cache)  →  norm  →  lm_head

    With several layers (`mtp_num_hidden_layers`), draft step i uses layer i mod n, as vLLM does."""

    def __init__(self, cfg: Qwen35Config, *, rngs: nnx.Rngs, kernels: Kernels, param_dtype=jnp.float32,
                 dtype=None):
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.pre_fc_norm_embedding = RMSNorm(d, eps, param_dtype=param_dtype)
        self.pre_fc_norm_hidden = RMSNorm(d, eps, param_dtype=param_dtype)
        self.fc = Linear(2 * d, d, ("embed", None), rngs=rngs, kernels=kernels, param_dtype=param_dtype, dtype=dtype)
        self.layers = nnx.List([DecoderLayer(cfg, FULL_ATTENTION, rngs=rngs, kernels=kernels, param_dtype=param_dtype,
                                             dtype=dtype) for _ in range(cfg.mtp_num_hidden_layers)])
        self.norm = RMSNorm(d, eps, param_dtype=param_dtype)

    def __call__(self, embeds: jax.Array, hidden: jax.Array, inputs: LayerInputs, *, step: int = 0,
                 cache: AttentionCache | None = None) -> tuple[jax.Array, AttentionCache | None]:
        """(normed states [B, T, D] for the LM head, the layer's updated cache): embeds [B, T, D] of the tokens
        after those whose final-normed hidden states are `hidden` [B, T, D]; `inputs` at the hidden's positions."""
        u = self.fc(jnp.concatenate([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], axis=-1))
        x, cache, _ = self.layers[step % len(self.layers)](u, inputs, cache)
        return self.norm(x), cache


class Qwen35ForCausalLM(nnx.Module):
    def __init__(self, cfg: Qwen35Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None,
                 kernels: Kernels | None = None):
        """`kernels`: the ops' implementations, resolved here for the default backend unless already resolved
        (`from_pretrained` and `from_config` resolve them for the mesh's devices)."""
        self.config = cfg
        self.kernels = kernels if kernels is not None and kernels.resolved else resolve_kernels(
            kernels, platform_of())
        kw = dict(rngs=rngs, kernels=self.kernels, param_dtype=param_dtype, dtype=dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.layers = nnx.List([DecoderLayer(cfg, t, **kw) for t in cfg.layer_types])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, ("vocab", "embed"), **kw)
        self.visual = None if cfg.vision is None else VisionTower(cfg.vision, **kw)
        self.mtp = MultiTokenPrediction(cfg, **kw) if cfg.mtp_num_hidden_layers else None

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and LM head."""
        return self.head(self.norm(x))

    def head(self, x: jax.Array) -> jax.Array:
        """The LM head (tied to the embedding when the config says so) on normed states."""
        with jax.named_scope("lm_head"):
            return self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)

    def head_weight(self) -> jax.Array:
        """The LM head's weight [vocab, D] (the embedding when tied)."""
        return (self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)[...]

    def embed(self, input_ids: jax.Array, vision: VisionInputs | PackedVision | None = None) -> jax.Array:
        """Token embeddings [B, T, D]; with `vision`, each image (video) pad token's embedding replaced by the
        next vision feature, in order (the caller has checked that the counts match)."""
        with jax.named_scope("embedding"):
            x = self.embed_tokens(input_ids)
            if vision is None:
                return constrain(x, ("batch", "seq", "act_embed"))
            if self.visual is None:
                raise ValueError("images or videos given to a text-only model (its config has no vision_config)")
            cfg = self.config
            if isinstance(vision, PackedVision):  # training: images and videos together, in token order
                parts = [(vision.pixel_values, dict(layout=vision.layout),
                          (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id))]
            else:
                parts = [(pixels, dict(grid_thw=grid), input_ids == token_id) for pixels, grid, token_id in (
                    (vision.pixel_values, vision.image_grid_thw, cfg.image_token_id),
                    (vision.pixel_values_videos, vision.video_grid_thw, cfg.video_token_id)) if pixels is not None]
            for pixels, where, is_pad in parts:
                with jax.named_scope("vision"):
                    features = self.visual(pixels, **where).astype(x.dtype)
                x = _scatter_features(x, is_pad, features)
            return constrain(x, ("batch", "seq", "act_embed"))

    def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, positions: jax.Array | None = None, remat: str = "none",
                 logits_to_keep: int = 0, scan_layers: bool = True, router_stats: bool = False,
                 vision: VisionInputs | PackedVision | None = None, mtp: bool = False):
        """Logits [B, T, vocab] for input_ids [B, T]. With `mtp`, also the MTP head's logits [B, T-1, vocab]
        (position t: its prediction of token t+2); with `router_stats`, also the `RouterStats` summed over the
        main model's layers for an MoE model's auxiliary losses (`qwenjax.train.loss.load_balancing_loss`).
        Returns logits alone, or the tuple (logits, [mtp logits,] [stats]).

        Args:
          attention_mask: [B, T], 1 for real tokens and 0 for padding (right padding).
          segment_ids: [B, T] packed rows: consecutive tokens with one id form a document, and documents never
            see each other: attention is block-diagonal, positions restart, and the GDN conv window and
            recurrent state reset at every change of id.
          positions: [B, T] or [3, B, T] rotary positions; default 0..T-1 for every row (for every document
            of a packed row).
          remat: rematerialisation policy of the scanned periods: "none", "full" or "dots".
          logits_to_keep: if > 0, logits for the last `logits_to_keep` positions only.
          scan_layers: scan over periods of `layer_types` (fast compile) or unroll every layer.
          vision: images and videos whose features replace their pad tokens' embeddings; `positions` must then
            be the multimodal ones (`qwenjax.model.positions.multimodal_positions`).
          mtp: run the MTP head too (the model must have one); `logits_to_keep` does not apply to it.
        """
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}: choose one of {sorted(REMAT_POLICIES)}")
        b, t = input_ids.shape
        valid = None if attention_mask is None else attention_mask.astype(bool)
        documents = None
        if segment_ids is not None:
            documents, doc_positions = documents_and_positions(segment_ids)
            positions = doc_positions if positions is None else positions
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_cos_sin(self.config, positions)
        inputs = LayerInputs(cos=cos, sin=sin, mask=_causal_mask(t, valid, documents), valid=valid,
                             documents=documents)

        if router_stats and not self.config.is_moe:
            raise ValueError("router_stats=True: this is a dense model (config has num_experts = 0)")
        if mtp and self.mtp is None:
            raise ValueError(NO_MTP)
        embeds = self.embed(input_ids, vision)
        x, stats = (self._scan_periods if scan_layers else self._unrolled)(embeds, inputs, remat)
        hidden = self.norm(x)
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        outputs = (constrain(self.head(kept), ("batch", "seq", "vocab")),)
        if mtp:
            # row p: token p+1's embedding, hidden state p, position p, p's document (a row whose p+1 starts
            # the next document is seen by no other row: its loss is masked by the caller)
            shifted = LayerInputs(cos=cos[:, :-1], sin=sin[:, :-1], valid=None if valid is None else valid[:, 1:],
                                  documents=None if documents is None else documents[:, :-1],
                                  mask=_causal_mask(t - 1, None if valid is None else valid[:, 1:],
                                                    None if documents is None else documents[:, :-1]))
            h, _ = self.mtp(embeds[:, 1:], hidden[:, :-1], shifted)
            outputs += (constrain(self.head(h), ("batch", "seq", "vocab")),)
        if router_stats:
            outputs += (stats,)
        return outputs[0] if len(outputs) == 1 else outputs

    def _zero_stats(self) -> RouterStats | None:
        if not self.config.is_moe:
            return None
        e = self.config.num_experts
        return RouterStats(jnp.zeros((e,)), jnp.zeros((e,)), jnp.zeros(()), jnp.zeros(()))

    def _unrolled(self, x, inputs, remat):
        policy = REMAT_POLICIES[remat]
        total = self._zero_stats()
        for layer in self.layers:
            run = (lambda h, layer=layer: _drop_cache(layer(h, inputs)))
            x, stats = run(x) if policy is None else jax.checkpoint(run, policy=policy)(x)
            total = None if stats is None else total + stats
        return x, total

    def _scan_periods(self, x, inputs, remat):
        period = len(self.config.block_pattern)
        layers = list(self.layers)
        graphdef, _ = nnx.split(nnx.List(layers[:period]))
        periods = [nnx.state(nnx.List(layers[i:i + period])) for i in range(0, len(layers), period)]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *periods)

        def body(carry, period_state):
            h, total = carry
            for layer in nnx.merge(graphdef, period_state):
                h, stats = _drop_cache(layer(h, inputs))
                total = None if stats is None else total + stats
            return (h, total), None

        if REMAT_POLICIES[remat] is not None:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
        return jax.lax.scan(body, (x, self._zero_stats()), stacked)[0]

    def extend(self, input_ids: jax.Array, cache: Cache, *, attention_mask: jax.Array | None = None,
               fresh: bool = False, vision: VisionInputs | None = None, positions: jax.Array | None = None,
               rope_deltas: jax.Array | None = None, return_hidden: bool = False):
        """Appends input_ids [B, T] to each row of `cache`; returns (logits [B, vocab] of each row's last new
        token, the updated cache), and with `return_hidden` also what the MTP head reads of the new tokens: their
        final-normed hidden states [B, T, D] and their input embeddings [B, T, D] (image and video pads holding
        their vision features, which `embed` of the ids alone would not give).

        Args:
          attention_mask: [B, T], 1 for the tokens to append, 0 for right padding (rows may append different
            numbers of tokens, including none). Default: all T tokens of every row.
          fresh: the caller promises the cache is empty: attention then runs over the new tokens only (causal),
            not over the whole buffer. A prefill sets it; a decode step does not.
          vision, positions, rope_deltas: a prefill with images or videos: their features, the multimodal
            [3, B, T] positions and each row's rope delta (`multimodal_positions`), which the cache keeps so that
            decode steps continue from the right position. Default: text positions, continuing each row.
        The caller checks that every row fits: lengths + T <= cache.max_len (slots past the buffer are dropped).
        """
        b, t = input_ids.shape
        valid = None if attention_mask is None else attention_mask.astype(bool)
        n_new = jnp.full((b,), t, jnp.int32) if valid is None else valid.sum(-1, dtype=jnp.int32)
        slots = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)  # where the new tokens go in the cache
        if positions is None:
            positions = slots + cache.rope_deltas[:, None]
        cos, sin = rope_cos_sin(self.config, positions)
        if fresh:
            mask = _causal_mask(t, valid)
        else:
            mask = jnp.arange(cache.max_len)[None, None, :] <= slots[:, :, None]
        inputs = LayerInputs(cos=cos, sin=sin, mask=mask, valid=valid, write_index=slots,
                             attend_cache=not fresh)

        embeds = self.embed(input_ids, vision)
        x, new_layers = self._through_layers(embeds, inputs, cache)
        hidden = self.norm(x)
        last = jnp.take_along_axis(hidden, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)  # [B, 1, D]
        cache = dataclasses.replace(cache, layers=new_layers, lengths=cache.lengths + n_new,
                                    rope_deltas=cache.rope_deltas if rope_deltas is None else rope_deltas)
        return (self.head(last)[:, 0], cache) + ((hidden, embeds) if return_hidden else ())

    def mtp_extend(self, embeds: jax.Array, hidden: jax.Array, cache: Cache, start: jax.Array, *,
                   positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
                   step: int = 0) -> tuple[jax.Array, Cache]:
        """Runs the MTP head over rows start .. start+T-1 of each batch row: row p reads the input embedding of
        token p+1 (`embeds` [B, T, D]: `embed` of the token, or a prompt's embeddings from `extend`, whose image
        and video pads hold their vision features, as in training) and the hidden state of token p (`hidden`
        [B, T, D]: the main model's final-normed one, or for a draft step the head's own previous output), at
        token p's position, attending to the head's cache rows up to p. Returns (the normed output [B, D] of
        each row's last real row: through the LM head its prediction of token p+2, and what the next draft step
        reads; the cache with the rows written to `cache.mtp`).

        Args:
          positions: [B, T] or [3, B, T] rotary positions of the rows: a multimodal prompt's own (`extend`'s);
            default the text positions, start + i + cache.rope_deltas, where decoding continues.
          attention_mask: [B, T], 1 for real rows (right padding).
          step: the draft step, which picks the head's layer.
        """
        b, t = embeds.shape[:2]
        valid = None if attention_mask is None else attention_mask.astype(bool)
        n_new = jnp.full((b,), t, jnp.int32) if valid is None else valid.sum(-1, dtype=jnp.int32)
        inputs = self._inputs_after(cache, start, t, positions=positions, valid=valid)
        out, mtp_cache = self.mtp(embeds, hidden, inputs, step=step, cache=cache.mtp)
        last = jnp.take_along_axis(out, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]  # [B, D]
        return last, dataclasses.replace(cache, mtp=mtp_cache)

    def verify(self, input_ids: jax.Array, cache: Cache, *,
               every_state: bool = True) -> tuple[jax.Array, jax.Array, Cache]:
        """A speculative verify pass: input_ids [B, T] (the last sampled token and T-1 drafts) after each row of
        `cache`. Returns (logits [B, T, vocab] at every new token, their final-normed hidden states [B, T, D],
        the cache with every token written and each GDN layer's window and state after each token, lengths not
        yet advanced): `qwenjax.model.cache.accept_steps` keeps each row's accepted prefix. Without
        `every_state` the GDN layers keep only their final state (for a caller that recomputes the prefix)."""
        inputs = self._inputs_after(cache, cache.lengths, input_ids.shape[1], valid=None, step_states=every_state)
        x, new_layers = self._through_layers(self.embed(input_ids), inputs, cache)
        hidden = self.norm(x)
        return self.head(hidden), hidden, dataclasses.replace(cache, layers=new_layers)

    def _inputs_after(self, cache: Cache, start: jax.Array, t: int, positions: jax.Array | None = None,
                      **kw) -> LayerInputs:
        """LayerInputs for t new tokens written at cache slots start[r] .. of each row, at `positions` (default
        their text positions, slots + cache.rope_deltas), each attending to the buffer up to itself."""
        slots = start[:, None] + jnp.arange(t, dtype=jnp.int32)
        cos, sin = rope_cos_sin(self.config, slots + cache.rope_deltas[:, None] if positions is None else positions)
        return LayerInputs(cos=cos, sin=sin, mask=jnp.arange(cache.max_len)[None, None, :] <= slots[:, :, None],
                           write_index=slots, attend_cache=True, **kw)

    def _through_layers(self, x: jax.Array, inputs: LayerInputs, cache: Cache):
        """x through every decoder layer with its cache: (x, the layers' updated caches)."""
        new_layers = []
        for layer, layer_cache in zip(self.layers, cache.layers):
            x, layer_cache, _ = layer(x, inputs, layer_cache)
            new_layers.append(layer_cache)
        return x, tuple(new_layers)


NO_MTP = ("this model has no MTP head: its config has mtp_num_hidden_layers = 0 or its checkpoint no mtp.* "
          "tensors (transformers' save_pretrained drops them)")


def _scatter_features(x: jax.Array, is_pad: jax.Array, features: jax.Array) -> jax.Array:
    """x [B, T, D] with its k-th pad position (row-major) holding features[k]."""
    order = jnp.cumsum(is_pad.reshape(-1)) - 1
    taken = features[jnp.clip(order, 0, features.shape[0] - 1)].reshape(x.shape)
    return jnp.where(is_pad[..., None], taken, x)


def _drop_cache(out):
    x, _, stats = out
    return x, stats
