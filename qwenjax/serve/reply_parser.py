"""A chat reply's text split into reasoning, answer and tool calls, incrementally (for streamed deltas).

Qwen3.5 thinks inside `<think>…</think>` (the chat template's generation prompt usually opens the block) and
calls tools in XML, as its chat template writes them:

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

older Qwen templates in JSON: `<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>`.
A tool call counts wherever it appears, inside the thinking block too (models emit them there), and only once
its `</tool_call>` came: a call cut off (by max_tokens) stays text, as the peers (vLLM, SGLang) keep it.

Thinking is split as `qwenjax.inference.tokenizer.split_thinking` splits it: the block ends at the first
`</think>`; a `<think>` the model writes before anything else opens it (or, if the prompt opened it already, is
dropped); any later `<think>` / `</think>` is text. (One exception, for streaming's sake: without a block opened
by the prompt or by the reply's first characters, a lone `</think>` stays in the answer, where `split_thinking`,
which sees the whole text, would call what precedes it thinking.)

An XML value is read by its parameter's JSON schema: strings stay as written; booleans, null, numbers, objects
and arrays are read from JSON or from the Python literals (`True`, `None`) the chat template writes (it renders
values with str()), with `anyOf` / `oneOf`, type lists and `enum` honoured. A value ends only at the
`</parameter>` that closes it — tags opened on a line of their own inside a value are paired with their own
closing tags — followed by the next parameter (one the schema names, not given yet) or by `</function>` and
`</tool_call>` ending the call (and then the reply's end, another call or `</think>`); so code holding these
tags goes through whole. Once the reply is over, a call that reading could not close is read again with any
text after its `</tool_call>`, then with a missing `</parameter>` or `</function>` allowed; `function.arguments`
is always a JSON object.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
import uuid

from qwenjax.inference.tokenizer import THINK_CLOSE, THINK_OPEN

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
PARAMETER_CLOSE = "</parameter>"
# Nesting of JSON or Python literals read back from a call; anything deeper stays text (or a string value), so a
# hostile reply never reaches the recursion limit of json or ast (~1000 frames).
MAX_NESTING = 128
_NAME = r"([^<>\n]{0,256})"  # a function or parameter name: one line, no tags, not endless
_FUNCTION = re.compile(r"\s*<function=" + _NAME + ">")
_PARAMETER = re.compile(r"<parameter=" + _NAME + ">")
_VALUE_EVENT = re.compile(r"</parameter>|</function>|<(parameter|function)=" + _NAME + ">")
_SPACE = re.compile(r"\s*")
_VALID_NAME = re.compile(r"[^\s\"'{}<>]+")  # not a template's leftover `{{ name }}`, not prose
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[{]|[\]}]')
_PYTHON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|\'[^\'\\]*(?:\\.[^\'\\]*)*\'?|[\[{(]|[\]})]')
_NOTHING = object()
# How a call's text is read (see _XmlCall): TAIL while the reply streams, then, once it is over, STRICT and
# LENIENT for what TAIL left (each tried only where the one before found no call).
TAIL, STRICT, LENIENT = "tail", "strict", "lenient"
_AFTER_CALL = (CALL_OPEN, THINK_CLOSE)  # what may follow a `</tool_call>` for TAIL (besides the reply's end)


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
    XML values are typed by the parameters' schemas in `tools` (OpenAI's tool list); a JSON-form call whose
    arguments are not a JSON object (or a string holding one) is not a call."""
    for mode in (STRICT, LENIENT):
        reader = _reader(body, 0, tools, mode)
        if reader is not None and (call := reader.read(body, len(body), final=True)) is not None:
            return call
    return None



def _reader(text: str, start: int, tools, mode: str):
    """A reader of the call whose text begins at `start` (after `<tool_call>`), JSON or XML; None if it is
    neither (or JSON, for LENIENT: JSON has no lenient reading)."""
    pos = _SPACE.match(text, start).end()
    if text.startswith("{", pos):
        return None if mode == LENIENT else _JsonCall(pos)
    header = _FUNCTION.match(text, pos)
    if header is None or not _VALID_NAME.fullmatch(header.group(1).strip()):
        return None
    return _XmlCall(header, tools, mode)


