"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI): the routes. /v1/chat/completions, /v1/completions
(streamed as server-sent events or not), /v1/models[/{id}], /health, /metrics (Prometheus text), and vLLM's
/tokenize, /detokenize and /tokenizer_info (which evaluation harnesses use).

What a request may hold is `qwenjax.serve.protocol`'s; errors have OpenAI's body, {"error": {"message", "type",
"param", "code"}}, for every 4xx, the framework's own included: a bad request is a 400 naming the field, an unknown
model or route a 404, a full queue a 429. Sampling settings a request leaves out come from the checkpoint's
generation_config.json, as `qwenjax generate` takes them. Templating, tokenization, media decoding and prompt
scoring run on a worker pool, never on the event loop: a 5 MB prompt does not stall anyone's stream.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import re
import time
import uuid

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from qwenjax.inference.generate import MAX_SEED
from qwenjax.inference.grammar import GrammarSpec
from qwenjax.inference.sampling import SamplingParams, with_checkpoint_defaults
from qwenjax.inference.tokenizer import THINK_OPEN, StreamDecoder
from qwenjax.serve.engine import Engine, QueueFull, Request
from qwenjax.serve.errors import APIError, error_response
from qwenjax.serve.media import DEFAULT_MAX_IMAGE_PIXELS, Pictures
from qwenjax.serve.prefix_cache import chat_snapshot_points
from qwenjax.serve.protocol import FIELDS, ChatBody, CompletionBody, DetokenizeBody, TokenizeBody
from qwenjax.serve.responses import ChatChoice, Inbox, TextChoice, metrics_text, respond
from qwenjax.serve.scoring import PromptScorer
from qwenjax.validate import InputError

PREP_WORKERS = 4  # threads for templating, tokenization, media decoding and prompt scoring


