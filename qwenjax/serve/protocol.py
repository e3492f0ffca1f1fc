"""The request bodies the server takes, and what it does with each field: `FIELDS` is the table both the
validation and README's field table come from (`python -m qwenjax.serve.protocol` prints the table).

Every top-level field of OpenAI's chat and completions request schemas is listed, with the vLLM extensions qwenjax
takes. A field is "implemented", a "no-op" (accepted and unused: only fields that cannot change the output), or
"refused" (a 400 naming it when it is set to anything that would change the output). A field that is not in the
table is refused too, as OpenAI's API refuses it: a silently ignored field gives a plausible, wrong answer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from qwenjax.inference.generate import MAX_SEED
from qwenjax.inference.grammar import GrammarSpec
from qwenjax.serve.errors import APIError
from qwenjax.validate import InputError

CHAT, COMPLETIONS, BOTH = "chat", "completions", "chat, completions"


@dataclasses.dataclass(frozen=True)
class FieldUse:
    endpoints: str  # CHAT, COMPLETIONS or BOTH
    status: Literal["implemented", "no-op", "refused"]
    note: str
    origin: Literal["OpenAI", "vLLM"] = "OpenAI"
    allowed: tuple | None = (None,)  # a refused field's values that change nothing (taken); None: a rule says


FIELDS: dict[str, FieldUse] = {
    # OpenAI's fields, in the order of its API reference
    "messages": FieldUse(CHAT, "implemented", "roles system, developer (as system), user, assistant (with "
                         "tool_calls), tool; text, image_url and video_url parts"),
    "prompt": FieldUse(COMPLETIONS, "implemented", "a string, a list of strings, token ids, or lists of token ids"),
    "model": FieldUse(BOTH, "implemented", "must be the served model's name (404 otherwise) or left out"),
    "audio": FieldUse(CHAT, "refused", "no audio output"),
    "best_of": FieldUse(COMPLETIONS, "refused", "no server-side ranking: taken only equal to n", allowed=None),
    "echo": FieldUse(COMPLETIONS, "implemented", "the prompt before the completion, with its tokens' logprobs when "
                     "`logprobs` is set (the first token's null); not with stream"),
    "frequency_penalty": FieldUse(BOTH, "implemented", "[-2, 2], vLLM's definition (count in the reply)"),
    "function_call": FieldUse(CHAT, "refused", "deprecated by OpenAI: use tool_choice"),
    "functions": FieldUse(CHAT, "refused", "deprecated by OpenAI: use tools"),
    "logit_bias": FieldUse(BOTH, "implemented", "token id -> bias in [-100, 100] added to the logit, at most 300"),
    "logprobs": FieldUse(BOTH, "implemented", "chat: true/false (with top_logprobs); completions: 0-20 "
                         "alternatives"),
    "top_logprobs": FieldUse(CHAT, "implemented", "0-20 alternatives per token; needs logprobs: true"),
    "max_completion_tokens": FieldUse(CHAT, "implemented", "takes precedence over max_tokens"),
    "max_tokens": FieldUse(BOTH, "implemented", "default: what the row has room for (chat), 16 (completions); "
                           "0 only with echo (completions)"),
    "metadata": FieldUse(CHAT, "no-op", "stored nowhere"),
    "modalities": FieldUse(CHAT, "refused", "replies are text: [\"text\"] is taken", allowed=(None, ["text"])),
    "moderation": FieldUse(CHAT, "refused", "no moderation model"),
    "n": FieldUse(BOTH, "implemented", "1-16 choices, seeds seed, seed+1, ..."),
    "parallel_tool_calls": FieldUse(CHAT, "implemented", "false: at most the first tool call is returned"),
    "prediction": FieldUse(CHAT, "no-op", "predicted output only speeds OpenAI's decoding; the output is the same"),
    "presence_penalty": FieldUse(BOTH, "implemented", "[-2, 2], vLLM's definition (in the reply or not)"),
    "prompt_cache_key": FieldUse(CHAT, "no-op", "the prefix cache finds shared prefixes by their tokens"),
    "prompt_cache_options": FieldUse(CHAT, "no-op", "the prefix cache's policy is the server's (--prefix-cache-mb)"),
    "prompt_cache_retention": FieldUse(CHAT, "no-op", "the prefix cache's policy is the server's"),
    "reasoning_effort": FieldUse(CHAT, "refused", "Qwen3.5 has thinking on or off: chat_template_kwargs "
                                 "{\"enable_thinking\": false}"),
    "response_format": FieldUse(CHAT, "implemented", "text; json_object and json_schema (strict or not: always "
                                "enforced) by constrained decoding; with thinking on, after the thinking"),
    "safety_identifier": FieldUse(CHAT, "no-op", "stored nowhere"),
    "seed": FieldUse(BOTH, "implemented", "0 .. 2^63-1; the same seed gives the same tokens however the request is "
                     "batched"),
    "service_tier": FieldUse(CHAT, "no-op", "one tier"),
    "stop": FieldUse(BOTH, "implemented", "a string or a list of non-empty strings; cut from the text"),
    "store": FieldUse(CHAT, "no-op", "nothing is stored"),
    "stream": FieldUse(BOTH, "implemented", "server-sent events"),
    "stream_options": FieldUse(BOTH, "implemented", "include_usage; continuous_usage_stats (vLLM): usage in every "
                               "chunk; include_obfuscation: no-op (no obfuscation field is sent)"),
    "suffix": FieldUse(COMPLETIONS, "refused", "no fill-in-the-middle", allowed=(None, "")),
    "temperature": FieldUse(BOTH, "implemented", ">= 0 (0: greedy); default from generation_config.json"),
    "tool_choice": FieldUse(CHAT, "implemented", "\"auto\"; \"none\" (tools kept out of the prompt); "
                            "\"required\" and a named function by constrained decoding (calls in Qwen3.5's format, "
                            "each argument typed by its schema)"),
    "tools": FieldUse(CHAT, "implemented", "function tools, rendered by the chat template; calls parsed from the "
                      "reply"),
    "top_p": FieldUse(BOTH, "implemented", "(0, 1]; default from generation_config.json"),
    "user": FieldUse(BOTH, "no-op", "stored nowhere"),
    "verbosity": FieldUse(CHAT, "refused", "no verbosity control"),
    "web_search_options": FieldUse(CHAT, "refused", "no web search"),
    # vLLM's extensions
    "top_k": FieldUse(BOTH, "implemented", "-1 or 0: off; default from generation_config.json", "vLLM"),
    "min_p": FieldUse(BOTH, "implemented", "[0, 1]; default from generation_config.json", "vLLM"),
    "repetition_penalty": FieldUse(BOTH, "implemented", "> 0 (1: off), vLLM's definition (prompt and reply tokens)",
                                   "vLLM"),
    "min_tokens": FieldUse(BOTH, "implemented", "no eos and no stop string ends the reply before this many tokens "
                           "(eos masked out)", "vLLM"),
    "ignore_eos": FieldUse(BOTH, "implemented", "the model's eos tokens do not end the reply: it runs to max_tokens",
                           "vLLM"),
    "chat_template_kwargs": FieldUse(CHAT, "implemented", "variables for the chat template (enable_thinking, ...)",
                                     "vLLM"),
    "prompt_logprobs": FieldUse(COMPLETIONS, "implemented", "each prompt token's logprob and this many "
                                "alternatives (0-20), vLLM's shape; not with stream", "vLLM"),
}


def _refuse(field: str, why: str):
    raise APIError(400, f"{field}: {why}", field)


class _Body(BaseModel):
    """Unknown fields are refused (a 400 naming them), as OpenAI's API refuses them."""
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None
    include_obfuscation: StrictBool | None = None