class _JsonCall:
    """A JSON-form call read as it comes: strings and brackets are followed once, so the object's end is known
    without parsing it again at every `</tool_call>` (one may sit inside a string)."""

    _PLAIN = re.compile(r'[^"\[\]{}]*')
    _IN_STRING = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*')

    def __init__(self, start: int):
        self.start = self.pos = start
        self.depth, self.in_string, self.closed, self.failed, self.waiting = 0, False, -1, False, False

    def read(self, text: str, stop: int, final: bool) -> ToolCall | None:
        """The call if text[start:stop] (`stop`: where a `</tool_call>` begins) is one."""
        pos = self.pos
        while pos < stop and self.closed < 0 and not self.failed:
            if self.in_string:
                pos = self._IN_STRING.match(text, pos, stop).end()
                if pos >= stop or text[pos] != '"':
                    break  # the text read ends inside the string (or right after a backslash)
                self.in_string, pos = False, pos + 1
                continue
            pos = self._PLAIN.match(text, pos, stop).end()
            if pos >= stop:
                break
            char, pos = text[pos], pos + 1
            if char == '"':
                self.in_string = True
            elif char in ("[", "{"):
                self.depth += 1
                self.failed = self.depth > MAX_NESTING
            else:
                self.depth -= 1
                self.closed = pos if self.depth == 0 else -1
                self.failed = self.depth < 0
        self.pos = pos
        if self.failed or self.closed < 0:
            return None
        self.failed = True  # whatever follows: the object ended, there is nothing more to wait for
        return _parse_json(text[self.start:stop]) if not text[self.closed:stop].strip() else None


def _parse_json(body: str) -> ToolCall | None:
    call = _json(body.strip())
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"].strip():
        return None
    arguments = call["arguments"] if "arguments" in call else call.get("parameters")
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):  # OpenAI's wire form: the object as a JSON string
        arguments = _json(arguments.strip())
    # Anything but an object would give clients a `function.arguments` they cannot read as one: not a call.
    if not isinstance(arguments, dict):
        return None
    return ToolCall(call["name"].strip(), json.dumps(arguments, ensure_ascii=False))


