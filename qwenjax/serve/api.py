"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI): /v1/chat/completions, /v1/completions (streamed
as server-sent events or not), /v1/models, /health, /metrics (Prometheus text).

Errors have OpenAI's body, {"error": {"message", "type", "param", "code"}}: a bad request is a 400 naming the
field, an unknown model a 404, a full queue a 429. Sampling settings a request leaves out come from the
checkpoint's generation_config.json, as `qwenjax generate` takes them.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import io
import os
import json
import tempfile
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from qwenjax.inference.generate import MAX_SEED
from qwenjax.inference.sampling import SamplingParams, with_checkpoint_defaults
from qwenjax.inference.tokenizer import THINK_OPEN, StreamDecoder
from qwenjax.serve.engine import Engine, Finished, QueueFull, Request, Tokens
from qwenjax.serve.prefix_cache import chat_snapshot_points
from qwenjax.serve.reply_parser import ReplyParser, collect
from qwenjax.validate import InputError


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


class _Sampling(BaseModel):
    """The fields both endpoints share. Unknown fields are ignored (clients send their own extras)."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1)  # -1 and 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    n: StrictInt = Field(1, ge=1, le=16)
    stream: StrictBool = False
    stream_options: dict | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = Field(None, ge=0, le=20)  # the chosen tokens' and this many alternatives'

    @property
    def top_alternatives(self) -> int | None:
        return self.logprobs


class ChatBody(_Sampling):
    messages: list[dict] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    chat_template_kwargs: dict | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)

    @property
    def top_alternatives(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


def create_app(engine: Engine, tokenizer, model_name: str, *, processor=None,
               allowed_local_media_path: str | None = None) -> FastAPI:
    """The app serving `engine` (started and stopped with the app) under the model name `model_name`. With a
    `processor` (`qwenjax.inference.processor.load_processor`) chat messages may hold images: base64 data URLs,
    or files under `allowed_local_media_path`."""
    pictures = _Pictures(processor, allowed_local_media_path)
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not engine.started:
            await asyncio.to_thread(engine.start)
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="qwenjax", lifespan=lifespan)
    refused = {"count": 0}
    started = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid')}"
                           f" (got {json.dumps(first.get('input'), default=str)[:200]})", where)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        if exc.status == 429:
            refused["count"] += 1
        return _error(exc.status, exc.message, exc.param, exc.kind)

    @app.get("/health")
    async def health():
        alive = engine.alive
        return JSONResponse({"status": "ok" if alive else "stopped"}, status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "qwenjax", "max_model_len": engine.max_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_metrics(engine, refused["count"]))

    def sampling_of(body: _Sampling) -> tuple[SamplingParams, int]:
        top_k = body.top_k if body.top_k is None or body.top_k >= 0 else 0
        try:
            params = SamplingParams(**with_checkpoint_defaults(
                engine.m.generation_config, temperature=body.temperature, top_k=top_k, top_p=body.top_p,
                min_p=body.min_p))
        except InputError as e:
            raise APIError(400, str(e)) from None
        seed = body.seed if body.seed is not None else uuid.uuid4().int & MAX_SEED
        return params, seed

    def check_model(body: _Sampling) -> None:
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")

    def stops_of(body: _Sampling) -> tuple[str, ...]:
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if any(not s for s in stops):
            raise APIError(400, "stop: a stop string is empty", "stop")
        return stops

    def submit(inbox: _Inbox, prompt: list[int], body: _Sampling, max_tokens: int | None, n: int,
               snapshot_at=(), arrays: dict | None = None) -> None:
        """n engine requests for `prompt`, their events (choice index, event) into `inbox`."""
        params, seed = sampling_of(body)
        room = engine.room - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this server's rows hold {engine.room} "
                                f"(--max-len{' less --speculative' if engine.k else ''}), which leaves no room for "
                                "a reply", "messages")
        try:
            for i in range(n):
                index = len(inbox.requests)
                inbox.requests.append(engine.submit(Request(
                    prompt=prompt, on_event=lambda ev, index=index: inbox.post((index, ev)),
                    max_tokens=max_tokens or room, sampling=params, seed=(seed + i) & MAX_SEED,
                    stop_strings=stops_of(body), snapshot_at=snapshot_at, pictures=arrays,
                    logprobs=body.top_alternatives)))
        except (QueueFull, InputError) as e:
            inbox.cancel()
            if isinstance(e, QueueFull):
                raise APIError(429, f"the server is busy: {e}; retry later", kind="rate_limit_error") from None
            raise APIError(400, str(e), "max_tokens" if "max_tokens" in str(e) else None) from None

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        check_model(body)
        prompts = body.prompt if isinstance(body.prompt, list) and body.prompt and not isinstance(
            body.prompt[0], int) else [body.prompt]
        token_prompts = []
        for i, p in enumerate(prompts):
            ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, f"prompt[{i}] is empty", "prompt")
            token_prompts.append(ids)
        inbox = _Inbox(engine)
        for ids in token_prompts:
            submit(inbox, ids, body, body.max_tokens or 16, body.n)
        stops = stops_of(body)
        choices = [_TextChoice(tokenizer, stops) for _ in inbox.requests]
        return await _respond(http, body, inbox, choices, "text_completion", model_name)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HTTPRequest):
        check_model(body)
        kwargs = dict(body.chat_template_kwargs or {})
        thinking_flag = kwargs.pop("enable_thinking", True)
        tools = None if body.tool_choice == "none" else body.tools
        scratch = tempfile.TemporaryDirectory(prefix="qwenjax-video-")  # videos sent as data URLs, while read
        try:
            messages = [_message(i, m, pictures, scratch.name) for i, m in enumerate(body.messages)]
            if any(isinstance(m["content"], list) for m in messages):  # the processor expands each picture
                text, arrays, _ = await asyncio.to_thread(pictures.processor.expand, messages, tools=tools,
                                                          enable_thinking=thinking_flag, **kwargs)
                prompt, snapshot_at = tokenizer.encode(text), ()
            else:
                arrays = None
                text = tokenizer.apply_chat_template(messages, tools=tools, enable_thinking=thinking_flag, **kwargs)
                prompt = tokenizer.encode(text)
                snapshot_at = chat_snapshot_points(tokenizer, messages, prompt, tools=tools,
                                                   enable_thinking=thinking_flag, **kwargs)
        except (ValueError, TypeError, ImportError) as e:  # ImportError: a video file and no PyAV
            raise APIError(400, f"messages: {e}", "messages") from None
        finally:
            scratch.cleanup()
        inbox = _Inbox(engine)
        submit(inbox, prompt, body, body.max_completion_tokens or body.max_tokens, body.n, snapshot_at, arrays)
        opened = text.rstrip().endswith(THINK_OPEN)
        choices = [_ChatChoice(tokenizer, stops_of(body), opened, tools) for _ in inbox.requests]
        return await _respond(http, body, inbox, choices, "chat.completion", model_name)

    return app


def _message(i: int, message: dict, pictures: _Pictures, scratch: str) -> dict:
    """An OpenAI message as the chat template takes it: text parts joined (or, with images or videos, parts the
    processor takes), tool-call arguments as objects. `scratch`: where videos sent as data URLs are written."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise APIError(400, f"messages[{i}] needs a string 'role'", f"messages[{i}].role")
    out = dict(message)
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                parts.append({"type": "image", "image": pictures.image(part.get("image_url"), where)})
            elif kind == "video_url":
                parts.append({"type": "video", "video": pictures.video(part.get("video_url"), where, scratch)})
            else:
                raise APIError(400, f"{where}: a {kind!r} part is not supported (text, image_url and video_url "
                                    "parts)", where)
        pictured = any(p["type"] != "text" for p in parts)
        out["content"] = parts if pictured else "".join(p["text"] for p in parts)
    elif content is None:
        out["content"] = ""
    elif not isinstance(content, str):
        raise APIError(400, f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content")
    calls = []
    for j, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise APIError(400, f"messages[{i}].tool_calls[{j}] needs function.name", f"messages[{i}].tool_calls")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise APIError(400, f"messages[{i}].tool_calls[{j}].function.arguments is not JSON",
                               f"messages[{i}].tool_calls") from None
        calls.append({**call, "function": {**function, "arguments": arguments}, **function, "arguments": arguments})
    if calls:
        out["tool_calls"] = calls
    return out


@dataclasses.dataclass
class _Pictures:
    """How image_url and video_url parts are read: data URLs always, local files only under `local_dir`
    (--allowed-local-media-path); `processor` is None for a model without a vision tower."""
    processor: Any = None
    local_dir: str | None = None

    def image(self, image_url, where: str):
        """The image of an image_url part: a PIL image (a data URL) or a file path."""
        url = self._url(image_url, "image_url", where)
        if url.startswith("data:"):
            try:
                from PIL import Image

                image = Image.open(io.BytesIO(self._data(url, "image/png", where)))
                image.load()
                return image
            except APIError:
                raise
            except Exception as e:  # PIL's UnidentifiedImageError, DecompressionBombError, ...
                raise APIError(400, f"{where}: not a readable image ({type(e).__name__}: {e})", where) from None
        return self._local(url, "image_url", where)

    def video(self, video_url, where: str, scratch: str):
        """The video of a video_url part, as the processor reads it: a video file or a directory of frame
        images under `local_dir`, or a data URL's video written to a file in `scratch` (the caller's temporary
        directory, removed once the processor has read it)."""
        url = self._url(video_url, "video_url", where)
        if not url.startswith("data:"):
            return self._local(url, "video_url", where)
        data = self._data(url, "video/mp4", where)
        path = os.path.join(scratch, f"video{len(os.listdir(scratch))}.{url[5:].split(';')[0].split('/')[-1]}")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def _url(self, part, kind: str, where: str) -> str:
        url = part.get("url") if isinstance(part, dict) else part
        if self.processor is None:
            raise APIError(400, f"{where}: this model takes no images or videos (its config has no vision_config)",
                           where)
        if not isinstance(url, str):
            raise APIError(400, f"{where}: {kind} needs a 'url' string", where)
        return url

    @staticmethod
    def _data(url: str, example: str, where: str) -> bytes:
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise APIError(400, f"{where}: a data URL must be base64 (data:{example};base64,...)", where)
        try:
            return base64.b64decode(data, validate=True)
        except ValueError as e:  # binascii.Error
            raise APIError(400, f"{where}: not a readable {example.split('/')[0]} (not base64: {e})", where) from None

    def _local(self, url: str, kind: str, where: str) -> str:
        path = url.removeprefix("file://")
        if self.local_dir is None or not os.path.isabs(path):
            raise APIError(400, f"{where}: {kind} must be a base64 data URL (URLs are not fetched; local files "
                                "need the server's --allowed-local-media-path)", where)
        path, root = os.path.realpath(path), os.path.realpath(self.local_dir)
        if os.path.commonpath([path, root]) != root:
            raise APIError(400, f"{where}: {url!r} is outside the server's --allowed-local-media-path", where)
        return path


class _TextChoice:
    """A completion's text as it grows: stop strings cut off (and what may begin one held back while streaming)."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.decoder, self.stops = tokenizer, StreamDecoder(tokenizer), stops
        self.text, self.sent, self.stopped = "", 0, False
        self.logprobs: list[tuple[int, float, list]] = []  # (token, log-probability, alternatives) per token
        self.logprobs_sent = 0

    def push(self, ids: list[int], logprobs=None) -> None:
        for t in ids:
            self.text += self.decoder.push(t)
        for t, (lp, top) in zip(ids, logprobs or ()):
            self.logprobs.append((t, lp, top))
        for s in self.stops:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True

    def new_text(self, final: bool) -> str:
        hold = 0 if final or self.stopped else max(
            (k for s in self.stops for k in range(len(s) - 1, 0, -1) if self.text.endswith(s[:k])), default=0)
        piece = self.text[self.sent:len(self.text) - hold]
        self.sent += len(piece)
        return piece

    def delta(self, final: bool) -> dict | None:
        piece = self.new_text(final)
        return {"text": piece} if piece else None

    def message(self) -> dict:
        return {"text": self.text}

    def take_logprobs(self) -> list[tuple[int, float, list]]:
        """The log-probabilities not yet sent."""
        new, self.logprobs_sent = self.logprobs[self.logprobs_sent:], len(self.logprobs)
        return new

    def logprobs_json(self, entries) -> dict:
        """OpenAI's completions form: tokens, token_logprobs, top_logprobs."""
        token = lambda t: self.tokenizer.decode([t], skip_special_tokens=False)
        return {"tokens": [token(t) for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{token(i): a for i, a in top} for _, _, top in entries]}


class _ChatChoice(_TextChoice):
    def __init__(self, tokenizer, stops, opened_thinking: bool, tools):
        super().__init__(tokenizer, stops)
        self.parser = ReplyParser(opened_thinking, tools, parse_tools=bool(tools))
        self.deltas: list = []
        self.role_sent = False
        self.calls_sent = 0

    def delta(self, final: bool) -> list[dict]:
        piece = self.new_text(final)
        new = self.parser.feed(piece) + (self.parser.finish() if final else [])
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

        return {"content": [{**one(t, lp), "top_logprobs": [one(i, a) for i, a in top]} for t, lp, top in entries]}

    def message(self) -> dict:
        reasoning, content, calls = collect(self.deltas)
        msg = {"role": "assistant", "content": content or (None if calls else ""),
               "reasoning_content": reasoning or None}
        if calls:
            msg["tool_calls"] = [c.openai() for c in calls]
        return msg


class _Inbox:
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


async def _respond(http: HTTPRequest, body: _Sampling, inbox: _Inbox, choices, kind: str, model_name: str):
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
        prompt = sum(f.prompt_tokens for f in finished[::max(body.n, 1)])
        completion = sum(f.completion_tokens for f in finished)
        cached = sum(f.cached_tokens for f in finished[::max(body.n, 1)])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def chunk(choice_list, with_usage=None) -> str:
        obj = {"id": rid, "object": f"{kind}.chunk" if kind == "chat.completion" else kind, "created": created,
               "model": model_name, "choices": choice_list}
        if with_usage is not None:
            obj["usage"] = with_usage
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    if not body.stream:
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
            return _error(500, f"generation failed: {errors[0]}", kind="server_error")
        out = []
        for i, c in enumerate(choices):
            c.delta(final=True)
            entry = {"index": i, "finish_reason": reason(i), "logprobs": (
                c.logprobs_json(c.take_logprobs()) if body.top_alternatives is not None else None)}
            if kind == "chat.completion":
                entry["message"] = c.message()
            else:
                entry["text"] = c.message()["text"]
            out.append(entry)
        return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": out,
                "usage": usage()}

    include_usage = bool((body.stream_options or {}).get("include_usage"))

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


def _metrics(engine: Engine, refused: int) -> str:
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
