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
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp

from qwenjax.inference.sampling import SamplingParams, argmax, filter_logits
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


def _probs(logits: jax.Array, sampling: SamplingParams) -> jax.Array:
    return jax.nn.softmax(filter_logits(logits, sampling), axis=-1)


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
          k: int, sampling: SamplingParams, key: jax.Array, positions: jax.Array | None = None,
          vocab: DraftVocab | None = None):
    """The MTP head over rows start .. (real rows of `embeds`/`hidden`, at `positions`: see `mtp_extend`), then
    k-1 draft steps on its own output: (drafts [B, k] int32, their draft distributions [B, k, V] (None when
    greedy), the cache). `vocab`: the tokens it may draft (default all)."""
    n_rows = embeds.shape[1] if mask is None else mask.sum(-1, dtype=jnp.int32)
    drafts, dists = [], []
    h, cache = mod.mtp_extend(embeds, hidden, cache, start, positions=positions, attention_mask=mask, step=0)
    for i in range(k):
        if i:
            h, cache = mod.mtp_extend(mod.embed(drafts[-1][:, None]), h[:, None], cache, start + n_rows + i - 1,
                                      step=i)
        logits = _draft_logits(mod, h, vocab)
        if sampling.greedy:
            d = argmax(logits)
        else:
            q = _probs(logits, sampling)
            d = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(q), axis=-1)
            if vocab is not None:  # q over the whole vocabulary: 0 outside the draft vocabulary
                q = jnp.zeros((q.shape[0], mod.config.vocab_size), q.dtype).at[:, vocab.ids].set(q)
            dists.append(q)
        drafts.append((d if vocab is None else vocab.ids[d]).astype(jnp.int32))
    return jnp.stack(drafts, axis=1), (jnp.stack(dists, axis=1) if dists else None), cache


def prefill(mod, cache: Cache, ids: jax.Array, mask: jax.Array, key: jax.Array, k: int, sampling: SamplingParams,
            *, vision: VisionInputs | None = None, positions: jax.Array | None = None,
            rope_deltas: jax.Array | None = None, vocab: DraftVocab | None = None):
    """The prompt into the main model and the MTP head: (first token [B], drafts [B, k], their distributions,
    the cache). `vision`, `positions`, `rope_deltas`: a prompt's images or videos, as `extend` takes them;
    `vocab`: the tokens the head may draft (default all)."""
    logits, cache, hidden, embeds = mod.extend(ids, cache, attention_mask=mask, fresh=True, return_hidden=True,
                                               vision=vision, positions=positions, rope_deltas=rope_deltas)
    first = (argmax(logits) if sampling.greedy else
             jax.random.categorical(jax.random.fold_in(key, 0), filter_logits(logits, sampling), axis=-1))
    first = first.astype(jnp.int32)
    n = mask.sum(-1, dtype=jnp.int32)
    # row p reads token p+1's embedding: the prompt's (a vision feature at an image or video pad), and for the
    # last prompt token the one just sampled; it sits at token p's position
    shifted = jnp.concatenate([embeds[:, 1:], jnp.zeros_like(embeds[:, :1])], axis=1)
    is_last = (jnp.arange(ids.shape[1])[None] == (n - 1)[:, None])[..., None]
    drafts, dists, cache = draft(mod, cache, jnp.where(is_last, mod.embed(first[:, None]), shifted), hidden,
                                 jnp.zeros_like(n), mask, k, sampling, jax.random.fold_in(key, 1), positions, vocab)
    return first, drafts, dists, cache


ROLLBACKS = ("states", "recompute")


def step(mod, cache: Cache, pending: jax.Array, drafts: jax.Array, dists: jax.Array | None, key: jax.Array,
         sampling: SamplingParams, rollback: str = "states", vocab: DraftVocab | None = None):
    """One verify pass: (emitted [B, k+1] of which each row's first `count` are its new tokens, count [B] (kept
    drafts + 1), the next pending token [B], the next drafts and distributions, the cache).

    `rollback`: how the GDN layers come to hold their state after each row's last kept token:
    - "states": the verify pass keeps every layer's conv window and state after each token; keeping a prefix
      selects them (`accept_steps`).
    - "recompute": the verify pass keeps nothing per token; the kept tokens then run through the model again
      from the cache before the pass (a second read of every weight, but no per-token state buffers).
    BENCHMARKS.md measures both; generation uses "states". `vocab`: the tokens the head may draft (default all).
    """
    if rollback not in ROLLBACKS:
        raise ValueError(f"rollback={rollback!r}: choose one of {ROLLBACKS}")
    b, k = drafts.shape
    start = cache.lengths
    verified = jnp.concatenate([pending[:, None], drafts], axis=1)
    logits, hidden, steps = mod.verify(verified, cache, every_state=rollback == "states")  # [B, k+1, V]
    if sampling.greedy:
        target = argmax(logits)
        kept = jnp.sum(jnp.cumprod(drafts == target[:, :k], axis=1), axis=1)
        last = jnp.take_along_axis(target, kept[:, None], axis=1)[:, 0]
    else:
        keys = jax.random.split(key, 2)
        p = jax.vmap(lambda z: _probs(z, sampling), in_axes=1, out_axes=1)(logits)  # [B, k+1, V]
        p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=2)[..., 0]
        q_d = jnp.take_along_axis(dists, drafts[..., None], axis=2)[..., 0]
        u = jax.random.uniform(keys[0], (b, k))
        kept = jnp.sum(jnp.cumprod(u * q_d < p_d, axis=1), axis=1)  # u < p/q, without dividing by q
        q_pad = jnp.concatenate([dists, jnp.zeros_like(dists[:, :1])], axis=1)  # after k kept drafts: p itself
        at = lambda x: jnp.take_along_axis(x, kept[:, None, None], axis=1)[:, 0]
        residual = jnp.maximum(at(p) - at(q_pad), 0.0)
        last = jax.random.categorical(keys[1], jnp.log(residual), axis=-1).astype(jnp.int32)
    j = jnp.arange(k + 1)[None]
    if rollback == "states":
        cache = accept_steps(steps, kept + 1)
    else:
        cache = mod.extend(verified, cache, attention_mask=j <= kept[:, None])[1]
    # the head's rows start .. start+kept: tokens d1 .. d_kept, then the main model's own token
    emitted = jnp.where(j == kept[:, None], last[:, None], jnp.concatenate([drafts, drafts[:, :1]], axis=1))
    new_drafts, new_dists, cache = draft(mod, cache, mod.embed(emitted), hidden, start, j <= kept[:, None], k,
                                         sampling, jax.random.fold_in(key, 7), vocab=vocab)
    return emitted, kept + 1, last, new_drafts, new_dists, cache