class _XmlCall:
    """An XML call (its `<function=NAME>` read) read as it comes, on from where the last `read` stopped.

    A value ends at the first `</parameter>` that closes it — tags opened on their own line inside the value
    (`<parameter=…>`, `<function=…>`: code holding a call) pair with their own closing tags — and is followed by
    the structure: a parameter the function declares and the call has not given yet, or `</function>`, then
    `</tool_call>`, then — reading TAIL — the reply's end, another `<tool_call>` or `</think>` (so a value may
    hold `</parameter></function></tool_call>` and go on). What was read is not read again: `read` stops where
    a `</tool_call>` begins, which no tag can straddle, so a `</parameter>` rejected there is rejected for good.

    STRICT: any text may follow `</tool_call>`. LENIENT, for calls that lack a closing tag or add a parameter:
    a value may end without its `</parameter>` (at the next declared parameter's tag on its own line, or at
    `</function>` ending the call) unless a paired `</parameter>` sits right there, `</function>` may be
    missing, and a parameter the function does not declare may follow a `</parameter>`."""

    def __init__(self, header: re.Match, tools, mode: str):
        self.name, self.mode, self.lenient = header.group(1).strip(), mode, mode == LENIENT
        self.schemas = _parameter_schemas(self.name, tools)
        self.known = set(self.schemas) if self.schemas is not None else None
        self.values: dict[str, str] = {}
        self.key, self.value_start, self.pos = None, 0, header.end()
        self.depth = self.functions = 0  # <parameter=…> / <function=…> tags opened inside the value, not closed
        self.failed = self.waiting = False  # waiting: for what follows a `</tool_call>` (TAIL)

    def read(self, text: str, stop: int, final: bool) -> ToolCall | None:
        """The call if text up to `stop` (where a `</tool_call>` begins) completes it. `final`: the reply is
        over (TAIL reads past `stop` to see what follows the call)."""
        self.waiting = False
        end = stop  # `</function>` ends the call only where nothing but space follows it
        while end > self.pos and text[end - 1].isspace():
            end -= 1
        while not self.failed:
            if self.key is None:  # between parameters
                pos = _SPACE.match(text, self.pos, stop).end()
                ends = True if self.lenient and pos >= end else self._ends(text, pos, stop, end, final)
                if ends is None:
                    self.waiting = True
                    return None
                if ends:
                    arguments = {k: _typed(v, (self.schemas or {}).get(k)) for k, v in self.values.items()}
                    return ToolCall(self.name, json.dumps(arguments, ensure_ascii=False))
                opened = _PARAMETER.match(text, pos, stop)
                key = opened.group(1).strip() if opened else ""
                if not key or key in self.values:  # neither a parameter nor the end: not a call, whatever follows
                    self.failed = True
                    return None
                self.key, self.value_start, self.pos = key, opened.end(), opened.end()
                self.depth = self.functions = 0
            found = self._value_end(text, stop, end, final)
            if found is None:
                return None
            value = text[self.value_start:found[0]]
            value = value[1:] if value.startswith("\n") else value  # the template writes "\n" + value + "\n"
            self.values[self.key] = value[:-1] if value.endswith("\n") else value
            self.key, self.pos = None, found[1]
        return None

    def _value_end(self, text: str, stop: int, end: int, final: bool) -> tuple[int, int] | None:
        """(where the value ends, where the structure goes on), or None: read on from `stop` next time (or, if
        `waiting`, from the `</parameter>` whose call end waits for what follows it)."""
        for event in _VALUE_EVENT.finditer(text, self.pos, stop):
            tag, at = event.group(0), event.start()
            if tag == PARAMETER_CLOSE:
                if self.depth:
                    self.depth -= 1
                    continue
                after = _SPACE.match(text, event.end(), stop).end()
                goes_on = self._continues(text, after, stop, end, final)
                if goes_on is None:
                    self.pos, self.waiting = at, True
                    return None
                if goes_on:
                    return at, after
            elif tag == FUNCTION_CLOSE:
                if self.functions:
                    self.functions -= 1
                elif self.lenient and event.end() >= end and self._unclosed(text, at):  # </parameter> missing
                    return at, at
            elif at == self.value_start or text[at - 1] == "\n":  # a tag opened on its own line
                if event.group(1) == "function":
                    self.functions += 1
                elif self.lenient and not self.depth and self._unclosed(text, at) and \
                        self._continues(text, at, stop, end, final, closed=False):  # its </parameter> is missing
                    return at, at
                else:
                    self.depth += 1
        self.pos = stop
        return None

    def _unclosed(self, text: str, at: int) -> bool:
        """Whether the value up to `at` does not end with a `</parameter>` (one paired inside it: taking it for a
        missing one would be a guess)."""
        while at > self.value_start and text[at - 1].isspace():
            at -= 1
        return not text.endswith(PARAMETER_CLOSE, self.value_start, at)

    def _continues(self, text: str, pos: int, stop: int, end: int, final: bool, closed: bool = True) -> bool | None:
        """Whether the call's structure goes on at `pos`: the call's end, or a parameter the function declares
        (any name where the tools do not declare it) that was not given yet; None: wait for more text. LENIENT,
        after the value's `</parameter>` (`closed`), takes a name the function does not declare too (a model's
        extra parameter)."""
        ends = self._ends(text, pos, stop, end, final)
        if ends is not False:
            return ends
        if self.lenient and pos >= end:
            return True
        opened = _PARAMETER.match(text, pos, stop)
        name = opened.group(1).strip() if opened else ""
        return bool(name) and name != self.key and name not in self.values and (
            self.known is None or name in self.known or self.lenient and closed)

    def _ends(self, text: str, pos: int, stop: int, end: int, final: bool) -> bool | None:
        """Whether `</function>` at `pos`, then `</tool_call>` at `stop`, end the call; None: wait for more."""
        if not (text.startswith(FUNCTION_CLOSE, pos, stop) and pos + len(FUNCTION_CLOSE) >= end):
            return False
        if self.mode != TAIL:
            return True
        after = _SPACE.match(text, stop + len(CALL_CLOSE)).end()
        rest = text[after:after + len(CALL_OPEN)]
        if rest.startswith(_AFTER_CALL) or final and not rest:
            return True
        return None if not final and any(m.startswith(rest) for m in _AFTER_CALL) else False