def create_app(engine: Engine, tokenizer, model_name: str, *, processor=None,
               allowed_local_media_path: str | None = None,
               max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> FastAPI:
    """The app serving `engine` (started and stopped with the app) under the model name `model_name`. With a
    `processor` (`qwenjax.inference.processor.load_processor`) chat messages may hold images and videos: base64
    data URLs, or files under `allowed_local_media_path`, of at most `max_image_pixels` pixels an image or frame
    (None: Pillow's own bound only)."""
    pictures = Pictures(processor, allowed_local_media_path, max_image_pixels)
    scorer = PromptScorer(engine.m)
    pool = concurrent.futures.ThreadPoolExecutor(PREP_WORKERS, thread_name_prefix="qwenjax-prep")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not engine.started:
            await asyncio.to_thread(engine.start)
        yield
        await asyncio.to_thread(engine.stop)
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="qwenjax", lifespan=lifespan)
    refused = {"count": 0}
    started = int(time.time())

    async def off_loop(fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        if first.get("type") == "extra_forbidden":
            return error_response(400, f"{where}: unknown field (qwenjax refuses what it would otherwise ignore; see "
                                       "README's table of request fields)", where)
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid')}"
                                   f" (got {json.dumps(first.get('input'), default=str)[:200]})", where)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # the framework's own: unknown route, bad body bytes, ...
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "the request body could not be read as JSON (not UTF-8, not JSON, or nested too deeply)"
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {detail}",
                              kind=kind if exc.status_code < 500 else "server_error")

    @app.exception_handler(RecursionError)
    async def too_deep(request, exc: RecursionError):
        return error_response(400, "the request body is nested too deeply")

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        if exc.status == 429:
            refused["count"] += 1
        return error_response(exc.status, exc.message, exc.param, exc.kind)

    @app.get("/health")
    async def health():
        alive = engine.alive
        return JSONResponse({"status": "ok" if alive else "stopped"}, status_code=200 if alive else 503)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "qwenjax",
                "max_model_len": engine.max_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {model_name!r}", "model",
                           "model_not_found")
        return model_card()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(metrics_text(engine, refused["count"]))

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.special_tokens,
                "chat_template": tokenizer.chat_template_source, "model_max_length": engine.max_len,
                "vocab_size": tokenizer.vocab_size}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody):
        check_model(body)
        body.check()
        if body.messages is not None:
            kwargs = dict(body.chat_template_kwargs or {})
            thinking = kwargs.pop("enable_thinking", True)
            messages = [_message(i, m, None) for i, m in enumerate(body.messages)]
            text = await off_loop(_template, tokenizer, messages, tools=body.tools, enable_thinking=thinking,
                                  add_generation_prompt=body.add_generation_prompt, **kwargs)
        else:
            text = body.prompt
        ids = await off_loop(tokenizer.encode, text)
        strs = [tokenizer.decode([t], skip_special_tokens=False) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.max_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody):
        check_model(body)
        bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < tokenizer.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"tokens[{bad}] = {body.tokens[bad]} is not a token id (the tokenizer has "
                                f"{tokenizer.vocab_size})", "tokens")
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    def sampling_of(body) -> tuple[SamplingParams, int]:
        top_k = body.top_k if body.top_k is None or body.top_k >= 0 else 0
        top_k = None if top_k is None else min(top_k, engine.m.config.vocab_size)  # past the vocabulary: all
        penalties = {name: getattr(body, name) for name in ("presence_penalty", "frequency_penalty",
                                                            "repetition_penalty") if getattr(body, name) is not None}
        try:
            params = SamplingParams(**with_checkpoint_defaults(
                engine.m.generation_config, temperature=body.temperature, top_k=top_k, top_p=body.top_p,
                min_p=body.min_p), **penalties, logit_bias=body.bias(engine.m.config.vocab_size))
        except InputError as e:
            raise APIError(400, str(e)) from None
        seed = body.seed if body.seed is not None else uuid.uuid4().int & MAX_SEED
        return params, seed

    def check_model(body) -> None:
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")

    def submit(inbox: Inbox, prompts: list[list[int]], body, max_tokens: int | None, snapshot_at=(),
               arrays: dict | None = None, grammar: GrammarSpec | None = None, thinking_open: bool = False) -> None:
        """body.choices engine requests per prompt, their events (choice index, event) into `inbox`: all queued,
        or none (a 429 when the queue has no room for them now, a 400 when it never will)."""
        params, seed = sampling_of(body)
        n = body.choices
        if len(prompts) * n > engine.max_queue:
            raise APIError(400, f"{len(prompts)} prompts x n={n} = {len(prompts) * n} requests at once; this "
                                f"server queues at most {engine.max_queue} (--max-queue)", "prompt")
        for prompt in prompts:
            if engine.room - len(prompt) < 1:
                raise APIError(400, f"the prompt has {len(prompt)} tokens; this server's rows hold {engine.room} "
                                    f"(--max-len{' less --speculative' if engine.k else ''}), which leaves no room "
                                    "for a reply", "messages" if isinstance(body, ChatBody) else "prompt")
        requests = []
        for prompt in prompts:
            for i in range(n):
                index = len(requests)
                requests.append(Request(
                    prompt=prompt, on_event=lambda ev, index=index: inbox.post((index, ev)),
                    max_tokens=max_tokens or engine.room - len(prompt), sampling=params, seed=(seed + i) & MAX_SEED,
                    stop_strings=body.stops(), snapshot_at=snapshot_at, pictures=arrays,
                    logprobs=body.top_alternatives, min_tokens=body.min_tokens or 0,
                    ignore_eos=bool(body.ignore_eos), grammar=grammar, thinking_open=thinking_open))
        try:
            inbox.requests.extend(engine.submit_all(requests))
        except (QueueFull, InputError) as e:
            inbox.cancel()
            if isinstance(e, QueueFull):
                raise APIError(429, f"the server is busy: {e}; retry later", kind="rate_limit_error") from None
            raise APIError(400, str(e), _field_of(str(e))) from None

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        check_model(body)
        body.check()
        prompts = body.prompts()
        encoded = await off_loop(_completion_prompts, tokenizer, prompts, engine.m.config.vocab_size, engine.max_len)
        scored = None
        if body.echo or body.prompt_logprobs is not None:
            top = max(body.logprobs or 0, body.prompt_logprobs or 0)
            scored = [await off_loop(scorer, ids, top) for ids, _ in encoded]
        choices = await off_loop(_completion_choices, tokenizer, body, prompts, encoded, scored)
        if body.max_tokens == 0:  # echo alone: the prompt, scored, and no reply
            return _echo_only(body, choices, [ids for ids, _ in encoded], model_name)
        inbox = Inbox(engine)
        submit(inbox, [ids for ids, _ in encoded], body, body.max_tokens or 16)
        return await respond(http, body, inbox, choices, "text_completion", model_name)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HTTPRequest):
        check_model(body)
        body.check()
        kwargs = dict(body.chat_template_kwargs or {})
        thinking_flag = kwargs.pop("enable_thinking", True)
        tools = None if body.tool_choice == "none" else body.tools
        grammar = await off_loop(body.grammar)
        prompt, text, snapshot_at, arrays = await off_loop(_chat_prompt, tokenizer, pictures, body.messages, tools,
                                                           thinking_flag, kwargs)
        opened = text.rstrip().endswith(THINK_OPEN)
        if grammar is not None:  # compiled off the loop (cached: the engine's check then finds it)
            await off_loop(_compile_grammar, engine, grammar, opened)
        inbox = Inbox(engine)
        submit(inbox, [prompt], body, body.max_completion_tokens or body.max_tokens, snapshot_at, arrays, grammar,
               opened)
        choices = await off_loop(lambda: [ChatChoice(tokenizer, body.stops(), opened, tools,
                                                     body.parallel_tool_calls is not False, body.min_tokens or 0)
                                          for _ in inbox.requests])
        return await respond(http, body, inbox, choices, "chat.completion", model_name)

    return app