class _Common(_Body):
    """The fields both endpoints take."""
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1)  # -1 and 0: off; past the vocabulary: all of it
    min_p: float | None = Field(None, ge=0, le=1)
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = Field(None, ge=1, le=16)
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    logit_bias: dict[str, float] | None = Field(None, max_length=300)
    min_tokens: StrictInt | None = Field(None, ge=0)
    ignore_eos: StrictBool | None = None
    user: StrictStr | None = None
    logprobs: Any = None  # typed per endpoint

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def streamed(self) -> bool:
        return bool(self.stream)

    def stops(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not s for s in stops):
            _refuse("stop", "a stop string is empty")
        return stops

    def bias(self, vocab: int) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs, checked against the model's vocabulary."""
        pairs = []
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= vocab:
                _refuse("logit_bias", f"{key!r} is not a token id (vocab_size={vocab})")
            if not -100 <= value <= 100:
                _refuse("logit_bias", f"the bias {value} of token {key} must be in [-100, 100]")
            pairs.append((int(key), float(value)))
        return tuple(pairs)

    def check(self) -> None:
        """Rules across fields and values a type cannot say (APIError 400 naming the field)."""
        if self.stream_options is not None and not self.streamed:
            _refuse("stream_options", "only with stream: true")
        for name, use in FIELDS.items():  # refused unless set to what changes nothing
            if use.status == "refused" and use.allowed is not None and name in type(self).model_fields and \
                    getattr(self, name) not in use.allowed:
                _refuse(name, f"not supported: {use.note}")
        _check_text(self.stop, "stop")


