"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI): /v1/chat/completions, /v1/completions (streamed
as server-sent events or not), /v1/models, /health, /metrics (Prometheus text).

Errors have OpenAI's body, {"error": {"message", "type", "param", "code"}}: a bad request is a 400 naming the
field, an unknown model a 404, a full queue a 429. Sampling settings a request leaves out come from the
checkpoint's generation_config.json, as `qwenjax generate` takes them.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from qwenjax.inference.generate import MAX_SEED
from qwenjax.inference.sampling import SamplingParams, with_checkpoint_defaults
from qwenjax.inference.tokenizer import THINK_OPEN
from qwenjax.serve.engine import Engine, QueueFull, Request
from qwenjax.serve.errors import APIError, error_response
from qwenjax.serve.media import Pictures
from qwenjax.serve.prefix_cache import chat_snapshot_points
from qwenjax.serve.responses import ChatChoice, Inbox, TextChoice, metrics_text, respond
from qwenjax.validate import InputError


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
    pictures = Pictures(processor, allowed_local_media_path)
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
            return error_response(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid')}"
                           f" (got {json.dumps(first.get('input'), default=str)[:200]})", where)

    @app.exception_handler(APIError)
    async def apierror_response(request, exc: APIError):
        if exc.status == 429:
            refused["count"] += 1
        return error_response(exc.status, exc.message, exc.param, exc.kind)

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
        return PlainTextResponse(metrics_text(engine, refused["count"]))

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

    def submit(inbox: Inbox, prompt: list[int], body: _Sampling, max_tokens: int | None, n: int,
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
        inbox = Inbox(engine)
        for ids in token_prompts:
            submit(inbox, ids, body, body.max_tokens or 16, body.n)
        stops = stops_of(body)
        choices = [TextChoice(tokenizer, stops) for _ in inbox.requests]
        return await respond(http, body, inbox, choices, "text_completion", model_name)

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
        inbox = Inbox(engine)
        submit(inbox, prompt, body, body.max_completion_tokens or body.max_tokens, body.n, snapshot_at, arrays)
        opened = text.rstrip().endswith(THINK_OPEN)
        choices = [ChatChoice(tokenizer, stops_of(body), opened, tools) for _ in inbox.requests]
        return await respond(http, body, inbox, choices, "chat.completion", model_name)

    return app


def _message(i: int, message: dict, pictures: Pictures, scratch: str) -> dict:
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