def _parameter_schemas(name: str, tools) -> dict | None:
    """Function `name`'s parameter schemas by parameter name, as `tools` declares them (OpenAI's
    `{"type": "function", "function": {...}}` or the bare function); None where they are not declared."""
    for tool in tools if isinstance(tools, (list, tuple)) else ():
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict) and function.get("name") == name:
            parameters = function.get("parameters")
            properties = parameters.get("properties") if isinstance(parameters, dict) else None
            return properties if isinstance(properties, dict) and properties else None
    return None


# ---- typed values ------------------------------------------------------------------------------------------------
_TYPE_NAMES = {"string": "string", "str": "string", "integer": "integer", "int": "integer", "number": "number",
               "float": "number", "boolean": "boolean", "bool": "boolean", "null": "null", "object": "object",
               "dict": "object", "array": "array", "list": "array"}
_PYTHON_SCALARS = {"True": True, "False": False, "None": None}


def _typed(text: str, schema):
    """A parameter's value text as its schema's type. Text that fits none of the allowed types stays a string,
    as the peers keep it. A type list with "string" keeps the text (`42` stays "42"), but for `null`/`None`
    where null is allowed and for a JSON (or Python) object / array where one is allowed."""
    types = _schema_types(schema)
    stripped = text.strip()
    if types is None:  # not declared: JSON if it reads as JSON, the template's Python scalars, else the text
        value = _json(stripped)
        return value if value is not _NOTHING else _PYTHON_SCALARS.get(stripped, text)
    if stripped.lower() in ("null", "none") and ("null" in types or "string" not in types):
        return None
    if types & {"object", "array"} and stripped[:1] in ("{", "[", "("):
        value = _json(stripped)
        value = _python_literal(stripped) if value is _NOTHING else value
        if isinstance(value, dict) and "object" in types or isinstance(value, list) and "array" in types:
            return value
    if "string" in types:
        return text
    if "boolean" in types and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    if types & {"integer", "number"}:
        value = _json(stripped)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float):
            return value if "number" in types else int(value) if value.is_integer() else text
    return text


def _schema_types(schema, depth: int = 0) -> frozenset | None:
    """The JSON types a parameter's schema allows (`type`, a list of them, `anyOf` / `oneOf`, `enum`, `const`);
    None where it does not say, or allows anything."""
    if not isinstance(schema, dict) or depth > 16:
        return None
    declared = schema.get("type")
    types = {_TYPE_NAMES[t.lower()] for t in (declared if isinstance(declared, list) else [declared])
             if isinstance(t, str) and t.lower() in _TYPE_NAMES}
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) if isinstance(schema.get(key), list) else ():
            option_types = _schema_types(option, depth + 1)
            if option_types is None:
                return None
            types |= option_types
    values = schema["enum"] if isinstance(schema.get("enum"), list) else [schema["const"]] if "const" in schema else []
    types |= {_json_type(v) for v in values}
    return frozenset(types) or None


def _json_type(value) -> str:
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (dict, "object"),
                       (list, "array")):
        if isinstance(value, kind):
            return name
    return "null"


def _too_deep(text: str, tokens: re.Pattern) -> bool:
    depth = 0
    for token in tokens.finditer(text):
        bracket = token.group(0)
        if bracket in ("[", "{", "("):
            depth += 1
            if depth > MAX_NESTING:
                return True
        elif bracket in ("]", "}", ")"):
            depth -= 1
    return False


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a JSON number")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _json(text: str):
    """`text` as strict JSON (no NaN / Infinity, numbers that JSON can write back), or _NOTHING."""
    if _too_deep(text, _JSON_TOKENS):
        return _NOTHING
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError):  # RecursionError: only from a stack already deep at the call
        return _NOTHING


