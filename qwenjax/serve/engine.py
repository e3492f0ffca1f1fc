"""Continuous batching: one batched cache of `max_batch` rows, requests joining and leaving between decode steps.

    submit ──▶ queue ──admit──▶ free row ──prefix cache: restore the longest cached prefix──▶ prefill the rest,
    one chunk per loop turn ──▶ first token ──▶ decode steps with every running row ──▶ eos / stop / length /
    cancel ──▶ snapshot into the prefix cache, row freed

A background thread runs the loop. Each turn runs at most one prefill chunk (a long prompt never stalls the other
rows' streams for longer than one chunk) and one decode step for all rows; rows not decoding are masked out of
it (they append nothing, their GDN state is untouched). Every row samples with its own settings and its own
key, `fold_in(key(seed), token index)`: a seeded request gets the same tokens however it is batched. Its logit
controls (logit bias, min_tokens, penalties) apply on the device beside sampling, the penalties reading the row's
history (its prompt's tokens, its generated tokens' counts), kept beside the cache.

Each row's last sampled token stays on the device, where the next step reads it. So the loop dispatches step
n + 1 before it reads step n's tokens, and the host's work on them (stop checks, events, the server's text and
streams) runs while the device computes: a row that ends at step n on eos or a stop is computed once more, and
that token is dropped (one that reaches its length is not: the host knows that in advance). A prefill's first
tokens are read alike, after the step that takes those rows on is dispatched.

With `speculative=k` the checkpoint's MTP head drafts k tokens per row and the decode step verifies them in one
pass (`qwenjax.inference.speculative`): a row gains 1 .. k+1 tokens a step, greedy output is plain greedy's and
sampled output has plain sampling's distribution. Prefill chunks run the head over their tokens too, and prefix
cache snapshots keep its buffer.

A request is checked whole when it is submitted; what the loop then prepares for it on the host fails that request
alone ("error"), never the rows beside it. Events go to each request's `on_event` from the engine thread (a
queued request's cancellation from the cancelling thread): `Tokens` as they are sampled, then one `Finished`.
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

from qwenjax.inference.generate import StopStrings, compiled_draft_vocab, draft_vocab_ids, eos_ids, new_cache
from qwenjax.inference.grammar import GrammarBackend, GrammarMatcher
from qwenjax.inference.sampling import RowSampling
from qwenjax.inputs import vision_inputs, vision_positions
from qwenjax.model.qwen35 import NO_MTP
from qwenjax.serve.programs import MIN_CHUNK, STOP_IDS, Programs, neutral, seed_words
from qwenjax.serve.prefix_cache import PrefixCache
from qwenjax.serve.request import (Finished, QueueFull, Request, Tokens, check_request, compiled_top,
                                   logprobs_entry, send)
from qwenjax.sharding import activation_sharding
from qwenjax.validate import InputError

__all__ = ["Engine", "Finished", "QueueFull", "Request", "Stats", "Tokens"]  # requests and events come from here too

@dataclasses.dataclass(eq=False)
class _Row:
    request: Request
    done: int                  # prompt tokens in the cache
    cached: int                # of which restored from the prefix cache
    sampling: RowSampling      # the request's settings as the programs take them (one row, host arrays)
    seed: np.ndarray           # [1, 2] uint32
    stops: frozenset[int]
    stop_ids: np.ndarray       # [STOP_IDS] int32: the first stop ids, for verify passes (-1: none)
    stop_strings: StopStrings | None
    grammar: GrammarMatcher | None  # a constrained request's place in its grammar: the tokens it accepted
    generated: list[int] = dataclasses.field(default_factory=list)
    fed: int = 0               # generated tokens the cache holds (or will, once the dispatched steps ran)
    # tokens a verify pass kept past a stop string: the cache holds them, the request never sees them
    unsent: list[int] = dataclasses.field(default_factory=list)

    @property
    def decoding(self) -> bool:
        return self.done == len(self.request.prompt)


@dataclasses.dataclass
class Stats:
    """Counters for /metrics (read from other threads: plain ints; `requests` is written under the engine's lock,
    the rest only by the engine thread)."""
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
    `submit` queues a request (raises QueueFull past `max_queue`), `submit_all` several, all or none; `cancel`
    drops one; `stop()` ends the loop, finishing every request still queued or running as cancelled.

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
        self.programs = Programs(m, max_batch=max_batch, max_len=max_len, prefill_chunk=prefill_chunk, k=speculative)
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
        self._history = None  # the rows' TokenHistory, made when the first request with penalties comes
        self._grammars: GrammarBackend | None = None  # made when the first constrained request comes
        self._grammars_lock = threading.Lock()

    # ---- the public side (any thread) ----------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """InputError (or ValueError, for this engine's own setup) unless `request` can be served: every field's
        type and range, checked before it reaches the loop that serves everyone."""
        check_request(request, self.m.config, room=self.room, max_len=self.max_len, k=self.k,
                      tokenizer=self.tokenizer)
        if request.grammar is not None:  # compiled (and cached) now: a schema llguidance refuses is a 400
            self.grammars.compile(request.grammar, request.thinking_open)

    @property
    def grammars(self) -> GrammarBackend:
        """The engine's constrained-decoding backend (the tokenizer as llguidance reads it, compiled grammars)."""
        with self._grammars_lock:
            if self._grammars is None:
                if self.tokenizer is None:
                    raise ValueError("constrained decoding needs the engine's tokenizer (Engine(tokenizer=...))")
                self._grammars = GrammarBackend(self.tokenizer, self.m.config.vocab_size, sorted(self.eos))
            return self._grammars

    def submit(self, request: Request) -> Request:
        """Queues `request` (checked: `check`); QueueFull when `max_queue` requests wait already."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: Sequence[Request]) -> list[Request]:
        """Queues every one of `requests` or none: QueueFull when they do not fit the queue now, InputError when
        they never could (more than `max_queue` at once) or one is bad (naming it, when there are several)."""
        requests = list(requests)
        if len(requests) > self.max_queue:
            raise InputError(f"{len(requests)} requests at once can never fit this server's queue of "
                             f"{self.max_queue} (--max-queue); send at most {self.max_queue}")
        for i, request in enumerate(requests):
            try:
                self.check(request)
            except InputError as e:
                raise InputError(f"request {i} of {len(requests)}: {e}" if len(requests) > 1 else str(e)) from None
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._queue) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting already (the server's queue limit is "
                                f"{self.max_queue}{f'; these are {len(requests)}' if len(requests) > 1 else ''})")
            self._queue.extend(requests)
            self._lock.notify()
        return requests

    def cancel(self, request: Request) -> None:
        """Ends `request`: at once when it waits in the queue (it leaves it), else at the loop's next turn."""
        request.cancelled = True
        with self._lock:
            queued = request in self._queue
            if queued:
                self._queue.remove(request)
                self.stats.requests["cancelled"] += 1
            self._lock.notify()
        if queued:
            send(request, Finished("cancelled", len(request.prompt), 0, 0))

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
                self._cache, self._drafts, self._last = self.programs.warmup(self._params, self._cache, self._drafts,
                                                                             self._last, self._vocab)
        self._thread = threading.Thread(target=self._run, name="qwenjax-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _new_cache(self) -> None:
        self._cache = new_cache(self.m, self.max_batch, self.max_len, mtp=self.k > 0)
        self._last = jnp.zeros(self.max_batch, jnp.int32)
        self._pending = None
        self._history = None  # a failed program may have consumed it; the next request with penalties makes one
        if self.k:
            self._drafts = (jnp.zeros((self.max_batch, self.k), jnp.int32),
                            jnp.zeros((self.max_batch, self.k, self.m.config.vocab_size), jnp.float32))

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
            self.stats.requests["cancelled"] += len(waiting)
        for request in waiting:
            send(request, Finished("cancelled", len(request.prompt), 0, 0))

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
        # row's token counters and limits from what came before, and a constrained row's mask follows the tokens
        # it sampled: then the host reads everything before the step.
        synchronous = self.k or any(row is not None and row.grammar is not None for row in self._rows)
        if synchronous:
            if self._pending is not None:
                pending, self._pending = self._pending, None
                self._read_step(pending)
            if prefill is not None:
                self._read_prefill(prefill)
                prefill = None
        step = self._decode_step() if any(map(_stepping, self._rows)) else None
        ready, self._pending = (step, None) if synchronous else (self._pending, step)
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
                with self._lock:
                    self.stats.requests["cancelled"] += 1
                send(request, Finished("cancelled", len(request.prompt), 0, 0))
                continue
            r = self._rows.index(None)
            try:  # what the host prepares for one request fails that request alone
                row = self._prepare(request)
                if request.sampling.penalized:
                    prompt = np.zeros(self.m.config.vocab_size, bool)
                    prompt[np.asarray(request.prompt)] = True
                    history = self.programs.new_history() if self._history is None else self._history
                    self._history = self.programs.start_history(history, r, prompt)
            except Exception as e:
                traceback.print_exc()
                with self._lock:
                    self.stats.requests["error"] += 1
                send(request, Finished("error", len(request.prompt), 0, 0, f"{type(e).__name__}: {e}"))
                continue
            node = self.prefix_cache.root if request.pictures else self.prefix_cache.lookup(request.prompt)
            for i, n in enumerate(chain := node.chain()):
                self._cache = self.programs.put(i == len(chain) - 1)(self._cache, np.int32(r), n.snapshot,
                                                                     np.int32(n.start), np.int32(n.depth))
            row.done = row.cached = node.depth
            self._rows[r] = row
            self.stats.prompt_tokens += len(request.prompt)
            self.stats.cached_tokens += node.depth

    def _prepare(self, request: Request) -> _Row:
        """A row for `request`: its settings as host arrays, once (a batch then only stacks them)."""
        stops = request.stops(self.eos)
        stop_ids = np.full(STOP_IDS, -1, np.int32)
        first = sorted(stops)[:STOP_IDS]
        stop_ids[:len(first)] = first
        sampling = RowSampling.of([request.sampling], vocab_size=self.m.config.vocab_size,
                                  min_tokens=[request.min_tokens], stop_ids=[stops])
        matcher = StopStrings(self.tokenizer, request.stop_strings) if request.stop_strings else None
        grammar = None if request.grammar is None else self.grammars.matcher(request.grammar, request.thinking_open)
        return _Row(request, done=0, cached=0, sampling=sampling, seed=seed_words([request.seed]), stops=stops,
                    stop_ids=stop_ids, stop_strings=matcher, grammar=grammar)

    def _constrained(self, sampling: RowSampling, rows: Sequence[_Row | None], positions: int = 1,
                     drafts: np.ndarray | None = None) -> RowSampling:
        """`sampling` of a program's `rows` (None: padding) with each constrained row's token masks for the
        program's `positions` (1; a verify pass's k+1, over the row's `drafts`, as `fill_draft_bitmasks`); as it
        is when no row is constrained."""
        constrained = [(i, row) for i, row in enumerate(rows) if row is not None and row.grammar is not None]
        if not constrained:
            return sampling
        words = self.grammars.allocate_bitmask(len(rows) * positions)
        if positions == 1:
            self.grammars.fill_bitmasks(words, [(row.grammar, i) for i, row in constrained])
        else:
            for i, row in constrained:
                row.grammar.fill_draft_bitmasks(words, i * positions, drafts[i])
        return sampling.with_allowed(words.reshape(len(rows), positions, -1))

    def _chunk_end(self, row: _Row) -> int:
        """Where row's next prefill chunk ends: at most prefill_chunk tokens, at the next block boundary (a
        multiple of prefill_chunk) or snapshot point, or at the prompt's end."""
        n, done = len(row.request.prompt), row.done
        end = min(n, (done // self.prefill_chunk + 1) * self.prefill_chunk)
        return min([end] + [p for p in row.request.snapshot_at if done < p < end])

    def _history_for(self, sampling: RowSampling):
        return self._history if "penalties" in sampling.used else None

    def _keep_history(self, sampling: RowSampling, history) -> None:
        if "penalties" in sampling.used:
            self._history = history

    def _prefill_chunks(self, rs: list[int]) -> tuple:
        """Dispatches the next chunk of each row in `rs`, in one call (several rows: each a whole prompt from
        empty): what `_read_prefill` takes."""
        rows = [self._rows[r] for r in rs]
        requests = [row.request for row in rows]
        ends = [self._chunk_end(row) for row in rows]
        counts = [end - row.done for end, row in zip(ends, rows)]
        size = next(s for s in self.programs.chunk_sizes() if s >= max(counts))
        b = self.programs.step_rows(len(rs))
        index = np.full(b, self.max_batch, np.int32)  # padding rows: past the cache, dropped
        ids, n, next_id = np.zeros((b, size), np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32)
        ending = np.zeros(b, bool)
        for i, (r, row, end) in enumerate(zip(rs, rows, ends)):
            index[i], n[i] = r, end - row.done
            ids[i, :n[i]] = row.request.prompt[row.done:end]
            next_id[i] = row.request.prompt[end] if end < len(row.request.prompt) else 0
            ending[i] = end == len(row.request.prompt)
        pad = b - len(rs)
        sampling = RowSampling.stack([row.sampling for row in rows] + ([neutral(pad)] if pad else []))
        sampling = self._constrained(sampling, [row if e else None for row, e in zip(rows, ending)] + [None] * pad)
        reset, final = rows[0].done == 0, ends[0] == len(requests[0].prompt)
        tokens, logprobs, self._cache, self._drafts, self._last, history = self.programs.prefill(
            b, size, self.programs.horizon(size if reset else ends[0]), reset, sampling.used,
            top=compiled_top(requests), final=final or not self.k)(
            self._params, self._cache, self._drafts, self._last, self._vocab, index, ids, n, next_id, sampling,
            np.concatenate([row.seed for row in rows] + [np.zeros((pad, 2), np.uint32)]), np.zeros(b, np.uint32),
            ending, self._history_for(sampling))
        self._keep_history(sampling, history)
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
            self._emit_safely(r, row, [int(tokens[i])], lambda: [logprobs_entry(logprobs, i, row.request)])

    def _prefill_pictures(self, rs: list[int]) -> tuple | None:
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
        try:  # the pictures' host work fails this request alone
            vision = vision_inputs(self.m.config, ids, mask, **request.pictures)
            positions, deltas = vision_positions(self.m.config, ids, mask, vision)
        except Exception as e:
            traceback.print_exc()
            self._finish(r, "error", error=f"{type(e).__name__}: {e}")
            return None
        grids = (vision.image_grid_thw, vision.video_grid_thw)
        sampling = self._constrained(row.sampling, [row])
        token, logprobs, self._cache, self._drafts, self._last, history = self.programs.prefill(
            1, size, self.programs.horizon(size), True, sampling.used, grids, top=compiled_top([request]))(
            self._params, self._cache, self._drafts, self._last, self._vocab, np.array([r], np.int32), ids,
            np.array([n], np.int32), np.zeros(1, np.int32), sampling, row.seed, np.zeros(1, np.uint32),
            np.ones(1, bool), self._history_for(sampling),
            (positions, deltas, vision.pixel_values, vision.pixel_values_videos))
        self._keep_history(sampling, history)
        row.done = n
        self.stats.prefilled_tokens += n
        return token, logprobs, [(0, r, row)]

    def _decode_step(self) -> tuple:
        """Dispatches a decode step for every decoding row: (its outputs, the rows it ran), to `_read_step`."""
        decoding = [r for r, row in enumerate(self._rows) if _stepping(row)]
        b = self.programs.step_rows(max(decoding) + 1)
        # the step writes each row's token at slot (its length): prompt + tokens fed so far; a verify pass k more,
        # and the head's draft steps k - 1 past those (written, where they fit the horizon, for better drafts)
        horizon = self.programs.horizon(max(len(self._rows[r].request.prompt) + self._rows[r].fed + 1
                                            for r in decoding) + 2 * self.k)
        active, counters = np.zeros(b, bool), np.zeros(b, np.uint32)
        parts, seeds = [neutral(1)] * b, np.zeros((b, 2), np.uint32)
        # a verify pass keeps no token past a row's max_tokens or a stop id (up to STOP_IDS of them)
        limit, stop_ids = np.ones(b, np.int32), np.full((b, STOP_IDS), -1, np.int32)
        for r in decoding:
            row = self._rows[r]
            # the row's token index: its tokens so far, with the one the step in flight samples (no speculation)
            active[r], counters[r] = True, row.fed + 1
            parts[r], seeds[r], stop_ids[r] = row.sampling, row.seed[0], row.stop_ids
            limit[r] = row.request.max_tokens - len(row.generated)
            row.fed += 1
        sampling = RowSampling.stack(parts)
        stepped = [self._rows[r] if r in decoding else None for r in range(b)]
        if self.k and any(row is not None and row.grammar is not None for row in stepped):
            # each row's drafts (what the verify pass checks) from the last step: the host reads them here
            sampling = self._constrained(sampling, stepped, self.k + 1, np.asarray(self._drafts[0]))
        else:
            sampling = self._constrained(sampling, stepped)
        top = compiled_top([self._rows[r].request for r in decoding])
        *out, self._cache, self._drafts, self._last, history = self.programs.step(b, horizon, sampling.used, top)(
            self._params, self._cache, self._drafts, self._last, self._vocab, active, sampling, seeds, counters,
            limit, stop_ids, self._history_for(sampling))
        self._keep_history(sampling, history)
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
            self._emit_safely(r, row, new[r, :n].tolist(),
                              lambda: [logprobs_entry(logprobs, (r, j), row.request) for j in range(n)])

    def _emit_safely(self, r: int, row: _Row, ids: list[int], logprobs: Callable[[], list]) -> None:
        """`_emit`, where a failure on the host (reading the row's text, its log-probabilities) ends row r alone."""
        try:
            self._emit(r, ids, logprobs())
        except Exception as e:
            traceback.print_exc()
            if self._rows[r] is row:
                self._finish(r, "error", error=f"{type(e).__name__}: {e}")

    def _emit(self, r: int, ids: list[int], logprobs: list | None = None) -> None:
        """Hands row r's new tokens to its request (each with its `logprobs_entry`), up to and including the first
        that ends it: a stop id, a stop string (past min_tokens) or its length; then finishes the row."""
        row = self._rows[r]
        request = row.request
        reason = None
        for i, t in enumerate(ids):
            row.generated.append(t)
            # every token is read; a stop string counts only when it ends past min_tokens (vLLM's rule)
            stopped = row.stop_strings is not None and row.stop_strings.add(
                t, check=len(row.generated) > request.min_tokens)
            if row.grammar is not None:
                if not row.grammar.accept(t):  # the mask allowed only what the grammar takes: a bug, this row's
                    raise RuntimeError(f"token {t} at reply position {len(row.generated) - 1} is not one the "
                                       f"grammar ({request.grammar.kind}) allows")
                stopped = stopped or row.grammar.terminated  # complete: the reply ends here
            if t in row.stops or stopped:
                reason = "stop"
            elif len(row.generated) >= request.max_tokens:
                reason = "length"
            if reason:
                row.unsent, ids = ids[i + 1:], ids[:i + 1]
                break
        self.stats.generated_tokens += len(ids)
        self.stats.recent.append((time.monotonic(), len(ids)))
        asked = logprobs is not None and request.logprobs is not None
        send(request, Tokens(ids, [e for entry in logprobs[:len(ids)] for e in entry] if asked else None))
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
        with self._lock:
            self.stats.requests[reason] += 1
        send(row.request, Finished(reason, len(row.request.prompt), row.cached, len(row.generated), error))

    def _snapshot(self, r: int, tokens: Sequence[int]) -> None:
        def take(start: int, end: int):
            size = max(MIN_CHUNK, 1 << math.ceil(math.log2(end - start)))
            return self.programs.take(size)(self._cache, np.int32(r), np.int32(start))

        self.prefix_cache.insert(tokens, take)


def _stepping(row: _Row | None) -> bool:
    """The row takes the next decode step: its prompt is in the cache (so its first token is sampled, perhaps
    not yet read), and it has tokens left to sample (with steps in flight, its last may be sampled already).
    A row whose first token turns out to end it was stepped once for nothing, as one ending on eos later is."""
    return row is not None and row.decoding and row.fed < row.request.max_tokens - 1
