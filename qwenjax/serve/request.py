"""What the serving engine takes and gives: a `Request`, its events (`Tokens`, then one `Finished`), and the
checks a request passes before it is queued (`check_request`), so that nothing in it can fail the loop that
serves every row."""

from __future__ import annotations

import dataclasses
import time
import traceback
from typing import Callable, Sequence

import numpy as np

from qwenjax.inference.generate import MAX_SEED
from qwenjax.inference.grammar import GrammarSpec
from qwenjax.inference.sampling import SamplingParams
from qwenjax.inputs import vision_inputs
from qwenjax.validate import InputError, check, check_range

TOP_LOGPROBS = (0, 5, 20)  # compiled numbers of alternatives a request's `logprobs` rounds up to


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
    stop_token_ids: frozenset[int] | None = None  # these end it; default: the model's eos tokens
    min_tokens: int = 0       # no stop token id (masked out) and no stop string ends it before this many tokens
    ignore_eos: bool = False  # with stop_token_ids None: no token id ends it
    snapshot_at: tuple[int, ...] = ()
    # images and videos of the prompt, as the processor gives them: pixel_values, image_grid_thw,
    # pixel_values_videos, video_grid_thw. Such a prompt prefills in one call and skips the prefix cache (its
    # tokens alone do not say which pictures they hold).
    pictures: dict | None = None
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (0-20)
    # constrained decoding: every token the grammar allows (`qwenjax.inference.grammar`); the request ends where
    # the grammar is complete. `thinking_open`: the prompt opened a <think> block, the constraint starts after it.
    grammar: GrammarSpec | None = None
    thinking_open: bool = False
    cancelled: bool = False  # set by `Engine.cancel`; the row is freed at the next turn
    arrived: float = dataclasses.field(default_factory=time.monotonic)

    def stops(self, eos: frozenset[int]) -> frozenset[int]:
        """The token ids that end this request, given the model's `eos`."""
        if self.stop_token_ids is not None:
            return frozenset(self.stop_token_ids)
        return frozenset() if self.ignore_eos else eos




def check_request(request: Request, config, *, room: int, max_len: int, k: int, tokenizer) -> None:
    """InputError (or ValueError, for the engine's own setup) unless `request` can be served by an engine of model
    `config` whose rows hold `room` prompt and generated tokens (`max_len` slots less `k` speculative ones), with
    `tokenizer` (None: no stop strings): every field's type and range."""
    vocab = config.vocab_size
    if not isinstance(request.sampling, SamplingParams):
        raise InputError(f"sampling must be a SamplingParams, got {type(request.sampling).__name__}")
    request.sampling.check_vocab(vocab)
    prompt = np.asarray(request.prompt)
    if prompt.ndim != 1 or prompt.size == 0 or not (np.issubdtype(prompt.dtype, np.integer) and
                                                     prompt.dtype != bool):
        raise InputError("the prompt must be a non-empty list of token ids"
                         + (" (it is empty: generation needs at least one prompt token)" if prompt.size == 0
                            else ""))
    bad = np.flatnonzero((prompt < 0) | (prompt >= vocab))
    if bad.size:
        raise InputError(f"prompt token {bad[0]} is {prompt[bad[0]]}, not a token id (vocab_size={vocab})")
    n = prompt.size
    check_range(check(request.max_tokens, int, "max_tokens"), "max_tokens", minimum=1)
    check_range(check(request.min_tokens, int, "min_tokens"), "min_tokens", minimum=0,
                maximum=request.max_tokens)
    check_range(check(request.seed, int, "seed"), "seed", minimum=0, maximum=MAX_SEED)
    check(request.ignore_eos, bool, "ignore_eos")
    if request.logprobs is not None and not (isinstance(request.logprobs, int) and
                                             0 <= request.logprobs <= TOP_LOGPROBS[-1]):
        raise InputError(f"logprobs={request.logprobs}: must be in [0, {TOP_LOGPROBS[-1]}]")
    stops = check(request.stop_strings, tuple[str, ...], "stop_strings")
    if any(not s for s in stops):
        raise InputError("stop_strings: a stop string is empty")
    if stops and tokenizer is None:
        raise ValueError("stop strings need the engine's tokenizer (Engine(tokenizer=...))")
    if request.stop_token_ids is not None:
        ids = check(tuple(request.stop_token_ids) if isinstance(request.stop_token_ids, (set, frozenset))
                    else request.stop_token_ids, tuple[int, ...], "stop_token_ids")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InputError(f"stop_token_ids: {bad} is not a token id (vocab_size={vocab})")
    check(request.snapshot_at, tuple[int, ...], "snapshot_at")
    if request.grammar is not None:
        if not isinstance(request.grammar, GrammarSpec):
            raise InputError(f"grammar must be a GrammarSpec, got {type(request.grammar).__name__}")
        check(request.thinking_open, bool, "thinking_open")
        # a constrained reply ends where its grammar is complete: nothing may hold eos back there
        for name, value in (("min_tokens", request.min_tokens), ("ignore_eos", request.ignore_eos)):
            if value:
                raise InputError(f"{name}={value} cannot be combined with a constrained reply "
                                 f"({request.grammar.field}: {request.grammar.kind}), which ends where its grammar "
                                 "is complete")
    if n + request.max_tokens > room:
        raise InputError(f"the prompt has {n} tokens; with max_tokens={request.max_tokens} it needs "
                         f"{n + request.max_tokens + k} cache slots"
                         f"{f' (with {k} speculative tokens)' if k else ''}, but a row holds "
                         f"{max_len} (the server's --max-len)")
    if request.pictures:
        ids = prompt.astype(np.int32)[None]
        try:  # the pad tokens must match the pictures: checked here, not in the loop that serves everyone
            vision_inputs(config, ids, np.ones_like(ids), **request.pictures)
        except (ValueError, TypeError) as e:
            raise InputError(str(e)) from None


def compiled_top(requests: Sequence[Request]) -> int | None:
    """The compiled number of alternatives that serves every request's `logprobs` (None: none asks)."""
    asked = [q.logprobs for q in requests if q.logprobs is not None]
    return None if not asked else next(k for k in TOP_LOGPROBS if k >= max(asked))


def logprobs_entry(out, at, request: Request):
    """The entry at `at` (a row, or (row, token)) of a program's logprobs output, as `Tokens.logprobs` holds it
    (None unless asked)."""
    if out is None or request.logprobs is None:
        return None
    chosen, ids, lps = (np.asarray(x)[at] for x in out)
    return [(float(chosen), [(int(i), float(lp)) for i, lp in zip(ids[:request.logprobs],
                                                                   lps[:request.logprobs])])]


def send(request: Request, event: Tokens | Finished) -> None:
    """Delivers an event; a receiver that fails (a client gone) cancels its request, never the engine."""
    try:
        request.on_event(event)
    except Exception:
        traceback.print_exc()
        request.cancelled = True
