"""Speculative decoding with the checkpoint's own MTP head as the draft model (vLLM's scheme for Qwen3.5).

    prefill ─▶ first token; the MTP head over the prompt's rows ─▶ k drafts
    step:  verify [pending token, k drafts] in one main-model pass ─▶ keep the agreeing prefix + one token of
           the main model's own ─▶ the MTP head over the kept rows (true hidden states) ─▶ k new drafts

The MTP head's row p reads token p+1 and the hidden state of token p and predicts token p+2; its later draft
steps feed back its own output in place of the main model's hidden state. Over a prompt with images or videos
it reads what training gave it (vLLM too): the embeddings after the vision features' scatter, at the multimodal
positions; its draft rows and the decoding continue at text positions plus the prompt's rope delta, as plain
decoding does. After a verify pass every GDN layer holds its state after each verified token, so keeping a prefix
is a selection (`accept_steps`), not a second pass; attention buffers and the head's own buffer roll back by
length.

Greedy: a draft is kept while it equals the main model's argmax, so the output is plain greedy decoding's.
Sampling: rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft d ~ q is kept with probability
min(1, p(d)/q(d)); at the first rejection the token is drawn from max(p - q, 0) normalised, and after k kept
drafts from p. Each token then has the distribution plain sampling gives, p being the main model's filtered
distribution (temperature, top-k, top-p, min-p) and q the head's, filtered alike.

Logit controls (logit bias, min_tokens, penalties: `sampling.adjust_logits`) apply to the main model's logits
only, at each verified position as plain decoding would apply them there: position j counts the drafts before it
as generated. The drafts are proposals and need none: greedy keeps a draft only where it is the adjusted argmax,
and rejection sampling is exact for any draft distribution q.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp

from qwenjax.inference.sampling import (ADJUSTMENTS, RowSampling, SamplingParams, TokenHistory, adjust_logits, argmax,
                                        filter_logits, token_logprobs)
from qwenjax.inputs import VisionInputs
from qwenjax.model.cache import Cache, accept_steps
from qwenjax.ops.matmul import matmul_wt


@dataclasses.dataclass
class SpeculativeStats:
    """Counts over a generation, rows that were still generating only: `steps` verify passes per row,
    `drafted` draft tokens offered, `accepted` kept."""
    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Drafts kept per verify pass (each pass also gives one token of the main model's own)."""
        return self.accepted / self.steps if self.steps else 0.0

    def __str__(self) -> str:
        return (f"speculative: {self.accepted}/{self.drafted} drafts accepted ({self.acceptance_rate:.0%}), "
                f"{self.mean_accepted + 1:.2f} tokens per verify pass")


def _probs(logits: jax.Array, sampling: SamplingParams | RowSampling) -> jax.Array:
    return jax.nn.softmax(filter_logits(logits, sampling), axis=-1)


# Sampling settings are one SamplingParams for the batch (`generate`) or a RowSampling (a server's rows, greedy
# and sampled mixed), and the key one key for the batch or [B] keys, one per row (a seeded request draws the same
# however it is batched). These few helpers take either.

def _all_greedy(sampling: SamplingParams | RowSampling) -> bool:
    return sampling.greedy if isinstance(sampling, SamplingParams) else "sample" not in sampling.used


def _sampled_rows(sampling: SamplingParams | RowSampling):
    """Which rows sample (True for a whole batch, [B] bool per row): the others take the greedy rule."""
    return True if isinstance(sampling, SamplingParams) else sampling.temperature > 0


def _fold_in(key: jax.Array, i) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, i) if key.ndim else jax.random.fold_in(key, i)