def _compile_grammar(engine: Engine, grammar: GrammarSpec, thinking_open: bool) -> None:
    try:
        engine.grammars.compile(grammar, thinking_open)
    except InputError as e:
        raise APIError(400, str(e), "tools" if grammar.kind == "tool_call" else "response_format") from None


def _field_of(message: str) -> str | None:
    """The request field an engine's InputError names first (its messages start with it), else None."""
    first = re.match(r"[a-z_]+", message)
    return first.group() if first and first.group() in FIELDS else "max_tokens" if "max_tokens" in message else None


def _completion_prompts(tokenizer, prompts: list, vocab: int, max_len: int) -> list[tuple[list[int], list | None]]:
    """(token ids, each token's character span in the prompt or None) of each prompt, checked (a worker thread
    runs it: a long prompt takes seconds to tokenize)."""
    encoded = [tokenizer.encode_with_offsets(p) if isinstance(p, str) else (list(p), None) for p in prompts]
    for i, (ids, _) in enumerate(encoded):
        if not ids:
            raise APIError(400, f"prompt[{i}] is empty", "prompt")
        if len(ids) > max_len:
            raise APIError(400, f"prompt[{i}] has {len(ids)} tokens; this server's rows hold {max_len} (--max-len)",
                           "prompt")
        bad = next((j for j, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt[{i}]: token {bad} is {ids[bad]}, not a token id (vocab_size={vocab})",
                           "prompt")
    return encoded


def _completion_choices(tokenizer, body: CompletionBody, prompts: list, encoded: list, scored: list | None
                        ) -> list[TextChoice]:
    """Each choice's text, as it will grow: body.choices per prompt, each with the prompt echoed or its
    prompt_logprobs when asked (a worker thread builds them: stop strings' tables take time to build)."""
    choices = []
    for (ids, offsets), p, entries in zip(encoded, prompts, scored or [None] * len(prompts)):
        for _ in range(body.choices):
            echo = None
            if body.echo:
                text, starts = (p, [start for start, _ in offsets]) if isinstance(p, str) else \
                    _decoded_offsets(tokenizer, ids)
                k = body.logprobs or 0
                echo = (text, [(ids[0], None, None)] + [(t, lp, top[:k]) for t, (lp, _, top) in zip(ids[1:], entries)],
                        starts)
            choice = TextChoice(tokenizer, body.stops(), echo, body.min_tokens or 0)
            if body.prompt_logprobs is not None:
                choice.extra["prompt_logprobs"] = _prompt_logprobs(tokenizer, ids, entries, body.prompt_logprobs)
            choices.append(choice)
    return choices


def _chat_prompt(tokenizer, pictures: Pictures, raw_messages: list[dict], tools, enable_thinking: bool,
                 kwargs: dict) -> tuple[list[int], str, tuple[int, ...], dict | None]:
    """(prompt ids, prompt text, prefix-cache snapshot points, the processor's picture arrays or None) of a chat
    request's messages (a worker thread runs it: templating, media decoding and tokenization take time)."""
    try:
        messages = [_message(i, m, pictures) for i, m in enumerate(raw_messages)]
        if any(isinstance(m["content"], list) for m in messages):  # the processor expands each picture
            text, arrays, _ = pictures.processor.expand(messages, tools=tools, enable_thinking=enable_thinking,
                                                        **kwargs)
            return tokenizer.encode(text), text, (), arrays
        text = _template(tokenizer, messages, tools=tools, enable_thinking=enable_thinking, **kwargs)
        prompt = tokenizer.encode(text)
        snapshot_at = chat_snapshot_points(tokenizer, messages, prompt, tools=tools, enable_thinking=enable_thinking,
                                           **kwargs)
        return prompt, text, snapshot_at, None
    except (ValueError, TypeError, ImportError) as e:  # ImportError: a video file and no PyAV
        raise APIError(400, f"messages: {e}", "messages") from None


def _template(tokenizer, messages: list[dict], **kwargs) -> str:
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except (ValueError, TypeError) as e:
        raise APIError(400, f"messages: {e}", "messages") from None


def _decoded_offsets(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    """The text of `ids` and where each token's text begins in it."""
    decoder, text, offsets = StreamDecoder(tokenizer, skip_special_tokens=False), "", []
    for t in ids:
        offsets.append(len(text))
        text += decoder.push(t)
    return text, offsets


def _prompt_logprobs(tokenizer, ids: list[int], entries, top: int) -> list:
    """vLLM's prompt_logprobs: None for the first token, then per token {id: {logprob, rank, decoded_token}} for
    the token itself and the `top` most likely there."""
    out = [None]
    token = lambda t: tokenizer.decode([t], skip_special_tokens=False)
    for t, (lp, rank, alternatives) in zip(ids[1:], entries):
        one = {str(t): {"logprob": lp, "rank": rank, "decoded_token": token(t)}}
        for r, (i, a) in enumerate(alternatives[:top], start=1):
            one.setdefault(str(i), {"logprob": a, "rank": r, "decoded_token": token(i)})
        out.append(one)
    return out


def _echo_only(body: CompletionBody, choices: list[TextChoice], prompts: list[list[int]], model_name: str) -> dict:
    """A completion of max_tokens 0 with echo: each prompt back, with its tokens' logprobs when asked."""
    out = []
    for i, c in enumerate(choices):
        entry = {"index": i, "text": c.prefix, "finish_reason": "length",
                 "logprobs": c.logprobs_json(c.take_logprobs()) if body.logprobs is not None else None}
        out.append({**entry, **c.extra})
    prompt_tokens = sum(len(p) for p in prompts)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name, "choices": out,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}}


