"""A chat reply's text split into reasoning, answer and tool calls, incrementally (for streamed deltas).

Qwen3.5 thinks inside `<think>…</think>` (the chat template's generation prompt usually opens the block) and
calls tools in XML:

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

older Qwen templates in JSON: `<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>`.
A tool call counts wherever it appears, inside the thinking block too (models emit them there).
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid

from qwenjax.inference.tokenizer import THINK_CLOSE, THINK_OPEN

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.S)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's API carries it
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


@dataclasses.dataclass(frozen=True)
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_call: ToolCall | None = None


def parse_tool_call(body: str, tools: list[dict] | None = None) -> ToolCall | None:
    """The call in the text between `<tool_call>` and `</tool_call>` (XML or JSON form); None if it is neither.
    An XML parameter's value is a string where the tool's JSON schema says so, else JSON if it parses."""
    body = body.strip()
    if body.startswith("{"):
        try:
            call = json.loads(body)
        except ValueError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = call.get("arguments", call.get("parameters", {}))
        return ToolCall(call["name"], arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                                             ensure_ascii=False))
    match = _FUNCTION.search(body)
    if match is None:
        return None
    name = match.group(1).strip()
    types = _parameter_types(name, tools)
    arguments = {}
    for p in _PARAMETER.finditer(match.group(2)):
        key, value = p.group(1).strip(), p.group(2)
        value = value[1:] if value.startswith("\n") else value
        value = value[:-1] if value.endswith("\n") else value
        arguments[key] = value if types.get(key) == "string" else _json_or_text(value)
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _parameter_types(name: str, tools: list[dict] | None) -> dict:
    for tool in tools or ():
        function = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(function, dict) and function.get("name") == name:
            props = (function.get("parameters") or {}).get("properties") or {}
            return {k: v.get("type") for k, v in props.items() if isinstance(v, dict)}
    return {}


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


class ReplyParser:
    """Feed the reply's text as it grows (`feed`), then `finish`; each returns the new Deltas. `thinking`: the
    prompt opened `<think>`, so the reply starts inside it."""

    def __init__(self, thinking: bool, tools: list[dict] | None = None, parse_tools: bool = True):
        self.thinking, self.tools, self.parse_tools = thinking, tools, parse_tools
        self.text, self.pos = "", 0
        self.content_started = self.reasoning_started = False
        self.calls = 0

    def feed(self, piece: str) -> list[Delta]:
        self.text += piece
        return self._advance(final=False)

    def finish(self) -> list[Delta]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> list[Delta]:
        out = []
        while True:
            rest = self.text[self.pos:]
            markers = [THINK_CLOSE if self.thinking else THINK_OPEN] + ([CALL_OPEN] if self.parse_tools else [])
            found = [(rest.find(m), m) for m in markers if m in rest]
            if not found:
                hold = 0 if final else _partial_marker(rest, markers)
                out += self._text(rest[:len(rest) - hold])
                self.pos += len(rest) - hold
                return [d for d in out if d != Delta()]
            at, marker = min(found)
            if marker == CALL_OPEN:
                end = rest.find(CALL_CLOSE, at)
                if end < 0 and not final:
                    out += self._text(rest[:at])
                    self.pos += at
                    return [d for d in out if d != Delta()]
                body = rest[at + len(CALL_OPEN):end if end >= 0 else len(rest)]
                call = parse_tool_call(body, self.tools)
                out += self._text(rest[:at])
                if call is not None:
                    out.append(Delta(tool_call=call))
                    self.calls += 1
                else:  # not a call after all: keep its text
                    out += self._text(rest[at:end + len(CALL_CLOSE) if end >= 0 else len(rest)])
                self.pos += end + len(CALL_CLOSE) if end >= 0 else len(rest)
                continue
            out += self._text(rest[:at])
            self.pos += at + len(marker)
            self.thinking = marker == THINK_OPEN

    def _text(self, text: str) -> list[Delta]:
        if self.thinking:
            if not self.reasoning_started:
                text = text.lstrip()
                self.reasoning_started = bool(text)
            return [Delta(reasoning=text)] if text else []
        if not self.content_started:  # the blank line after </think> (and around tool calls) is not the answer
            text = text.lstrip()
            self.content_started = bool(text)
        return [Delta(content=text)] if text else []


def _partial_marker(text: str, markers: list[str]) -> int:
    """How many characters at the end of `text` may begin one of `markers` (held back until the next piece)."""
    return max((k for m in markers for k in range(len(m) - 1, 0, -1) if text.endswith(m[:k])), default=0)


def collect(deltas: list[Delta]) -> tuple[str, str, list[ToolCall]]:
    """(reasoning, content, tool calls) of a whole reply's deltas."""
    reasoning = "".join(d.reasoning for d in deltas).strip()
    content = "".join(d.content for d in deltas).rstrip()
    return reasoning, content, [d.tool_call for d in deltas if d.tool_call is not None]