def _python_literal(text: str):
    """`text` as a Python literal of JSON's kinds (tuples as lists), or _NOTHING."""
    if _too_deep(text, _PYTHON_TOKENS):
        return _NOTHING
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOTHING
    return _as_json(value)


def _as_json(value):
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _NOTHING
    if isinstance(value, (list, tuple)):
        items = [_as_json(v) for v in value]
        return _NOTHING if any(v is _NOTHING for v in items) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _as_json(v) for k, v in value.items()}
        return _NOTHING if any(v is _NOTHING for v in items.values()) else items
    return _NOTHING


# ---- the incremental split -----------------------------------------------------------------------------------------
class ReplyParser:
    """Feed the reply's text as it grows (`feed`), then `finish`; each returns the new Deltas. `thinking`: the
    prompt opened `<think>`, so the reply starts inside it. `tools`: the request's tools (their schemas type the
    XML values). Whatever the pieces, the deltas joined are those of the whole text fed at once.

    Cost: text outside calls is handled as it comes (a few characters held back where a tag may begin); a
    call's text is kept until a `</tool_call>` arrives, and then read on from where the last reading stopped."""

    def __init__(self, thinking: bool, tools: list[dict] | None = None, parse_tools: bool = True):
        self.thinking, self.tools, self.parse_tools = bool(thinking), tools, parse_tools
        self.lead = True  # only space so far: a `<think>` here opens the block (or is dropped, if it is open)
        self.text = ""  # the text not turned into deltas yet; in a call, from its `<tool_call>`
        self.in_call = False
        self.reader = None  # in a call whose start reads like one: its TAIL reader
        self.pieces: list[str] = []  # in a call: what was fed since `text` was last joined
        self.tail = ""  # in a call: its last characters, where a `</tool_call>` may have begun
        self.close_from = 0  # in a call: where in `text` the next `</tool_call>` is looked for
        self.close = -1  # in a call: the `</tool_call>` the reader stopped at, waiting for what follows it
        self.content_started = self.reasoning_started = False
        self.calls = 0  # calls found so far (the server's finish_reason reads it)

    def feed(self, piece: str) -> list[Delta]:
        if not self.in_call:
            if not self.text and not self.lead and "<" not in piece:  # nothing held back, no tag can begin
                out: list[Delta] = []
                self._emit(piece, out)
                return out
            self.text += piece
            return self._advance(final=False)
        window = self.tail + piece
        self.pieces.append(piece)
        self.tail = window[-(len(CALL_CLOSE) - 1):]
        # nothing to decide until a `</tool_call>` comes, or a non-space where the call's start or what follows
        # its `</tool_call>` is awaited
        decides = CALL_CLOSE in window or not piece.isspace() and (self.reader is None or self.reader.waiting)
        return self._advance(final=False) if decides else []

    def finish(self) -> list[Delta]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> list[Delta]:
        out: list[Delta] = []
        while self._read_call(final, out) if self.in_call else self._read_text(final, out):
            pass
        return out

    def _read_text(self, final: bool, out: list) -> bool:
        """Turns what it can of the text outside calls into `out`; whether a call or the thinking block's end
        was met (there is more to do now)."""
        if self.lead:
            self.text = self.text.lstrip()
            if self.text.startswith(THINK_OPEN):
                self.text, self.thinking, self.lead = self.text[len(THINK_OPEN):], True, False
                return True
            if not self.text or THINK_OPEN.startswith(self.text) and not final:
                return False
            self.lead = False
        text = self.text
        close = text.find(THINK_CLOSE) if self.thinking else -1
        call = text.find(CALL_OPEN) if self.parse_tools else -1
        if close < 0 and call < 0:
            hold = 0 if final else _partial_marker(text, self.thinking, self.parse_tools)
            self._emit(text[:len(text) - hold], out)
            self.text = text[len(text) - hold:]
            return False
        if call < 0 or 0 <= close < call:  # the block is over: no later tag reopens it
            self._emit(text[:close], out)
            self.text, self.thinking = text[close + len(THINK_CLOSE):], False
            return True
        self._emit(text[:call], out)
        self.text, self.in_call, self.reader, self.close = text[call:], True, None, -1
        self.close_from, self.tail = len(CALL_OPEN), self.text[-(len(CALL_CLOSE) - 1):]
        return True

    def _read_call(self, final: bool, out: list) -> bool:
        if self.pieces:
            self.text += "".join(self.pieces)
            self.pieces = []
        text = self.text
        if self.reader is None:
            header = _call_header(text, final)
            if header is None:
                return False
            if not header:  # not a call: the tag is text
                self._emit(CALL_OPEN, out)
                self.text, self.in_call = text[len(CALL_OPEN):], False
                return True
            self.reader = _reader(text, len(CALL_OPEN), self.tools, TAIL)
        while True:
            if self.close < 0:
                self.close = text.find(CALL_CLOSE, self.close_from)
                if self.close < 0:
                    break
                self.close_from = self.close + 1
            if self._take(self.reader, text, self.close, final, out):
                return True
            if self.reader.waiting:
                return False
            self.close = -1
        self.close_from = max(self.close_from, len(text) - len(CALL_CLOSE) + 1)
        if not final:
            return False
        for mode in (STRICT, LENIENT):  # the reply is over: what TAIL left, read again
            reader = _reader(text, len(CALL_OPEN), self.tools, mode)
            close = text.find(CALL_CLOSE, len(CALL_OPEN))
            while reader is not None and close >= 0:
                if self._take(reader, text, close, final, out):
                    return True
                close = text.find(CALL_CLOSE, close + 1)
        self._emit(text, out)  # cut off: the rest of the reply is text
        self.text, self.in_call = "", False
        return False

    def _take(self, reader, text: str, close: int, final: bool, out: list) -> bool:
        call = reader.read(text, close, final)
        if call is not None:
            out.append(Delta(tool_call=call))
            self.text, self.in_call, self.calls = text[close + len(CALL_CLOSE):], False, self.calls + 1
        return call is not None

    def _emit(self, text: str, out: list) -> None:
        if self.thinking:
            if not self.reasoning_started:
                text = text.lstrip()
                self.reasoning_started = bool(text)
            if text:
                out.append(Delta(reasoning=text))
            return
        if not self.content_started:  # the blank line after </think> (and around tool calls) is not the answer
            text = text.lstrip()
            self.content_started = bool(text)
        if text:
            out.append(Delta(content=text))