def _message(i: int, message: dict, pictures: Pictures | None) -> dict:
    """An OpenAI message as the chat template takes it: text parts joined (or, with images or videos, parts the
    processor takes, each read and processed here), tool-call arguments as objects, `developer` as `system`."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise APIError(400, f"messages[{i}] needs a string 'role'", f"messages[{i}].role")
    if message["role"] not in ("system", "developer", "user", "assistant", "tool"):
        raise APIError(400, f"messages[{i}].role: {message['role']!r} is not a role (system, developer, user, "
                            "assistant, tool)", f"messages[{i}].role")
    out = dict(message)
    if out["role"] == "developer":  # OpenAI's newer name for the system message, as vLLM takes it
        out["role"] = "system"
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", "video_url") and pictures is None:
                raise APIError(400, f"{where}: images and videos are not tokenized here", where)
            elif kind == "image_url":
                parts.append({"type": "image", "image": pictures.image(part.get("image_url"), where)})
            elif kind == "video_url":
                parts.append({"type": "video", "video": pictures.video(part.get("video_url"), where)})
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
            except (ValueError, RecursionError):
                raise APIError(400, f"messages[{i}].tool_calls[{j}].function.arguments is not JSON",
                               f"messages[{i}].tool_calls") from None
        calls.append({**call, "function": {**function, "arguments": arguments}, **function, "arguments": arguments})
    if calls:
        out["tool_calls"] = calls
    return out


