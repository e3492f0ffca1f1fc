"""The serving engine's compiled programs over its one batched cache, and the shapes they are compiled for.

    decode step:  rows 0 .. rows-1 of the cache, their first `horizon` slots ─▶ each active row's new token(s)
    prefill:      a chunk of `size` tokens into any rows of the cache (several whole prompts, or one's next chunk)
    take / put:   a row's prefix-cache snapshot, out of the cache and back into a row
    history:      each row's prompt tokens and generated-token counts, for the penalties (`TokenHistory`)

Shapes come from a few buckets (rows 1, 4, 16, ...; horizons 64, 256, ...; prefill calls 16, 64, ... and
prefill_chunk), so a running server compiles nothing new; `warmup` compiles the greedy ones. Every program takes
the rows' `RowSampling`, whose `used` tags are part of the compile key: a batch without logit controls runs the
programs it ran before they existed, and the history travels only with penalties.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.inference import speculative
from qwenjax.inference.generate import flat_params_model, grids_key, vision_kwargs
from qwenjax.inference.sampling import RowSampling, SamplingParams, TokenHistory, sample_rows, token_logprobs
from qwenjax.model import cache as cache_lib
from qwenjax.ops.kernels import program_options

MIN_CHUNK = 64     # prefill_chunk is a multiple of it; attention horizons are 64 · 4^i slots
SMALL_CHUNK = 16   # prefill calls are 16 · 4^i tokens and prefill_chunk: few compiled shapes, little padding
STOP_IDS = 8       # a verify pass stops a row at its first 8 stop ids (more, or a stop string: at the next step)


class Programs:
    """The compiled programs of an engine serving model `m` from a cache of `max_batch` rows of `max_len` slots,
    drafting `k` tokens a step (0: no speculative decoding), prefilling at most `prefill_chunk` tokens a call."""

    def __init__(self, m, *, max_batch: int, max_len: int, prefill_chunk: int, k: int):
        self.m, self.max_batch, self.max_len, self.prefill_chunk, self.k = m, max_batch, max_len, prefill_chunk, k
        self._model, self._param_shardings = flat_params_model(m)

    # ---- shapes --------------------------------------------------------------------------------------------------
    def step_rows(self, n: int) -> int:
        """The compiled step size for rows 0 .. n-1: 1, 4, 16, ... up to max_batch."""
        size = 1
        while size < n:
            size *= 4
        return min(size, self.max_batch)

    def horizon(self, n: int) -> int:
        """The compiled attention horizon for rows holding up to n tokens: 64, 256, 1024, ... up to max_len."""
        size = MIN_CHUNK
        while size < n:
            size *= 4
        return min(size, self.max_len)

    def row_counts(self) -> list[int]:
        """The compiled numbers of rows: 1, 4, 16, ... up to max_batch."""
        counts = [1]
        while counts[-1] < self.max_batch:
            counts.append(self.step_rows(counts[-1] + 1))
        return counts

    def chunk_sizes(self) -> list[int]:
        """Prefill call sizes: 16, 64, 256, ... and prefill_chunk."""
        sizes, size = [], SMALL_CHUNK
        while size < self.prefill_chunk:
            sizes.append(size)
            size *= 4
        return sizes + [self.prefill_chunk]

    # ---- programs ------------------------------------------------------------------------------------------------
    def step(self, rows: int, horizon: int, used: frozenset[str], top: int | None = None):
        """The decode step over the first `rows` rows of the cache and their first `horizon` slots (rows are
        taken lowest first: a few running requests do not pay for the whole batch, short ones not for the whole
        capacity): (tokens [rows, k+1], of which each row's first `count` [rows] are new, with `top` the tokens'
        log-probabilities and `top` alternatives, the cache, the drafts, the last tokens, the history). Each
        active row reads its input token from `last` and leaves its last new one there, and counts its new tokens
        in the history (with penalties; else None). Without speculative decoding k = 0."""
        def build():
            model, k = self._model, self.k

            def fn(leaves, cache, drafts, last, vocab, active, sampling, seeds, counters, limit, stop_ids, history):
                sub = cache_lib.window(cache, rows, horizon)
                keys, tokens = row_keys(seeds, counters), last[:rows]
                # counters: each row's index of the token this step samples = the tokens it generated before
                hist = None if history is None else history.take(jnp.arange(rows))
                if not k:
                    logits, sub = model(leaves).extend(tokens[:, None], sub, attention_mask=active[:, None])
                    new = sample_rows(logits, keys, sampling, hist, counters)
                    return (new[:, None], jnp.ones_like(new), None if top is None else
                            jax.tree.map(lambda x: x[:, None], token_logprobs(logits, new, top)),
                            cache_lib.put_window(cache, sub), drafts,
                            last.at[:rows].set(jnp.where(active, new, tokens)),
                            None if history is None else history.add(new, active))
                sampled = "sample" in sampling.used
                ids, dists = drafts
                out = speculative.step(model(leaves), sub, tokens, ids[:rows], dists[:rows] if sampled else None,
                                       keys, sampling, vocab=vocab, top=top, limit=limit, stop_ids=stop_ids,
                                       history=hist, produced=counters)
                emitted, count, _, new_ids, new_dists, new_sub = out[:6]
                # rows not decoding (free, or between prefill chunks) keep what they hold
                new_sub = cache_lib.keep_rows(new_sub, sub, active)
                pick = lambda new, old: jnp.where(active.reshape(-1, *[1] * (new.ndim - 1)), new, old)
                ids = ids.at[:rows].set(pick(new_ids, ids[:rows]))
                if sampled:
                    dists = dists.at[:rows].set(pick(new_dists, dists[:rows]))
                final = jnp.take_along_axis(emitted, count[:, None] - 1, axis=1)[:, 0]
                kept = active[:, None] & (jnp.arange(k + 1)[None] < count[:, None])
                return (emitted, count, out[6] if top is not None else None, cache_lib.put_window(cache, new_sub),
                        (ids, dists), last.at[:rows].set(pick(final, tokens)),
                        None if history is None else history.add(emitted, kept))

            return jax.jit(fn, in_shardings=(self._param_shardings, *[None] * 11), donate_argnums=(1, 2, 3, 11),
                           compiler_options=program_options(self.m))

        return self.m.compiled(("serve_step", self.max_batch, self.max_len, self.k, rows, horizon, used, top), build)

    def prefill(self, rows: int, size: int, horizon: int, reset: bool, used: frozenset[str],
                grids: tuple | None = None, top: int | None = None, final: bool = True):
        """One prefill call of `size` tokens into each of `rows` rows of the cache, anywhere in it (from empty
        with `reset`); with `grids` (a prompt's image_grid_thw, video_grid_thw) one whole prompt with its
        pictures; `top` as the decode step's. With speculative decoding the MTP head runs over the tokens too;
        `final`: the call ends the prompts (the head then drafts; otherwise its last row reads `next_id`, the
        token after the call's, and nothing is sampled). Sampled tokens go to `last`, and (with penalties) those
        of the rows whose prompts the call `ends` to the history."""
        def build():
            model, k = self._model, self.k

            def fn(leaves, cache, drafts, last, vocab, index, ids, n, next_id, sampling, seeds, counters, ends,
                   history, vision=None):
                sub = cache_lib.gather_rows(cache, index, horizon)
                if reset:
                    sub = cache_lib.reset_row(sub, jnp.arange(rows))
                mask, keys = jnp.arange(size)[None] < n[:, None], row_keys(seeds, counters)
                hist = None if history is None else history.take(index)
                if not k:
                    logits, sub = model(leaves).extend(ids, sub, attention_mask=mask, fresh=reset,
                                                       **vision_kwargs(vision, grids))
                    new = sample_rows(logits, keys, sampling, hist, counters)
                    logprobs = None if top is None else token_logprobs(logits, new, top)
                else:
                    new, ids_k, dists_k, sub, *logprobs = speculative.prefill(
                        model(leaves), sub, ids, mask, keys, k, sampling, fresh=reset,
                        next_ids=None if final else next_id, vocab=vocab, top=top, history=hist, produced=counters,
                        **vision_kwargs(vision, grids))
                    logprobs = logprobs[0] if logprobs else None
                    if final:
                        put = lambda buf, x: buf.at[index].set(x, mode="drop")
                        drafts = (put(drafts[0], ids_k), drafts[1] if dists_k is None else put(drafts[1], dists_k))
                if new is not None:  # a chunk that does not end its prompt samples nothing (speculative)
                    last = last.at[index].set(new, mode="drop")  # padding rows: index past the cache, dropped
                    if history is not None:
                        history = history.add(new, ends, rows=index)
                return new, logprobs, cache_lib.scatter_rows(cache, sub, index), drafts, last, history

            return jax.jit(fn, in_shardings=(self._param_shardings, *[None] * (13 if grids is None else 14)),
                           donate_argnums=(1, 2, 3, 13), compiler_options=program_options(self.m))

        return self.m.compiled(("serve_prefill", self.max_batch, self.max_len, self.k, rows, size, horizon, reset,
                                used, grids_key(grids), top, final), build)

    def take(self, size: int):
        return self.m.compiled(("serve_take_row", size),
                               lambda: jax.jit(lambda cache, row, start: cache_lib.take_row(cache, row, start, size),
                                               compiler_options=program_options(self.m)))

    def put(self, last: bool):
        return self.m.compiled(("serve_put_row", last), lambda: jax.jit(
            lambda cache, row, snap, start, end: cache_lib.put_row(cache, row, snap, start, end, state=last),
            donate_argnums=0, compiler_options=program_options(self.m)))

    def new_history(self) -> TokenHistory:
        """Every row's history, empty ([max_batch, vocab]; made when the first request with penalties comes)."""
        shape = (self.max_batch, self.m.config.vocab_size)
        return TokenHistory(jnp.zeros(shape, jnp.int32), jnp.zeros(shape, bool))

    def start_history(self, history: TokenHistory, row: int, prompt: np.ndarray) -> TokenHistory:
        """`history` with row `row` holding `prompt` ([vocab] bool: the tokens of the whole prompt, however much of
        it the prefix cache restores) and nothing generated."""
        def start(history, row, prompt):
            return TokenHistory(history.counts.at[row].set(0), history.prompt.at[row].set(prompt))

        return self.m.compiled(("serve_start_history",), lambda: jax.jit(
            start, donate_argnums=0, compiler_options=program_options(self.m)))(
            history, np.int32(row), prompt)

    def warmup(self, leaves, cache, drafts, last, vocab):
        """Compiles the greedy decode steps and the prefill chunks, of every size (one greedy token each); returns
        the cache, drafts and last tokens (rows emptied)."""
        horizons = sorted({self.horizon(MIN_CHUNK * 4 ** i) for i in range(16)})
        for size in self.chunk_sizes():
            first = self.horizon(size)  # a first chunk attends to itself and writes slots < size
            for horizon, reset in [(first, True)] + [(h, False) for h in horizons if h >= first]:
                # new prompts that fit one call prefill together (1, 4, 16, ... at once); longer ones one chunk
                # a turn, the last of them drafting (speculative)
                for rows, final in [(r, True) for r in self.row_counts() if reset] + \
                                   [(1, False)] * bool(self.k) + [(1, True)] * (not reset):
                    batch = neutral(rows)
                    _, _, cache, drafts, last, _ = self.prefill(rows, size, horizon, reset, batch.used, final=final)(
                        leaves, cache, drafts, last, vocab, np.arange(rows, dtype=np.int32),
                        np.zeros((rows, size), np.int32), np.ones(rows, np.int32), np.zeros(rows, np.int32), batch,
                        np.zeros((rows, 2), np.uint32), np.zeros(rows, np.uint32), np.ones(rows, bool), None)
        for rows in self.row_counts():
            batch = neutral(rows)
            for horizon in horizons:
                *_, cache, drafts, last, _ = self.step(rows, horizon, batch.used)(
                    leaves, cache, drafts, last, vocab, np.zeros(rows, bool), batch, np.zeros((rows, 2), np.uint32),
                    np.zeros(rows, np.uint32), np.ones(rows, np.int32), np.full((rows, STOP_IDS), -1, np.int32), None)
        return cache_lib.reset_row(cache, jnp.arange(self.max_batch)), drafts, last


@functools.lru_cache(maxsize=None)
def neutral(rows: int) -> RowSampling:
    """Greedy settings without controls for `rows` rows (free rows and padding; host arrays, only ever read)."""
    return RowSampling.of([SamplingParams()] * rows)


def seed_words(seeds: Sequence[int]) -> np.ndarray:
    """Seeds (0 .. 2^63-1) as the two 32-bit words of a threefry key, [B, 2] uint32."""
    s = np.array(seeds, np.uint64)
    return np.stack([s >> np.uint64(32), s & np.uint64(0xFFFFFFFF)], -1).astype(np.uint32)


def row_keys(seeds: jax.Array, counters: jax.Array) -> jax.Array:
    """Each row's key for its token `counters[r]`: fold_in(key of seeds[r], counters[r])."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.wrap_key_data(s, impl="threefry2x32"), c))(
        seeds, counters)