class CompletionBody(_Common):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = Field(None, ge=0, le=20)  # the chosen tokens' and this many alternatives'
    echo: StrictBool | None = None
    prompt_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    best_of: StrictInt | None = Field(None, ge=1)
    suffix: StrictStr | None = None

    @property
    def top_alternatives(self) -> int | None:
        return self.logprobs

    def check(self) -> None:
        super().check()
        if self.best_of not in (None, self.choices):
            _refuse("best_of", f"best_of={self.best_of} with n={self.choices}: no server-side ranking (best_of must "
                               "equal n)")
        if self.max_tokens == 0 and not self.echo:
            _refuse("max_tokens", "max_tokens 0 only with echo: true (a reply of no tokens)")
        if self.streamed and (self.echo or self.prompt_logprobs is not None):
            _refuse("echo" if self.echo else "prompt_logprobs", "not with stream: true")
        _check_text(self.prompt, "prompt")

    def prompts(self) -> list:
        p = self.prompt
        return p if isinstance(p, list) and p and not isinstance(p[0], int) else [p]


class ChatBody(_Common):
    messages: list[dict] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    tools: list[dict] | None = None
    tool_choice: StrictStr | dict | None = None
    parallel_tool_calls: StrictBool | None = None
    chat_template_kwargs: dict | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    response_format: dict | None = None
    # no-ops: they cannot change the reply
    metadata: dict | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    prompt_cache_options: dict | None = None
    prompt_cache_retention: StrictStr | None = None
    prediction: dict | None = None
    # refused unless unset
    audio: Any = None
    function_call: Any = None
    functions: Any = None
    modalities: list[StrictStr] | None = None
    moderation: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    @property
    def top_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self) -> None:
        super().check()
        if self.max_tokens == 0:
            _refuse("max_tokens", "must be at least 1")
        if self.top_logprobs is not None and not self.logprobs:
            _refuse("top_logprobs", "top_logprobs needs logprobs: true")
        if self.tools is not None:
            for i, tool in enumerate(self.tools):
                function = tool.get("function") if isinstance(tool, dict) else None
                if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
                        not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    _refuse(f"tools[{i}]", "a tool is {\"type\": \"function\", \"function\": {\"name\": ..., "
                                           "\"parameters\": {...}}}")
        _check_text(self.messages, "messages")
        _check_text(self.tools, "tools")

    def grammar(self) -> GrammarSpec | None:
        """What the reply is constrained to (None: nothing): `response_format` json_object / json_schema, or
        `tool_choice` "required" / a named function (a 400 naming the field at fault)."""
        try:
            reply = GrammarSpec.from_response_format(self.response_format)
        except InputError as e:
            raise APIError(400, str(e), "response_format") from None
        try:
            calls = GrammarSpec.from_tools(self.tools, self.tool_choice, self.parallel_tool_calls is not False)
        except InputError as e:
            raise APIError(400, str(e), "tool_choice" if str(e).startswith("tool_choice") else "tools") from None
        if reply is not None and calls is not None:
            _refuse("response_format", f"{self.response_format['type']} and tool_choice "
                                       f"{self.tool_choice!r} both constrain the reply: give one")
        return reply or calls


def _check_text(value, where: str, depth: int = 0) -> None:
    """Refuses strings that are not Unicode text (a lone surrogate: JSON's "\\udfff" parses to one, and no
    tokenizer can encode it), naming where, and nesting past what any request needs."""
    if depth > 64:
        _refuse(where, "nested more than 64 levels deep")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            _refuse(where, f"not valid Unicode text: a lone surrogate {value[e.start]!r} at character {e.start}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, where, depth + 1)
            _check_text(v, f"{where}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, f"{where}[{i}]", depth + 1)


class TokenizeBody(_Body):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template."""
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[dict] | None = None
    tools: list[dict] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict | None = None
    return_token_strs: StrictBool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            _refuse("prompt", "give either prompt or messages")
        _check_text(self.prompt, "prompt")
        _check_text(self.messages, "messages")
        _check_text(self.tools, "tools")


class DetokenizeBody(_Body):
    model: StrictStr | None = None
    tokens: list[StrictInt]


def field_table() -> str:
    """README's table of request fields (markdown)."""
    lines = ["| field | endpoints | from | qwenjax |", "|---|---|---|---|"]
    for name, use in FIELDS.items():
        lines.append(f"| `{name}` | {use.endpoints} | {use.origin} | **{use.status}**: {use.note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(field_table())
