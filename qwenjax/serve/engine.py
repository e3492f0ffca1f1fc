"""Continuous batching: one batched cache of `max_batch` rows, requests joining and leaving between decode steps.

    submit ──▶ queue ──admit──▶ free row ──prefix cache: restore the longest cached prefix──▶ prefill the rest,
    one chunk per loop turn ──▶ first token ──▶ decode steps with every running row ──▶ eos / stop / length /
    cancel ──▶ snapshot into the prefix cache, row freed

A background thread runs the loop. Each turn runs at most one prefill chunk (a long prompt never stalls the other
rows' streams for longer than one chunk) and one decode step for all rows; rows not decoding are masked out of
it (they append nothing, their GDN state is untouched). Every row samples with its own settings and its own
key, `fold_in(key(seed), token index)`: a seeded request gets the same tokens however it is batched.

Each row's last sampled token stays on the device, where the next step reads it. So the loop dispatches step
n + 1 before it reads step n's tokens, and the host's work on them (stop checks, events, the server's text and
streams) runs while the device computes: a row that ends at step n on eos or a stop is computed once more, and
that token is dropped (one that reaches its length is not: the host knows that in advance). A prefill's first
tokens are read alike, after the step that takes those rows on is dispatched.

With `speculative=k` the checkpoint's MTP head drafts k tokens per row and the decode step verifies them in one
pass (`qwenjax.inference.speculative`): a row gains 1 .. k+1 tokens a step, greedy output is plain greedy's and
sampled output has plain sampling's distribution. Prefill chunks run the head over their tokens too, and prefix
cache snapshots keep its buffer.

Events go to each request's `on_event` from the engine thread: `Tokens` as they are sampled, then one `Finished`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
import traceback
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.inference import speculative
from qwenjax.inference.generate import (compiled_draft_vocab, draft_vocab_ids, eos_ids, flat_params_model, grids_key,
                                       hits_stop, new_cache, vision_kwargs)
from qwenjax.inputs import vision_inputs, vision_positions
from qwenjax.inference.sampling import RowSampling, SamplingParams, sample_rows, token_logprobs
from qwenjax.model import cache as cache_lib
from qwenjax.model.qwen35 import NO_MTP
from qwenjax.serve.prefix_cache import PrefixCache
from qwenjax.sharding import activation_sharding
from qwenjax.validate import InputError

TOP_LOGPROBS = (0, 5, 20)  # compiled numbers of alternatives a request's `logprobs` rounds up to
MIN_CHUNK = 64     # prefill_chunk is a multiple of it; attention horizons are 64 · 4^i slots
SMALL_CHUNK = 16   # prefill calls are 16 · 4^i tokens and prefill_chunk: few compiled shapes, little padding
STOP_IDS = 8       # a verify pass stops a row at its first 8 stop ids (more, or a stop string: at the next step)


class QueueFull(Exception):
    """The engine's queue holds `max_queue` requests already (a server answers 429)."""


@dataclasses.dataclass(frozen=True)
class Tokens:
    ids: list[int]
    # with Request.logprobs: per token (its log-probability, [(id, log-probability)] of the most likely ones)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


@dataclasses.dataclass(frozen=True)
class Finished:
    reason: str             # "stop" (eos or a stop string), "length", "cancelled" or "error"
    prompt_tokens: int
    cached_tokens: int      # prompt tokens restored from the prefix cache, not prefilled
    completion_tokens: int
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """One generation. `snapshot_at`: prompt lengths worth a prefix-cache snapshot besides the block boundaries
    (a chat server passes where the conversation's history ends: the next turn starts with it)."""
    prompt: list[int]
    on_event: Callable[[Tokens | Finished], None]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] | None = None  # default: the model's eos tokens
    snapshot_at: tuple[int, ...] = ()
    # images and videos of the prompt, as the processor gives them: pixel_values, image_grid_thw,
    # pixel_values_videos, video_grid_thw. Such a prompt prefills in one call and skips the prefix cache (its
    # tokens alone do not say which pictures they hold).
    pictures: dict | None = None
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (0-20)
    cancelled: bool = False  # set by `Engine.cancel`; the row is freed at the next turn
    arrived: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass(eq=False)