def _call_header(text: str, final: bool) -> bool | None:
    """Whether `text` (from `<tool_call>`) starts like a call (JSON, or `<function=NAME>`); None if too little
    of it came to tell."""
    start = _SPACE.match(text, len(CALL_OPEN)).end()
    if text.startswith("{", start):
        return True
    header = _FUNCTION.match(text, start)
    if header:
        return bool(_VALID_NAME.fullmatch(header.group(1).strip()))
    rest = text[start:start + len(FUNCTION_OPEN) + 257]
    if final:
        return False
    if len(rest) <= len(FUNCTION_OPEN):
        return None if FUNCTION_OPEN.startswith(rest) else False
    return None if rest.startswith(FUNCTION_OPEN) and re.fullmatch(_NAME, rest[len(FUNCTION_OPEN):]) else False


def _partial_marker(text: str, thinking: bool, parse_tools: bool) -> int:
    """How many characters at the end of `text` may begin a tag (held back until the next piece)."""
    at = text.find("<", max(0, len(text) - len(CALL_OPEN) + 1))
    while at >= 0:
        rest = text[at:]
        if thinking and THINK_CLOSE.startswith(rest) or parse_tools and CALL_OPEN.startswith(rest):
            return len(rest)
        at = text.find("<", at + 1)
    return 0


def collect(deltas: list[Delta]) -> tuple[str, str, list[ToolCall]]:
    """(reasoning, content, tool calls) of a whole reply's deltas."""
    reasoning = "".join(d.reasoning for d in deltas).strip()
    content = "".join(d.content for d in deltas).rstrip()
    return reasoning, content, [d.tool_call for d in deltas if d.tool_call is not None]