def _categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw from each row of logits [B, V] (int32)."""
    drawn = jax.vmap(jax.random.categorical)(key, logits) if key.ndim else jax.random.categorical(key, logits)
    return drawn.astype(jnp.int32)


def _uniform(key: jax.Array, b: int, k: int) -> jax.Array:
    return jax.vmap(lambda kk: jax.random.uniform(kk, (k,)))(key) if key.ndim else jax.random.uniform(key, (b, k))


def _controls(sampling: SamplingParams | RowSampling, adjust: RowSampling | None) -> RowSampling | None:
    """The rows' logit controls: `adjust`, else a RowSampling's own; None when no row uses any."""
    adjust = sampling if adjust is None and isinstance(sampling, RowSampling) else adjust
    return adjust if adjust is not None and adjust.used & set(ADJUSTMENTS) else None


def _sample(logits: jax.Array, key: jax.Array, sampling: SamplingParams | RowSampling) -> jax.Array:
    greedy = argmax(logits)
    if _all_greedy(sampling):
        return greedy
    return jnp.where(_sampled_rows(sampling), _categorical(key, filter_logits(logits, sampling)), greedy)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftVocab:
    """The tokens the MTP head may draft: ids [N] (distinct) and their rows of the LM head [N, D].

    A draft step's LM head reads the whole vocabulary: at the 0.8B shape 254M weights, a third of what a decode
    step reads. Drafting from the N most frequent tokens reads N rows instead. Output stays exact: a draft only
    proposes (greedy keeps it only if it is the main model's argmax), and with sampling the head's distribution q
    is simply 0 outside the N tokens, which rejection sampling allows (SGLang's `--speculative-token-map`,
    FR-Spec)."""
    ids: jax.Array
    weight: jax.Array

    @classmethod
    def of(cls, mod, ids: jax.Array) -> DraftVocab:
        return cls(ids=ids, weight=mod.head_weight()[ids])


def frequent_tokens(tokenizer, texts, size: int) -> list[int]:
    """The `size` token ids most frequent in `texts` (ties: the lower id), sorted: a `draft_vocab`."""
    counts = collections.Counter()
    for text in texts:
        counts.update(tokenizer.encode(text))
    return sorted(t for t, _ in sorted(counts.items(), key=lambda tc: (-tc[1], tc[0]))[:size])


def _draft_logits(mod, h: jax.Array, vocab: DraftVocab | None) -> jax.Array:
    if vocab is None:
        return mod.head(h)
    with jax.named_scope("draft_lm_head"):
        return matmul_wt(h, vocab.weight.astype(h.dtype), implementation=mod.kernels.cpu_matvec).astype(h.dtype)


def draft(mod, cache: Cache, embeds: jax.Array, hidden: jax.Array, start: jax.Array, mask: jax.Array | None,
          k: int, sampling: SamplingParams | RowSampling, key: jax.Array, positions: jax.Array | None = None,
          vocab: DraftVocab | None = None):
    """The MTP head over rows start .. (real rows of `embeds`/`hidden`, at `positions`: see `mtp_extend`), then
    k-1 draft steps on its own output: (drafts [B, k] int32, their draft distributions [B, k, V] (None when
    every row is greedy), the cache). `vocab`: the tokens it may draft (default all)."""
    n_rows = embeds.shape[1] if mask is None else mask.sum(-1, dtype=jnp.int32)
    drafts, dists = [], []
    h, cache = mod.mtp_extend(embeds, hidden, cache, start, positions=positions, attention_mask=mask, step=0)
    for i in range(k):
        if i:
            h, cache = mod.mtp_extend(mod.embed(drafts[-1][:, None]), h[:, None], cache, start + n_rows + i - 1,
                                      step=i)
        logits = _draft_logits(mod, h, vocab)
        if _all_greedy(sampling):
            d = argmax(logits)
        else:
            q = _probs(logits, sampling)
            d = jnp.where(_sampled_rows(sampling), _categorical(_fold_in(key, i), jnp.log(q)), argmax(logits))
            if vocab is not None:  # q over the whole vocabulary: 0 outside the draft vocabulary
                q = jnp.zeros((q.shape[0], mod.config.vocab_size), q.dtype).at[:, vocab.ids].set(q)
            dists.append(q)
        drafts.append((d if vocab is None else vocab.ids[d]).astype(jnp.int32))
    return jnp.stack(drafts, axis=1), (jnp.stack(dists, axis=1) if dists else None), cache


def prefill(mod, cache: Cache, ids: jax.Array, mask: jax.Array, key: jax.Array, k: int,
            sampling: SamplingParams | RowSampling, *, fresh: bool = True, next_ids: jax.Array | None = None,
            vision: VisionInputs | None = None, positions: jax.Array | None = None,
            rope_deltas: jax.Array | None = None, vocab: DraftVocab | None = None, top: int | None = None,
            adjust: RowSampling | None = None, history: TokenHistory | None = None, produced=None):
    """The prompt into the main model and the MTP head: (first token [B], drafts [B, k], their distributions,
    the cache), with `top` also the first token's `token_logprobs`. `vision`, `positions`, `rope_deltas`: a
    prompt's images or videos, as `extend` takes them; `vocab`: the tokens the head may draft (default all).
    `adjust`, `history`, `produced`: the rows' logit controls, as `sampling.adjust_logits` takes them (`adjust`
    defaults to a RowSampling `sampling`'s own).

    A server prefills a long prompt in chunks: `fresh=False` appends `ids` to each row (the head's rows then
    start one earlier, at the row's last token, whose hidden state the cache kept), and `next_ids` [B] (the
    prompt's token after the chunk) ends a chunk the prompt goes on past: the head's last row reads it, and
    nothing is sampled or drafted (None, None, None, the cache)."""
    start, before = cache.lengths, cache.mtp_hidden
    logits, cache, hidden, embeds = mod.extend(ids, cache, attention_mask=mask, fresh=fresh, return_hidden=True,
                                               vision=vision, positions=positions, rope_deltas=rope_deltas)
    controls = _controls(sampling, adjust)
    first = None if next_ids is not None else _sample(
        logits if controls is None else adjust_logits(logits, controls, history, produced), _fold_in(key, 0),
        sampling)
    n = mask.sum(-1, dtype=jnp.int32)
    # row p reads token p+1's embedding: the prompt's (a vision feature at an image or video pad), and for the
    # last token of the chunk the next prompt token or the one just sampled; it sits at token p's position
    shifted = jnp.concatenate([embeds[:, 1:], jnp.zeros_like(embeds[:, :1])], axis=1)
    is_last = (jnp.arange(ids.shape[1])[None] == (n - 1)[:, None])[..., None]
    following = mod.embed((first if next_ids is None else next_ids)[:, None])
    rows_embeds, rows_hidden, rows_mask = jnp.where(is_last, following, shifted), hidden, mask
    if not fresh:  # the row of the last token before the chunk: its hidden state, the chunk's first token
        rows_embeds = jnp.concatenate([embeds[:, :1], rows_embeds], axis=1)
        rows_hidden = jnp.concatenate([before[:, None].astype(hidden.dtype), hidden], axis=1)
        rows_mask = jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], axis=1)
        start = start - 1
    last_hidden = jnp.take_along_axis(hidden, jnp.maximum(n - 1, 0)[:, None, None], axis=1)[:, 0]
    cache = dataclasses.replace(cache, mtp_hidden=last_hidden.astype(cache.mtp_hidden.dtype))
    if next_ids is not None:
        return None, None, None, mod.mtp_extend(rows_embeds, rows_hidden, cache, start, positions=positions,
                                                attention_mask=rows_mask)[1]
    drafts, dists, cache = draft(mod, cache, rows_embeds, rows_hidden, start, rows_mask, k, sampling,
                                 _fold_in(key, 1), positions, vocab)
    out = first, drafts, dists, cache
    return out if top is None else out + (token_logprobs(logits, first, top),)


ROLLBACKS = ("states", "recompute")


def step(mod, cache: Cache, pending: jax.Array, drafts: jax.Array, dists: jax.Array | None, key: jax.Array,
         sampling: SamplingParams | RowSampling, rollback: str = "states", vocab: DraftVocab | None = None,
         top: int | None = None, limit: jax.Array | None = None, stop_ids: jax.Array | None = None,
         adjust: RowSampling | None = None, history: TokenHistory | None = None, produced=None):
    """One verify pass: (emitted [B, k+1] of which each row's first `count` are its new tokens, count [B] (kept
    drafts + 1), the next pending token [B], the next drafts and distributions, the cache); with `top`, also
    `token_logprobs`' (log-probability, `top` alternatives) of every emitted token, [B, k+1, ...].

    `rollback`: how the GDN layers come to hold their state after each row's last kept token:
    - "states": the verify pass keeps every layer's conv window and state after each token; keeping a prefix
      selects them (`accept_steps`).
    - "recompute": the verify pass keeps nothing per token; the kept tokens then run through the model again
      from the cache before the pass (a second read of every weight, but no per-token state buffers).
    BENCHMARKS.md measures both; generation uses "states". `vocab`: the tokens the head may draft (default all).
    `limit` [B] (>= 1) and `stop_ids` [B, S] (-1: none): a row keeps at most `limit` tokens and none past a kept
    draft in its `stop_ids` (a server's max_tokens and eos), so its cache holds only what it sends.
    `adjust`, `history`, `produced`: the rows' logit controls, as `prefill`'s (`history` and `produced` as they
    stand before the pending token's successor: each verified position adds the drafts before it).
    """
    if rollback not in ROLLBACKS:
        raise ValueError(f"rollback={rollback!r}: choose one of {ROLLBACKS}")
    b, k = drafts.shape
    start = cache.lengths
    verified = jnp.concatenate([pending[:, None], drafts], axis=1)
    raw, hidden, steps = mod.verify(verified, cache, every_state=rollback == "states")  # [B, k+1, V]
    controls = _controls(sampling, adjust)
    logits = raw if controls is None else adjust_logits(raw, controls, history, produced, drafts=drafts)
    target = argmax(logits)
    kept = jnp.sum(jnp.cumprod(drafts == target[:, :k], axis=1), axis=1)
    last = jnp.take_along_axis(target, kept[:, None], axis=1)[:, 0]
    if not _all_greedy(sampling):
        p = jax.vmap(lambda z: _probs(z, sampling), in_axes=1, out_axes=1)(logits)  # [B, k+1, V]
        p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=2)[..., 0]
        q_d = jnp.take_along_axis(dists, drafts[..., None], axis=2)[..., 0]
        u = _uniform(_fold_in(key, 0), b, k)
        kept_drawn = jnp.sum(jnp.cumprod(u * q_d < p_d, axis=1), axis=1)  # u < p/q, without dividing by q
        q_pad = jnp.concatenate([dists, jnp.zeros_like(dists[:, :1])], axis=1)  # after k kept drafts: p itself
        at = lambda x: jnp.take_along_axis(x, kept_drawn[:, None, None], axis=1)[:, 0]
        residual = jnp.maximum(at(p) - at(q_pad), 0.0)
        sampled = _sampled_rows(sampling)
        kept = jnp.where(sampled, kept_drawn, kept)
        last = jnp.where(sampled, _categorical(_fold_in(key, 1), jnp.log(residual)), last)
    if limit is not None or stop_ids is not None:
        cap = jnp.full((b,), k, jnp.int32) if limit is None else jnp.minimum(limit.astype(jnp.int32) - 1, k)
        if stop_ids is not None:
            is_stop = (drafts[:, :, None] == stop_ids[:, None, :]).any(-1)  # [B, k]
            cap = jnp.minimum(cap, jnp.where(is_stop.any(1), jnp.argmax(is_stop, axis=1), k))
        # a row cut at draft `cap` ends with that draft (kept, so it stands as sampled) instead of its own token
        last = jnp.where(kept > cap, jnp.take_along_axis(drafts, jnp.minimum(cap, k - 1)[:, None], axis=1)[:, 0],
                         last)
        kept = jnp.minimum(kept, cap)
    j = jnp.arange(k + 1)[None]
    if rollback == "states":
        cache = accept_steps(steps, kept + 1)
    else:
        cache = mod.extend(verified, cache, attention_mask=j <= kept[:, None])[1]
    last_hidden = jnp.take_along_axis(hidden, kept[:, None, None], axis=1)[:, 0]
    cache = dataclasses.replace(cache, mtp_hidden=last_hidden.astype(cache.mtp_hidden.dtype))
    # the head's rows start .. start+kept: tokens d1 .. d_kept, then the main model's own token
    emitted = jnp.where(j == kept[:, None], last[:, None], jnp.concatenate([drafts, drafts[:, :1]], axis=1))
    new_drafts, new_dists, cache = draft(mod, cache, mod.embed(emitted), hidden, start, j <= kept[:, None], k,
                                         sampling, _fold_in(key, 7), vocab=vocab)
    out = emitted, kept + 1, last, new_drafts, new_dists, cache
    if top is None:
        return out
    flat = lambda x: x.reshape(b * (k + 1), *x.shape[2:])
    return out + (jax.tree.map(lambda x: x.reshape(b, k + 1, *x.shape[1:]),
                               token_logprobs(flat(raw), flat(emitted), top)),)