class _Row:
    request: Request
    done: int                  # prompt tokens in the cache
    cached: int                # of which restored from the prefix cache
    generated: list[int] = dataclasses.field(default_factory=list)
    fed: int = 0               # generated tokens the cache holds (or will, once the dispatched steps ran)
    # tokens a verify pass kept past a stop string: the cache holds them, the request never sees them
    unsent: list[int] = dataclasses.field(default_factory=list)

    @property
    def decoding(self) -> bool:
        return self.done == len(self.request.prompt)


@dataclasses.dataclass
class Stats:
    """Counters for /metrics (read from other threads: plain ints, written only by the engine thread)."""
    requests: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by finish reason
    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    drafted_tokens: int = 0    # speculative decoding: drafts verified (rows decoding x k per step)
    accepted_tokens: int = 0   # of which kept
    recent: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=256))

    def tokens_per_second(self, window_s: float = 10.0) -> float:
        """Generated tokens per second over the last `window_s` seconds."""
        now = time.monotonic()
        n = sum(count for t, count in list(self.recent) if now - t <= window_s)
        return n / window_s


class Engine:
    """Serves generation requests from many threads on one model. `start()` runs the loop in a thread;
    `submit` queues a request (raises QueueFull past `max_queue`); `cancel` drops one; `stop()` ends the loop,
    finishing every request still queued or running as cancelled.

    Args:
      m: a `qwenjax.Qwen35`.
      max_batch: rows decoded together.
      max_len: cache capacity per row: a request's prompt plus its max_tokens must fit.
      prefill_chunk: the longest prefill call (tokens), a multiple of 64.
      max_queue: requests waiting for a row beyond which `submit` refuses.
      prefix_cache_bytes: memory for the prefix cache's snapshots (0: off).
      tokenizer: reads generated text for stop strings.
      speculative: draft this many tokens per row and step with the checkpoint's MTP head (0: off).
      draft_vocab: with `speculative`, the token ids the head may draft (`generate`'s; default all).
    """

    def __init__(self, m, *, max_batch: int = 8, max_len: int = 4096, prefill_chunk: int = 256,
                 max_queue: int = 256, prefix_cache_bytes: int = 1 << 30, tokenizer=None, speculative: int = 0,
                 draft_vocab: Sequence[int] | None = None):
        if prefill_chunk < MIN_CHUNK or prefill_chunk % MIN_CHUNK:
            raise InputError(f"prefill_chunk={prefill_chunk}: must be a positive multiple of {MIN_CHUNK}")
        if max_batch < 1 or max_len < 2:
            raise InputError(f"max_batch={max_batch}, max_len={max_len}: need max_batch >= 1 and max_len >= 2")
        limit = m.config.max_position_embeddings
        if max_len > limit:
            raise InputError(f"max_len={max_len} is past the model's max_position_embeddings={limit}")
        if speculative < 0:
            raise InputError(f"speculative={speculative}: the number of draft tokens must be >= 0")
        if speculative and not m.config.mtp_num_hidden_layers:
            raise InputError(f"speculative={speculative}: {NO_MTP}")
        self.m, self.tokenizer, self.k = m, tokenizer, speculative
        self._draft_vocab = draft_vocab_ids(draft_vocab, m.config.vocab_size, speculative)
        self.max_batch, self.max_len, self.prefill_chunk, self.max_queue = max_batch, max_len, prefill_chunk, max_queue
        self.eos = eos_ids(m, None)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.stats = Stats()
        self._queue: collections.deque[Request] = collections.deque()
        self._rows: list[_Row | None] = [None] * max_batch
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._params = jax.tree.leaves(m.params)
        self._cache = None
        self._last = None    # each row's last sampled token [max_batch], the next decode step's input
        self._pending = None  # a dispatched decode step whose tokens are not read yet
        self._drafts = None  # speculative: each row's drafts [max_batch, k] and their distributions [.., vocab]
        self._vocab = None   # speculative: the DraftVocab
        self._model, self._param_shardings = flat_params_model(m)

    # ---- the public side (any thread) ----------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        n = len(request.prompt)
        if n == 0:
            raise InputError("the prompt is empty: generation needs at least one prompt token")
        vocab = self.m.config.vocab_size
        bad = next((i for i, t in enumerate(request.prompt) if not 0 <= t < vocab), None)
        if bad is not None:
            raise InputError(f"prompt token {bad} is {request.prompt[bad]}, not a token id (vocab_size={vocab})")
        if request.max_tokens < 1:
            raise InputError(f"max_tokens={request.max_tokens}: must be at least 1")
        if request.logprobs is not None and not 0 <= request.logprobs <= TOP_LOGPROBS[-1]:
            raise InputError(f"logprobs={request.logprobs}: must be in [0, {TOP_LOGPROBS[-1]}]")
        if n + request.max_tokens > self.room:
            raise InputError(f"the prompt has {n} tokens; with max_tokens={request.max_tokens} it needs "
                             f"{n + request.max_tokens + self.k} cache slots"
                             f"{f' (with {self.k} speculative tokens)' if self.k else ''}, but a row holds "
                             f"{self.max_len} (the server's --max-len)")
        if request.pictures:
            ids = np.asarray(request.prompt, np.int32)[None]
            try:  # the pad tokens must match the pictures: checked here, not in the loop that serves everyone
                vision_inputs(self.m.config, ids, np.ones_like(ids), **request.pictures)
            except ValueError as e:
                raise InputError(str(e)) from None
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting already (the server's queue limit)")
            self._queue.append(request)
            self._lock.notify()
        return request

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self._lock:
            self._lock.notify()

    @property
    def room(self) -> int:
        """The most prompt + generated tokens a request may ask for (a verify pass writes k slots past them)."""
        return self.max_len - self.k

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        """The loop thread runs (started and not stopped)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._rows)

    def start(self, warmup: bool = True) -> Engine:
        """Starts the loop thread (after compiling the common programs, with `warmup`)."""
        with activation_sharding(self.m.mesh, self.m.rules):
            self._new_cache()
            if self._draft_vocab is not None:
                self._vocab = compiled_draft_vocab(self.m)(self._params, self._draft_vocab)
            if warmup:
                self._warmup()
        self._thread = threading.Thread(target=self._run, name="qwenjax-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- compiled programs ---------------------------------------------------------------------------------------
    def _new_cache(self) -> None:
        self._cache = new_cache(self.m, self.max_batch, self.max_len, mtp=self.k > 0)
        self._last = jnp.zeros(self.max_batch, jnp.int32)
        self._pending = None
        if self.k:
            self._drafts = (jnp.zeros((self.max_batch, self.k), jnp.int32),
                            jnp.zeros((self.max_batch, self.k, self.m.config.vocab_size), jnp.float32))

    def _step_fn(self, rows: int, horizon: int, used: frozenset[str], top: int | None = None):
        """The decode step over the first `rows` rows of the cache and their first `horizon` slots (rows are
        taken lowest first: a few running requests do not pay for the whole batch, short ones not for the whole
        capacity): (tokens [rows, k+1], of which each row's first `count` [rows] are new, with `top` the tokens'
        log-probabilities and `top` alternatives, the cache, the drafts, the last tokens). Each active row reads
        its input token from `last` and leaves its last new one there. Without speculative decoding k = 0."""
        def build():
            model, k = self._model, self.k

            def fn(leaves, cache, drafts, last, vocab, active, sampling, seeds, counters, limit, stop_ids):
                sub = cache_lib.window(cache, rows, horizon)
                keys, tokens = _row_keys(seeds, counters), last[:rows]
                if not k:
                    logits, sub = model(leaves).extend(tokens[:, None], sub, attention_mask=active[:, None])
                    new = sample_rows(logits, keys, sampling)
                    return (new[:, None], jnp.ones_like(new), None if top is None else
                            jax.tree.map(lambda x: x[:, None], token_logprobs(logits, new, top)),
                            cache_lib.put_window(cache, sub), drafts,
                            last.at[:rows].set(jnp.where(active, new, tokens)))
                sampled = "sample" in sampling.used
                ids, dists = drafts
                out = speculative.step(model(leaves), sub, tokens, ids[:rows], dists[:rows] if sampled else None,
                                       keys, sampling, vocab=vocab, top=top, limit=limit,
                                       stop_ids=stop_ids)
                emitted, count, _, new_ids, new_dists, new_sub = out[:6]
                # rows not decoding (free, or between prefill chunks) keep what they hold
                new_sub = cache_lib.keep_rows(new_sub, sub, active)
                pick = lambda new, old: jnp.where(active.reshape(-1, *[1] * (new.ndim - 1)), new, old)
                ids = ids.at[:rows].set(pick(new_ids, ids[:rows]))
                if sampled:
                    dists = dists.at[:rows].set(pick(new_dists, dists[:rows]))
                final = jnp.take_along_axis(emitted, count[:, None] - 1, axis=1)[:, 0]
                return (emitted, count, out[6] if top is not None else None, cache_lib.put_window(cache, new_sub),
                        (ids, dists), last.at[:rows].set(pick(final, tokens)))

            return jax.jit(fn, in_shardings=(self._param_shardings, *[None] * 10), donate_argnums=(1, 2, 3))

        return self.m.compiled(("serve_step", self.max_batch, self.max_len, self.k, rows, horizon, used, top), build)

    def _step_rows(self, n: int) -> int:
        """The compiled step size for rows 0 .. n-1: 1, 4, 16, ... up to max_batch."""
        size = 1
        while size < n:
            size *= 4
        return min(size, self.max_batch)

    def _horizon(self, n: int) -> int:
        """The compiled attention horizon for rows holding up to n tokens: 64, 256, 1024, ... up to max_len."""
        size = MIN_CHUNK
        while size < n:
            size *= 4
        return min(size, self.max_len)

    def _prefill_fn(self, rows: int, size: int, horizon: int, reset: bool, used: frozenset[str],
                    grids: tuple | None = None, top: int | None = None, final: bool = True):
        """One prefill call of `size` tokens into each of `rows` rows of the cache, anywhere in it (from empty
        with `reset`); with `grids` (a prompt's image_grid_thw, video_grid_thw) one whole prompt with its
        pictures; `top` as the decode step's. With speculative decoding the MTP head runs over the tokens too;
        `final`: the call ends the prompts (the head then drafts; otherwise its last row reads `next_id`, the
        token after the call's, and nothing is sampled). Sampled tokens go to `last` too."""
        def build():
            model, k = self._model, self.k

            def fn(leaves, cache, drafts, last, vocab, index, ids, n, next_id, sampling, seeds, counters, vision=None):
                sub = cache_lib.gather_rows(cache, index, horizon)
                if reset:
                    sub = cache_lib.reset_row(sub, jnp.arange(rows))
                mask, keys = jnp.arange(size)[None] < n[:, None], _row_keys(seeds, counters)
                if not k:
                    logits, sub = model(leaves).extend(ids, sub, attention_mask=mask, fresh=reset,
                                                       **vision_kwargs(vision, grids))
                    new = sample_rows(logits, keys, sampling)
                    logprobs = None if top is None else token_logprobs(logits, new, top)
                else:
                    new, ids_k, dists_k, sub, *logprobs = speculative.prefill(
                        model(leaves), sub, ids, mask, keys, k, sampling, fresh=reset,
                        next_ids=None if final else next_id, vocab=vocab, top=top, **vision_kwargs(vision, grids))
                    logprobs = logprobs[0] if logprobs else None
                    if final:
                        put = lambda buf, x: buf.at[index].set(x, mode="drop")
                        drafts = (put(drafts[0], ids_k), drafts[1] if dists_k is None else put(drafts[1], dists_k))
                if new is not None:  # a chunk that does not end its prompt samples nothing (speculative)
                    last = last.at[index].set(new, mode="drop")  # padding rows: index past the cache, dropped
                return new, logprobs, cache_lib.scatter_rows(cache, sub, index), drafts, last

            return jax.jit(fn, in_shardings=(self._param_shardings, *[None] * (11 if grids is None else 12)),
                           donate_argnums=(1, 2, 3))

        return self.m.compiled(("serve_prefill", self.max_batch, self.max_len, self.k, rows, size, horizon, reset,
                                used, grids_key(grids), top, final), build)

    def _take_fn(self, size: int):
        return self.m.compiled(("serve_take_row", size),
                               lambda: jax.jit(lambda cache, row, start: cache_lib.take_row(cache, row, start, size)))

    def _put_fn(self, last: bool):
        return self.m.compiled(("serve_put_row", last), lambda: jax.jit(
            lambda cache, row, snap, start, end: cache_lib.put_row(cache, row, snap, start, end, state=last),
            donate_argnums=0))

    def _warmup(self) -> None:
        """Compiles the greedy decode steps and the prefill chunks, of every size (one greedy token each)."""
        horizons = sorted({self._horizon(MIN_CHUNK * 4 ** i) for i in range(16)})
        for size in self._chunk_sizes():
            first = self._horizon(size)  # a first chunk attends to itself and writes slots < size
            for horizon, reset in [(first, True)] + [(h, False) for h in horizons if h >= first]:
                # new prompts that fit one call prefill together (1, 4, 16, ... at once); longer ones one chunk
                # a turn, the last of them drafting (speculative)
                for rows, final in [(r, True) for r in self._row_counts() if reset] + \
                                   [(1, False)] * bool(self.k) + [(1, True)] * (not reset):
                    batch = RowSampling.of([SamplingParams()] * rows)
                    _, _, self._cache, self._drafts, self._last = self._prefill_fn(rows, size, horizon, reset,
                                                                                   batch.used, final=final)(
                        self._params, self._cache, self._drafts, self._last, self._vocab,
                        np.arange(rows, dtype=np.int32),
                        np.zeros((rows, size), np.int32), np.ones(rows, np.int32), np.zeros(rows, np.int32), batch,
                        np.zeros((rows, 2), np.uint32), np.zeros(rows, np.uint32))
        for rows in self._row_counts():
            batch = RowSampling.of([SamplingParams()] * rows)
            for horizon in horizons:
                *_, self._cache, self._drafts, self._last = self._step_fn(rows, horizon, batch.used)(
                    self._params, self._cache, self._drafts, self._last, self._vocab, np.zeros(rows, bool), batch,
                    np.zeros((rows, 2), np.uint32), np.zeros(rows, np.uint32), np.ones(rows, np.int32),
                    np.full((rows, STOP_IDS), -1, np.int32))
        self._cache = cache_lib.reset_row(self._cache, jnp.arange(self.max_batch))

    def _row_counts(self) -> list[int]:
        """The compiled numbers of rows: 1, 4, 16, ... up to max_batch."""
        counts = [1]
        while counts[-1] < self.max_batch:
            counts.append(self._step_rows(counts[-1] + 1))
        return counts

    def _chunk_sizes(self) -> list[int]:
        """Prefill call sizes: 16, 64, 256, ... and prefill_chunk."""
        sizes, size = [], SMALL_CHUNK
        while size < self.prefill_chunk:
            sizes.append(size)
            size *= 4
        return sizes + [self.prefill_chunk]

    # ---- the loop (engine thread) --------------------------------------------------------------------------------
    def _run(self) -> None:
        with activation_sharding(self.m.mesh, self.m.rules):
            while True:
                with self._lock:
                    while not self._stopping and not self._queue and not any(self._rows):
                        self._lock.wait()
                    if self._stopping:
                        break
                try:
                    self._turn()
                except Exception as e:  # a failed program: fail what was running, start from a fresh cache
                    traceback.print_exc()
                    for r, row in enumerate(self._rows):
                        if row is not None:
                            self._finish(r, "error", error=f"{type(e).__name__}: {e}")
                    self._new_cache()
        for r, row in enumerate(self._rows):
            if row is not None:
                self._finish(r, "cancelled")
        with self._lock:
            waiting, self._queue = list(self._queue), collections.deque()
        for request in waiting:
            _send(request, Finished("cancelled", len(request.prompt), 0, 0))

    def _turn(self) -> None:
        for r, row in enumerate(self._rows):
            if row is not None and row.request.cancelled:
                self._finish(r, "cancelled")
        self._admit()
        prefilling = [r for r, row in enumerate(self._rows) if row is not None and not row.decoding]
        # prompts a single call prefills whole (from empty, no pictures) go together; else the oldest's next chunk
        whole = [r for r in prefilling if self._rows[r].done == 0 and not self._rows[r].request.pictures and
                 self._chunk_end(self._rows[r]) == len(self._rows[r].request.prompt)]
        prefill = None
        if whole:
            prefill = self._prefill_chunks(whole)
        elif prefilling:
            oldest = min(prefilling, key=lambda r: self._rows[r].request.arrived)
            prefill = (self._prefill_pictures if self._rows[oldest].request.pictures else self._prefill_chunks)(
                [oldest])
        # Dispatch this turn's step (with the rows just prefilled: their first tokens wait in `last`), then read
        # the last step's tokens and the prefill's while it runs. With speculative decoding the host sets each
        # row's token counters and limits from what came before: it reads everything before the step.
        if self.k and prefill is not None:
            self._read_prefill(prefill)
            prefill = None
        step = self._decode_step() if any(map(_stepping, self._rows)) else None
        ready, self._pending = (step, None) if self.k else (self._pending, step)
        if ready is not None:
            self._read_step(ready)
        if prefill is not None:
            self._read_prefill(prefill)

    def _admit(self) -> None:
        while None in self._rows:
            with self._lock:
                if not self._queue:
                    return
                request = self._queue.popleft()
            if request.cancelled:
                _send(request, Finished("cancelled", len(request.prompt), 0, 0))
                continue
            r = self._rows.index(None)
            node = self.prefix_cache.root if request.pictures else self.prefix_cache.lookup(request.prompt)
            for i, n in enumerate(chain := node.chain()):
                self._cache = self._put_fn(i == len(chain) - 1)(self._cache, np.int32(r), n.snapshot,
                                                                np.int32(n.start), np.int32(n.depth))
            self._rows[r] = _Row(request, done=node.depth, cached=node.depth)
            self.stats.prompt_tokens += len(request.prompt)
            self.stats.cached_tokens += node.depth

    def _chunk_end(self, row: _Row) -> int:
        """Where row's next prefill chunk ends: at most prefill_chunk tokens, at the next block boundary (a
        multiple of prefill_chunk) or snapshot point, or at the prompt's end."""
        n, done = len(row.request.prompt), row.done
        end = min(n, (done // self.prefill_chunk + 1) * self.prefill_chunk)
        return min([end] + [p for p in row.request.snapshot_at if done < p < end])

    def _prefill_chunks(self, rs: list[int]) -> tuple:
        """Dispatches the next chunk of each row in `rs`, in one call (several rows: each a whole prompt from
        empty): what `_read_prefill` takes."""
        rows = [self._rows[r] for r in rs]
        requests = [row.request for row in rows]
        ends = [self._chunk_end(row) for row in rows]
        counts = [end - row.done for end, row in zip(ends, rows)]
        size = next(s for s in self._chunk_sizes() if s >= max(counts))
        b = self._step_rows(len(rs))
        index = np.full(b, self.max_batch, np.int32)  # padding rows: past the cache, dropped
        ids, n, next_id = np.zeros((b, size), np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32)
        for i, (r, row, end) in enumerate(zip(rs, rows, ends)):
            index[i], n[i] = r, end - row.done
            ids[i, :n[i]] = row.request.prompt[row.done:end]
            next_id[i] = row.request.prompt[end] if end < len(row.request.prompt) else 0
        pad = b - len(rs)
        sampling = RowSampling.of([q.sampling for q in requests] + [SamplingParams()] * pad)
        reset, final = rows[0].done == 0, ends[0] == len(requests[0].prompt)
        tokens, logprobs, self._cache, self._drafts, self._last = self._prefill_fn(
            b, size, self._horizon(size if reset else ends[0]), reset, sampling.used, top=_top(requests),
            final=final or not self.k)(
            self._params, self._cache, self._drafts, self._last, self._vocab, index, ids, n, next_id, sampling,
            _seed_words([q.seed for q in requests] + [0] * pad), np.zeros(b, np.uint32))
        ended = []  # (place in the call, r, row) of the rows whose prompts this call ends: their first tokens
        for i, (r, row, end) in enumerate(zip(rs, rows, ends)):
            request = row.request
            row.done = end
            self.stats.prefilled_tokens += counts[i]
            if (end < len(request.prompt) and end % self.prefill_chunk == 0) or end in request.snapshot_at:
                self._snapshot(r, request.prompt[:end])
            if end == len(request.prompt):
                ended.append((i, r, row))
        return tokens, logprobs, ended

    def _read_prefill(self, prefill: tuple) -> None:
        """Hands a prefill call's first tokens to the rows it ended (`_prefill_chunks`' result)."""
        tokens, logprobs, ended = prefill
        if ended:
            tokens = np.asarray(tokens)
        for i, r, row in ended:
            self._emit(r, [int(tokens[i])], [_logprobs(logprobs, i, row.request)])

    def _prefill_pictures(self, rs: list[int]) -> tuple:
        """Dispatches a prompt with images or videos, whole, in one call (`rs`: its row): its multimodal
        positions and the vision tower's features span it (compiled once per prompt size and set of picture
        sizes, as `generate`'s prefill). What `_read_prefill` takes."""
        r, = rs
        row = self._rows[r]
        request = row.request
        n = len(request.prompt)
        size = MIN_CHUNK
        while size < n:
            size *= 4
        ids, mask = np.zeros((1, size), np.int32), np.zeros((1, size), np.int32)
        ids[0, :n], mask[0, :n] = request.prompt, 1
        vision = vision_inputs(self.m.config, ids, mask, **request.pictures)
        positions, deltas = vision_positions(self.m.config, ids, mask, vision)
        grids = (vision.image_grid_thw, vision.video_grid_thw)
        sampling = RowSampling.of([request.sampling])
        token, logprobs, self._cache, self._drafts, self._last = self._prefill_fn(
            1, size, self._horizon(size), True, sampling.used, grids, top=_top([request]))(
            self._params, self._cache, self._drafts, self._last, self._vocab, np.array([r], np.int32), ids,
            np.array([n], np.int32), np.zeros(1, np.int32), sampling, _seed_words([request.seed]),
            np.zeros(1, np.uint32),
            (positions, deltas, vision.pixel_values, vision.pixel_values_videos))
        row.done = n
        self.stats.prefilled_tokens += n
        return token, logprobs, [(0, r, row)]

    def _decode_step(self) -> tuple:
        """Dispatches a decode step for every decoding row: (its outputs, the rows it ran), to `_read_step`."""
        decoding = [r for r, row in enumerate(self._rows) if _stepping(row)]
        b = self._step_rows(max(decoding) + 1)
        # the step writes each row's token at slot (its length): prompt + tokens fed so far; a verify pass k more,
        # and the head's draft steps k - 1 past those (written, where they fit the horizon, for better drafts)
        horizon = self._horizon(max(len(self._rows[r].request.prompt) + self._rows[r].fed + 1
                                    for r in decoding) + 2 * self.k)
        active, counters = np.zeros(b, bool), np.zeros(b, np.uint32)
        params, seeds = [SamplingParams()] * b, [0] * b
        # a verify pass keeps no token past a row's max_tokens or a stop id (up to STOP_IDS of them)
        limit, stop_ids = np.ones(b, np.int32), np.full((b, STOP_IDS), -1, np.int32)
        for r in decoding:
            row = self._rows[r]
            # the row's token index: its tokens so far, with the one the step in flight samples (no speculation)
            active[r], counters[r] = True, row.fed + 1
            params[r], seeds[r] = row.request.sampling, row.request.seed
            limit[r] = row.request.max_tokens - len(row.generated)
            stops = sorted(self.eos if row.request.stop_token_ids is None else row.request.stop_token_ids)
            stop_ids[r, :len(stops[:STOP_IDS])] = stops[:STOP_IDS]
            row.fed += 1
        sampling = RowSampling.of(params)
        top = _top([self._rows[r].request for r in decoding])
        *out, self._cache, self._drafts, self._last = self._step_fn(b, horizon, sampling.used, top)(
            self._params, self._cache, self._drafts, self._last, self._vocab, active, sampling, _seed_words(seeds),
            counters, limit, stop_ids)
        self.stats.decode_steps += 1
        return out, [(r, self._rows[r]) for r in decoding]

    def _read_step(self, step: tuple) -> None:
        """Hands a decode step's tokens to the rows it ran that are still there (not finished since)."""
        (new, count, logprobs), rows = step
        new, count = np.asarray(new), np.asarray(count)
        logprobs = None if logprobs is None else tuple(np.asarray(x) for x in logprobs)
        for r, row in rows:
            if self._rows[r] is not row:
                continue
            n = int(count[r])
            self.stats.drafted_tokens += self.k
            self.stats.accepted_tokens += n - 1
            if self.k:  # the verify pass fed the row's last token and the kept drafts; the last new one is not fed
                row.fed = len(row.generated) + n - 1
            self._emit(r, new[r, :n].tolist(), [_logprobs(logprobs, (r, j), row.request) for j in range(n)])

    def _emit(self, r: int, ids: list[int], logprobs: list | None = None) -> None:
        """Hands row r's new tokens to its request (each with its `_logprobs` entry), up to and including the first
        that ends it: eos, a stop string or its length; then finishes the row."""
        row = self._rows[r]
        request = row.request
        stop_ids = self.eos if request.stop_token_ids is None else request.stop_token_ids
        reason = None
        for i, t in enumerate(ids):
            row.generated.append(t)
            if t in stop_ids or (request.stop_strings and hits_stop(self.tokenizer, row.generated,
                                                                    request.stop_strings)):
                reason = "stop"
            elif len(row.generated) >= request.max_tokens:
                reason = "length"
            if reason:
                row.unsent, ids = ids[i + 1:], ids[:i + 1]
                break
        self.stats.generated_tokens += len(ids)
        self.stats.recent.append((time.monotonic(), len(ids)))
        asked = logprobs is not None and request.logprobs is not None
        _send(request, Tokens(ids, [e for entry in logprobs[:len(ids)] for e in entry] if asked else None))
        if reason:
            self._finish(r, reason)

    def _finish(self, r: int, reason: str, error: str | None = None) -> None:
        row = self._rows[r]
        self._rows[r] = None
        if reason != "error" and row.decoding and row.fed and not row.request.pictures:
            try:  # what the row holds: the prompt and the generated tokens fed back (a step in flight included)
                self._snapshot(r, row.request.prompt + (row.generated + row.unsent)[:row.fed])
            except Exception:
                traceback.print_exc()
        self.stats.requests[reason] += 1
        _send(row.request, Finished(reason, len(row.request.prompt), row.cached, len(row.generated), error))

    def _snapshot(self, r: int, tokens: Sequence[int]) -> None:
        def take(start: int, end: int):
            size = max(MIN_CHUNK, 1 << math.ceil(math.log2(end - start)))
            return self._take_fn(size)(self._cache, np.int32(r), np.int32(start))

        self.prefix_cache.insert(tokens, take)


def _stepping(row: _Row | None) -> bool:
    """The row takes the next decode step: its prompt is in the cache (so its first token is sampled, perhaps
    not yet read), and it has tokens left to sample (with steps in flight, its last may be sampled already).
    A row whose first token turns out to end it was stepped once for nothing, as one ending on eos later is."""
    return row is not None and row.decoding and row.fed < row.request.max_tokens - 1


def _top(requests: Sequence[Request]) -> int | None:
    """The compiled number of alternatives that serves every request's `logprobs` (None: none asks)."""
    asked = [q.logprobs for q in requests if q.logprobs is not None]
    return None if not asked else next(k for k in TOP_LOGPROBS if k >= max(asked))


def _logprobs(out, at, request: Request):
    """The entry at `at` (a row, or (row, token)) of a program's logprobs output, as `Tokens.logprobs` holds it
    (None unless asked)."""
    if out is None or request.logprobs is None:
        return None
    chosen, ids, lps = (np.asarray(x)[at] for x in out)
    return [(float(chosen), [(int(i), float(lp)) for i, lp in zip(ids[:request.logprobs],
                                                                   lps[:request.logprobs])])]


def _send(request: Request, event: Tokens | Finished) -> None:
    """Delivers an event; a receiver that fails (a client gone) cancels its request, never the engine."""
    try:
        request.on_event(event)
    except Exception:
        traceback.print_exc()
        request.cancelled = True


def _seed_words(seeds: Sequence[int]) -> np.ndarray:
    """Seeds (0 .. 2^63-1) as the two 32-bit words of a threefry key, [B, 2] uint32."""
    s = np.array(seeds, np.uint64)
    return np.stack([s >> np.uint64(32), s & np.uint64(0xFFFFFFFF)], -1).astype(np.uint32)


def _row_keys(seeds: jax.Array, counters: jax.Array) -> jax.Array:
    """Each row's key for its token `counters[r]`: fold_in(key of seeds[r], counters[r])."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.wrap_key_data(s, impl="threefry2x32"), c))(
        seeds, counters)
