"""What the engine's events become over HTTP: each choice's text as it grows (stop strings, reasoning and tool calls
split off), OpenAI's response and stream chunk bodies, and the Prometheus text of /metrics."""

from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from qwenjax.inference.tokenizer import StreamDecoder
from qwenjax.serve.engine import Engine, Finished, Request, Tokens
from qwenjax.serve.errors import error_response
from qwenjax.serve.reply_parser import ReplyParser, collect


class StopScan:
    """Finds stop strings in a text that grows, each new character costing O(1) amortized per stop string
    (Knuth-Morris-Pratt): a reply is scanned once, however long the stop strings and however it is streamed."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.fail = [_failure(s) for s in stops]
        self.state = [0] * len(stops)  # per stop: the length of its longest prefix the text ends with
        self.scanned = 0

    def feed(self, text: str, after: int = 0) -> int | None:
        """Scans `text`'s characters past those already scanned; returns where the first stop string to be
        completed begins (the earliest-ending match; of those ending together, the longest), else None. A match
        ending at or before character `after` does not count (vLLM's min_tokens: none within the first tokens)."""
        best = None  # (end, -length, start)
        for j, (s, fail) in enumerate(zip(self.stops, self.fail)):
            k = self.state[j]
            for at in range(self.scanned, len(text)):
                ch = text[at]
                while k and s[k] != ch:
                    k = fail[k - 1]
                if s[k] == ch:
                    k += 1
                if k == len(s):
                    k = fail[k - 1]
                    if at + 1 > after:
                        best = min(best or (at, 0, 0), (at, -len(s), at + 1 - len(s)))
                        break
            self.state[j] = k
        self.scanned = len(text)
        return None if best is None else best[2]

    @property
    def partial(self) -> int:
        """The most characters at the text's end that may begin a stop string (held back while streaming)."""
        return max(self.state, default=0)


def _failure(s: str) -> list[int]:
    """KMP's table: fail[i], the longest proper prefix of s[:i+1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class TextChoice:
    """A completion's text as it grows: stop strings cut off (and what may begin one held back while streaming).
    With `echo` (the prompt's text, its tokens' (id, log-probability, alternatives), the first's None, and where
    each token begins in the text), the prompt comes first in the text and its tokens first in the logprobs."""

    def __init__(self, tokenizer, stops: tuple[str, ...], echo: tuple[str, list, list[int]] | None = None,
                 min_tokens: int = 0):
        self.tokenizer, self.decoder, self.scan = tokenizer, StreamDecoder(tokenizer), StopScan(stops)
        self.min_tokens, self.guard = min_tokens, 0  # stop strings count past the min_tokens-th token's text
        self.text, self.sent, self.stopped = "", 0, False
        self.logprobs: list[tuple[int, float | None, list | None]] = []  # (token, log-probability, alternatives)
        self.offsets: list[int] = []  # where each token's text begins in the reply's text
        self.logprobs_sent = 0
        self.prefix = ""
        self.tokens = 0  # tokens generated so far
        self.extra: dict = {}  # fields of the choice's final entry besides OpenAI's (vLLM's prompt_logprobs)
        if echo is not None:
            self.prefix, entries, offsets = echo
            self.logprobs, self.offsets = list(entries), list(offsets)

    def push(self, ids: list[int], logprobs=None) -> None:
        if self.stopped:
            self.tokens += len(ids)
            return
        for t in ids:
            self.offsets.append(len(self.prefix) + len(self.text))
            self.text += self.decoder.push(t)
            self.tokens += 1
            if self.tokens <= self.min_tokens:
                self.guard = len(self.text)
        for t, (lp, top) in zip(ids, logprobs or ()):
            self.logprobs.append((t, lp, top))
        at = self.scan.feed(self.text, self.guard)
        if at is not None:
            self.text, self.stopped = self.text[:at], True

    def new_text(self, final: bool) -> str:
        hold = 0 if final or self.stopped else self.scan.partial
        piece = self.text[self.sent:len(self.text) - hold]
        self.sent += len(piece)
        return piece

    def delta(self, final: bool) -> dict | None:
        piece = self.new_text(final)
        return {"text": piece} if piece else None

    def message(self) -> dict:
        return {"text": self.prefix + self.text}

    def take_logprobs(self) -> list[tuple[int, float, list, int]]:
        """The log-probabilities not yet sent, each with its token's text offset."""
        start, self.logprobs_sent = self.logprobs_sent, len(self.logprobs)
        return [(*e, at) for e, at in zip(self.logprobs[start:], self.offsets[start:])]

    def logprobs_json(self, entries) -> dict:
        """OpenAI's completions form: tokens, token_logprobs, top_logprobs, text_offset."""
        token = lambda t: self.tokenizer.decode([t], skip_special_tokens=False)
        return {"tokens": [token(t) for t, *_ in entries], "token_logprobs": [lp for _, lp, _, _ in entries],
                "top_logprobs": [None if top is None else {token(i): a for i, a in top} for _, _, top, _ in entries],
                "text_offset": [at for *_, at in entries]}


class ChatChoice(TextChoice):
    """A chat reply as it grows: reasoning, content and tool calls split (`parallel_tool_calls=False`: the first
    call only)."""

    def __init__(self, tokenizer, stops, opened_thinking: bool, tools, parallel_tool_calls: bool = True,
                 min_tokens: int = 0):
        super().__init__(tokenizer, stops, min_tokens=min_tokens)
        self.parser = ReplyParser(opened_thinking, tools, parse_tools=bool(tools))
        self.one_call = not parallel_tool_calls
        self.deltas: list = []
        self.role_sent = False
        self.calls_sent = 0

    def delta(self, final: bool) -> list[dict]:
        piece = self.new_text(final)
        new = self.parser.feed(piece) + (self.parser.finish() if final else [])
        if self.one_call:
            calls = sum(d.tool_call is not None for d in self.deltas)
            new = [d for d in new if d.tool_call is None or (calls := calls + 1) == 1]
        self.deltas += new
        out = []
        if not self.role_sent:
            out.append({"role": "assistant", "content": ""})
            self.role_sent = True
        for d in new:
            if d.tool_call is not None:
                out.append({"tool_calls": [d.tool_call.openai(self.calls_sent)]})
                self.calls_sent += 1
            elif d.reasoning:
                out.append({"reasoning_content": d.reasoning})
            elif d.content:
                out.append({"content": d.content})
        return out

    def logprobs_json(self, entries) -> dict:
        """OpenAI's chat form: content, a {token, logprob, bytes, top_logprobs} per token."""
        def one(t: int, lp: float) -> dict:
            text = self.tokenizer.decode([t], skip_special_tokens=False)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {"content": [{**one(t, lp), "top_logprobs": [one(i, a) for i, a in top]} for t, lp, top, _ in entries]}

    def message(self) -> dict:
        reasoning, content, calls = collect(self.deltas)
        msg = {"role": "assistant", "content": content or (None if calls else ""),
               "reasoning_content": reasoning or None}
        if calls:
            msg["tool_calls"] = [c.openai() for c in calls]
        return msg


class Inbox:
    """One HTTP request's engine events, (choice index, event), handed from the engine thread to the event loop.
    A wakeup of the loop is scheduled only when none is pending, so a busy step costs one, not one per token."""

    def __init__(self, engine: Engine):
        self.engine, self.loop = engine, asyncio.get_running_loop()
        self.requests: list[Request] = []
        self.items: collections.deque = collections.deque()
        self.ready = asyncio.Event()
        self.scheduled = False

    def post(self, item) -> None:  # the engine thread
        self.items.append(item)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self.scheduled = False
        self.ready.set()

    async def events(self):
        """(choice index, event) until every choice has finished."""
        remaining = len(self.requests)
        while remaining:
            while not self.items:
                self.ready.clear()
                await self.ready.wait()
            i, event = self.items.popleft()
            remaining -= isinstance(event, Finished)
            yield i, event

    def cancel(self) -> None:
        for request in self.requests:
            self.engine.cancel(request)


async def respond(http: HTTPRequest, body, inbox: Inbox, choices, kind: str, model_name: str):
    rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    finished: list[Finished | None] = [None] * len(inbox.requests)

    async def events():
        async for i, event in inbox.events():
            if isinstance(event, Finished):
                finished[i] = event
            yield i, event

    def reason(i: int) -> str:
        f = finished[i]
        if f.reason == "stop" or choices[i].stopped:
            calls = getattr(getattr(choices[i], "parser", None), "calls", 0)
            return "tool_calls" if calls else "stop"
        return {"length": "length", "cancelled": "abort", "error": "error"}[f.reason]

    def usage() -> dict:
        prompt = sum(f.prompt_tokens for f in finished[::body.choices])
        completion = sum(f.completion_tokens for f in finished)
        cached = sum(f.cached_tokens for f in finished[::body.choices])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def usage_so_far() -> dict:  # stream_options.continuous_usage_stats: every chunk
        prompt = sum(len(q.prompt) for q in inbox.requests[::body.choices])
        completion = sum(c.tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    options = body.stream_options
    include_usage = bool(options and options.include_usage)
    continuous_usage = bool(options and options.continuous_usage_stats)

    def chunk(choice_list, with_usage=None) -> str:
        obj = {"id": rid, "object": f"{kind}.chunk" if kind == "chat.completion" else kind, "created": created,
               "model": model_name, "choices": choice_list}
        if with_usage is None and continuous_usage and choice_list:
            with_usage = usage_so_far()
        if with_usage is not None:
            obj["usage"] = with_usage
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    if not body.streamed:
        async def watch():  # a client gone while it waits: its rows are freed at the engine's next turn
            while not await http.is_disconnected():
                await asyncio.sleep(1.0)
            inbox.cancel()

        watcher = asyncio.create_task(watch())
        try:
            async for i, event in events():
                if isinstance(event, Tokens):
                    choices[i].push(event.ids, event.logprobs)
        finally:
            watcher.cancel()
            inbox.cancel()
        errors = [f.error for f in finished if f.reason == "error"]
        if errors:
            return error_response(500, f"generation failed: {errors[0]}", kind="server_error")
        out = []
        for i, c in enumerate(choices):
            c.delta(final=True)
            entry = {"index": i, "finish_reason": reason(i), "logprobs": (
                c.logprobs_json(c.take_logprobs()) if body.top_alternatives is not None else None)}
            if kind == "chat.completion":
                entry["message"] = c.message()
            else:
                entry["text"] = c.message()["text"]
            out.append({**entry, **c.extra})
        return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": out,
                "usage": usage()}


    def logprobs_of(i: int) -> dict | None:
        """Choice i's log-probabilities not yet sent, in the chunk about to go (None unless asked)."""
        if body.top_alternatives is None:
            return None
        entries = choices[i].take_logprobs()
        return choices[i].logprobs_json(entries) if entries else None

    async def stream():
        try:
            async for i, event in events():
                final = isinstance(event, Finished)
                if not final:
                    choices[i].push(event.ids, event.logprobs)
                deltas = choices[i].delta(final)
                for d in (deltas if isinstance(deltas, list) else [deltas] if deltas else []):
                    logprobs = logprobs_of(i)
                    if kind == "chat.completion":
                        yield chunk([{"index": i, "delta": d, "logprobs": logprobs, "finish_reason": None}])
                    else:
                        yield chunk([{"index": i, **d, "logprobs": logprobs, "finish_reason": None}])
                if final:
                    end = {"index": i, "finish_reason": reason(i), "logprobs": logprobs_of(i)}
                    end.update({"delta": {}} if kind == "chat.completion" else {"text": ""})
                    yield chunk([end])
            if include_usage:
                yield chunk([], usage())
            yield "data: [DONE]\n\n"
        finally:  # a client gone mid-stream: its rows are freed at the engine's next turn
            inbox.cancel()

    return StreamingResponse(stream(), media_type="text/event-stream")


def metrics_text(engine: Engine, refused: int) -> str:
    s, cache = engine.stats, engine.prefix_cache
    lines = []

    def metric(name: str, kind: str, help_text: str, value, labels: str = ""):
        if not any(line.startswith(f"# HELP {name} ") for line in lines):
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.append(f"{name}{labels} {value}")

    for reason_name in ("stop", "length", "cancelled", "error"):
        metric("qwenjax_requests_total", "counter", "Requests finished, by reason.", s.requests[reason_name],
               f'{{reason="{reason_name}"}}')
    metric("qwenjax_requests_refused_total", "counter", "Requests refused with 429 (queue full).", refused)
    metric("qwenjax_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", s.prompt_tokens)
    metric("qwenjax_prefill_tokens_total", "counter", "Prompt tokens prefilled (not restored from the prefix "
           "cache).", s.prefilled_tokens)
    metric("qwenjax_cached_prompt_tokens_total", "counter", "Prompt tokens restored from the prefix cache.",
           s.cached_tokens)
    metric("qwenjax_generation_tokens_total", "counter", "Tokens generated.", s.generated_tokens)
    metric("qwenjax_generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
           f"{s.tokens_per_second():.3f}")
    metric("qwenjax_decode_steps_total", "counter", "Batched decode steps run.", s.decode_steps)
    if engine.k:
        metric("qwenjax_spec_decode_draft_tokens_total", "counter", "Draft tokens verified (speculative decoding).",
               s.drafted_tokens)
        metric("qwenjax_spec_decode_accepted_tokens_total", "counter", "Draft tokens accepted.", s.accepted_tokens)
    metric("qwenjax_queue_length", "gauge", "Requests waiting for a row.", engine.queue_length)
    metric("qwenjax_running_rows", "gauge", "Rows holding a request.", engine.running)
    metric("qwenjax_max_rows", "gauge", "Rows of the batched cache (--max-batch).", engine.max_batch)
    metric("qwenjax_prefix_cache_lookups_total", "counter", "Prefix cache lookups.", cache.lookups)
    metric("qwenjax_prefix_cache_hits_total", "counter", "Prefix cache lookups that restored a prefix.", cache.hits)
    metric("qwenjax_prefix_cache_hit_rate", "gauge", "Prefix cache hits / lookups.",
           f"{cache.hits / cache.lookups if cache.lookups else 0.0:.4f}")
    metric("qwenjax_prefix_cache_bytes", "gauge", "Memory held by prefix cache snapshots.", cache.nbytes)
    metric("qwenjax_prefix_cache_entries", "gauge", "Prefix cache snapshots.", len(cache))
    return "\n".join(lines) + "\n"
