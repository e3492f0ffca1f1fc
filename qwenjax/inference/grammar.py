"""Constrained decoding (structured outputs): a token mask per step from a grammar, applied beside sampling.

    spec = GrammarSpec.from_response_format(body["response_format"])     # None for {"type": "text"}
    spec = GrammarSpec.from_tools(body["tools"], body["tool_choice"])     # "required" or a named function
    backend = GrammarBackend(tokenizer, vocab_size=m.config.vocab_size, eos_ids=eos)   # one per engine
    matcher = backend.matcher(spec, after_thinking=True)   # one per request; compiled grammars are cached
    words = backend.allocate_bitmask(rows)                 # numpy int32 [rows, ceil(V/32)]
    matcher.fill_bitmask(words, row)  ->  logits = apply_token_bitmask(logits, words, constrained)  ->  sample
    matcher.accept(token)             # after sampling; matcher.terminated: only eos may follow
    matcher.validate(draft_ids)       # how many drafted tokens the grammar allows (speculative decoding)

The split follows vLLM's StructuredOutputBackend (one per engine: the tokenizer, compiling, the cache) and
StructuredOutputGrammar (one per request: accept, validate, rollback, fill, terminated). Bit j of word i allows
token 32*i + j, the convention of llguidance, xgrammar and vLLM. Thinking: with `after_thinking`, the reply
starts inside Qwen3.5's `<think>` block (the chat template opened it); any text but eos and special tokens is
allowed until `</think>` (SGLang's reasoner wrapper), then at most 8 blank characters, then the constraint.

The library is llguidance (>= 1.9), chosen over xgrammar 0.2.9 after measuring both (issue 37; the bundled
4,096-token vocabulary, and a Qwen3.5-sized one of 248,320 ids built from Qwen's own BPE ranks as
scripts/bench_grammar.py describes; a 2-core CPU shared with other jobs):
- Runtime dependencies: llguidance has none (one Rust extension, 8 MB); xgrammar requires torch, transformers
  and triton, and `import xgrammar` imports torch and transformers (9.5 s here). qwenjax's runtime has no torch.
- Special tokens: llguidance takes a tokenizer.json and treats added tokens as special, never text: a grammar
  names them by id (`</think>`, `<tool_call>` stay the model's single tokens) and no string can hold them.
  xgrammar, given the same vocabulary (raw or through transformers), let `<|im_start|>`, `<think>` and
  `</think>` be written inside a JSON string.
- Compile time at 248k: json_object 1.4-1.8 ms against xgrammar's 62-71 ms; a json_schema (nested object,
  enum, arrays, required fields) 1.7-6 ms against 65-88 ms; a 3-tool call grammar 2.7-11 ms against 410-485 ms
  (xgrammar precomputes masks per grammar state). At 4,096 ids both take 1-8 ms.
- Mask fill at 248k, medians per token: 13-22 us against xgrammar's 3-28 us; per whole reply 1-4 ms for the JSON
  documents against 2-5 ms. llguidance walks the vocabulary's trie (~3-10 ms here) in the few states its slices
  do not cover: just after a '<' in free text, e.g. twice as each string parameter's `</parameter>` is
  written (a 68-token reply of two calls: ~40 ms of masks against xgrammar's 0.3 ms, but 400 ms less compile).
- Tool calls: a Lark grammar with inline JSON schemas (`%json {...}`) writes Qwen3.5's XML format with each
  value typed by its parameter's schema in ~90 lines here.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import llguidance
import llguidance.numpy
import numpy as np

from qwenjax.validate import InputError

KINDS = ("json_object", "json_schema", "tool_call")
THINK_CLOSE, CALL_OPEN, CALL_CLOSE = "</think>", "<tool_call>", "</tool_call>"
MAX_SPEC_CHARS = 1 << 20  # far above real schemas and tool lists; llguidance has handled schemas of 4 MB
# JSON whitespace between tokens: at most one space (llguidance matches the pattern at most once per position), as
# vLLM's disable_any_whitespace. Its default is any run of whitespace, on which a model can loop forever; even a
# line break and an indent of up to 32 let the bundled model spend 95 tokens on {"name": ",", "age": 999}.
_JSON_OPTIONS = {"whitespace_pattern": r"\x20"}
_BLANK = r"/[\x20\x0A\x0D\x09]{1,8}/"  # between </think> and the answer, and between tool calls
# Free text (thinking, a string parameter) is written as pieces: a run without '<' (TEXT), then runs from one '<'
# to the next (LT) unless that starts markup which would end or restart the block around it. An LT always reaches
# the next '<' (nothing else may follow it), so markup cannot be spelled across two pieces. llguidance then
# takes most tokens as whole precomputed slices (tokens without '<', quotes, backslashes or control bytes;
# `_SLICES`, a subset of its JSON-string slices) instead of walking the vocabulary's trie: 10 us against ~8 ms
# a mask at a 248k vocabulary. Only the states just after a '<' walk it.
_TEXT_RULES = [r"TEXT: /[^<]+/",
               r"LT_CALL: /<[^<]*/ & ~/<\/?(parameter|function|tool_call)[=>](?s:.*)/",
               r"LT_THINK: /<[^<]*/ & ~/<\/think>(?s:.*)/"]
_SLICES = [r"[\x20\x0A\x0D\x09]+", r'[^"\\<\x00-\x1F\x7F]{1,10}', r'[^"\\<\x00-\x1F\x7F]{1,30}',
           r'[^"\\<\x00-\x1F\x7F]+']
_NAME_FORBIDDEN = set("<>\n\r")  # what would end `<function=NAME>` or `<parameter=NAME>` early


def _dump(value: Any, where: str) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: not JSON ({e})") from None
    except RecursionError:
        raise InputError(f"{where}: nested too deeply") from None
    if len(text) > MAX_SPEC_CHARS:
        raise InputError(f"{where}: longer than {MAX_SPEC_CHARS} characters as JSON")
    return text


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{where}: must be an object, got {type(value).__name__}")
    return value


def _known_keys(value: dict, keys: Sequence[str], where: str) -> None:
    unknown = [k for k in value if k not in keys]
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(keys)})")


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or value != value.strip() or _NAME_FORBIDDEN & set(value):
        raise InputError(f"{where}: must be a non-empty name without '<', '>', line breaks or outer spaces, "
                         f"got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its reply to. `kind`: "json_object" | "json_schema" (`spec`: the JSON schema)
    | "tool_call" (`spec`: {"functions": [{"name", "properties", "required", "defs"}], "parallel": bool}).
    `spec` is JSON text, key order kept (llguidance writes object properties in schema order): a cache key."""
    kind: str
    spec: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"grammar kind {self.kind!r}: must be one of {', '.join(KINDS)}")

    @property
    def field(self) -> str:
        """The request field the spec came from (for error messages)."""
        return {"tool_call": "tools", "json_schema": "response_format.json_schema.schema"}.get(self.kind,
                                                                                            "response_format")

    @classmethod
    def from_response_format(cls, response_format: Any) -> GrammarSpec | None:
        """OpenAI's `response_format`: None or {"type": "text"} → None (no constraint); {"type": "json_object"}
        → any JSON object; {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}
        → that schema (enforced whether or not `strict` is set). InputError names the field at fault."""
        if response_format is None:
            return None
        rf = _object(response_format, "response_format")
        kind = rf.get("type")
        if kind in ("text", "json_object"):
            _known_keys(rf, ("type",), "response_format")
            return None if kind == "text" else cls._checked("json_object", {"type": "object"}, "response_format")
        if kind != "json_schema":
            raise InputError(f"response_format.type: must be 'text', 'json_object' or 'json_schema', got {kind!r}")
        _known_keys(rf, ("type", "json_schema"), "response_format")
        js = _object(rf.get("json_schema"), "response_format.json_schema")
        _known_keys(js, ("name", "description", "schema", "strict"), "response_format.json_schema")
        if not isinstance(js.get("name"), str) or not js["name"]:
            raise InputError(f"response_format.json_schema.name: must be a non-empty string, got {js.get('name')!r}")
        if not isinstance(js.get("description", ""), str):
            raise InputError("response_format.json_schema.description: must be a string")
        if js.get("strict") not in (None, True, False):
            raise InputError(f"response_format.json_schema.strict: must be true or false, got {js['strict']!r}")
        schema = _object(js.get("schema", {}), "response_format.json_schema.schema")
        return cls._checked("json_schema", schema, "response_format.json_schema.schema")

    @classmethod
    def from_tools(cls, tools: Any, tool_choice: Any, parallel_tool_calls: bool = True) -> GrammarSpec | None:
        """OpenAI's `tools` and `tool_choice`: "required" → one or more calls to any of the tools (one with
        `parallel_tool_calls` false); {"type": "function", "function": {"name": N}} → exactly one call of N;
        None, "auto" and "none" → None (no constraint). Calls are Qwen3.5's XML, each value as text matching its
        parameter's JSON schema (strings as they are, other types as JSON)."""
        if tool_choice is None or tool_choice in ("auto", "none"):
            return None
        if not isinstance(tools, list) or not tools:
            raise InputError(f"tool_choice: {tool_choice!r} needs a non-empty `tools` list")
        functions = [cls._function(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
        names = [f["name"] for f in functions]
        if len(set(names)) < len(names):
            raise InputError(f"tools: function names must be distinct, got {names}")
        if tool_choice == "required":
            parallel = parallel_tool_calls
        elif isinstance(tool_choice, dict):
            _known_keys(tool_choice, ("type", "function"), "tool_choice")
            if tool_choice.get("type") != "function":
                raise InputError(f"tool_choice.type: must be 'function', got {tool_choice.get('type')!r}")
            name = _object(tool_choice.get("function"), "tool_choice.function").get("name")
            if name not in names:
                raise InputError(f"tool_choice.function.name: {name!r} is not one of the tools ({', '.join(names)})")
            functions, parallel = [functions[names.index(name)]], False
        else:
            raise InputError(f"tool_choice: must be 'none', 'auto', 'required' or {{\"type\": \"function\", "
                             f"\"function\": {{\"name\": ...}}}}, got {tool_choice!r}")
        return cls._checked("tool_call", {"functions": functions, "parallel": parallel}, "tools")

    @staticmethod
    def _function(tool: Any, where: str) -> dict:
        tool = _object(tool, where)
        if tool.get("type", "function") != "function":
            raise InputError(f"{where}.type: must be 'function', got {tool.get('type')!r}")
        function = _object(tool.get("function"), f"{where}.function")
        name = _name(function.get("name"), f"{where}.function.name")
        parameters = _object(function.get("parameters", {"type": "object", "properties": {}}),
                             f"{where}.function.parameters")
        if parameters.get("type", "object") != "object":
            raise InputError(f"{where}.function.parameters.type: must be 'object', got {parameters['type']!r}")
        properties = _object(parameters.get("properties", {}), f"{where}.function.parameters.properties")
        defs = {k: parameters[k] for k in ("$defs", "definitions") if k in parameters}
        for key, schema in properties.items():
            _name(key, f"{where}.function.parameters.properties key")
            rules = ["start: v"] + _TEXT_RULES
            _value_rule(schema, "v", f"{where}.function.parameters.properties.{key}", rules, defs)
            error = llguidance.LLMatcher.validate_grammar("\n".join(rules))
            if error:
                raise InputError(f"{where}.function.parameters.properties.{key}: {_short(error)}")
        required = parameters.get("required", [])
        if not isinstance(required, list) or any(r not in properties for r in required):
            raise InputError(f"{where}.function.parameters.required: must list names of `properties`, "
                             f"got {required!r}")
        return {"name": name, "properties": properties, "required": required, "defs": defs}

    @classmethod
    def _checked(cls, kind: str, value: dict, where: str) -> GrammarSpec:
        """The spec, its grammar built and validated by llguidance (without a tokenizer) so a bad schema is an
        InputError naming `where` before the request is admitted."""
        spec = cls(kind, _dump(value, where))
        error = llguidance.LLMatcher.validate_grammar(_grammar(spec, _TEXT_MARKERS, after_thinking=False))
        if error:
            raise InputError(f"{where}: {_short(error)}")
        return spec


def _short(error: str) -> str:
    """llguidance's error without the grammar listing it appends (our Lark, not the request's)."""
    error = re.sub(r"^at \d+\(\d+\): ", "", error.split("\n", 1)[0])
    return error if len(error) <= 500 else error[:497] + "..."


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _json_rule(schema: Any, where: str) -> str:
    """`%json {...}` for a (sub)schema, with our whitespace options (x-guidance is ours, not the request's)."""
    if isinstance(schema, dict):
        if "x-guidance" in schema:
            raise InputError(f"{where}: 'x-guidance' (llguidance's own options) is not accepted")
        schema = {"x-guidance": _JSON_OPTIONS, **schema}
    elif not isinstance(schema, bool):
        raise InputError(f"{where}: a JSON schema must be an object or a boolean, got {type(schema).__name__}")
    return "%json " + _dump(schema, where)


def _value_rule(schema: Any, rule: str, where: str, out: list[str], defs: dict) -> None:
    """Appends to `out` the Lark rules for a tool parameter's value as Qwen3.5 writes it, ending with the
    `</parameter>` that closes it: a string (a type list holding "string" too) as its raw text, anything else as
    JSON (`defs`: the parameters' `$defs`/`definitions`, which its `$ref`s point into); `enum` and `const` as
    their texts."""
    schema = _object(schema, where) if not isinstance(schema, bool) else {}
    close = _literal("\n</parameter>")
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types
    choices = [schema["const"]] if "const" in schema else schema.get("enum")
    if choices is not None:
        if not isinstance(choices, list) or not choices:
            raise InputError(f"{where}.enum: must be a non-empty list")
        texts = dict.fromkeys(c if isinstance(c, str) else _dump(c, where) for c in choices)
        out.append(f"{rule}: ({' | '.join(_literal(t) for t in texts)}) {close}")
    elif isinstance(types, list) and "string" in types:
        unsupported = [k for k in ("pattern", "format", "anyOf", "oneOf", "allOf", "$ref", "not") if k in schema]
        if unsupported:
            raise InputError(f"{where}: {unsupported[0]!r} is not supported for a string tool parameter "
                             "(written as raw text)")
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        if not isinstance(lo, int) or isinstance(lo, bool) or lo < 0 or \
                hi is not None and (not isinstance(hi, int) or isinstance(hi, bool) or hi < lo):
            raise InputError(f"{where}: minLength/maxLength must be integers with 0 <= minLength <= maxLength")
        if (lo, hi) == (0, None):  # pieces (see _TEXT_RULES); the value's last line break is in its text
            out.append(f"{rule}: TEXT? LT_CALL* {_literal('</parameter>')}")
        else:  # one bounded lexeme, ending at the first `\n</parameter>` (lazy)
            out.append(f"{rule}[suffix={close}]: {rule.upper()}")
            out.append(f"{rule.upper()}: /(?s:.{{{lo},{'' if hi is None else hi}}})/ & "
                       r"~/(?s:.*)<\/?(parameter|function|tool_call)[=>](?s:.*)/")
    else:
        out.append(f"{rule}: {_json_rule({**defs, **schema} if defs and schema else schema, where)} {close}")


def _tool_call_rules(spec: dict, markers: dict) -> list[str]:
    """Lark rules for Qwen3.5's calls (`calls` is the start):
    `<tool_call>\\n<function=NAME>\\n<parameter=K>\\nV\\n</parameter>\\n...</function>\\n</tool_call>`."""
    rules, alternatives = [], []
    for i, function in enumerate(spec["functions"]):
        parts = []
        for j, (key, schema) in enumerate(function["properties"].items()):
            _value_rule(schema, f"v{i}_{j}", f"parameter {key!r}", rules, function["defs"])
            rules.append(f"p{i}_{j}: " + _literal(f"<parameter={key}>\n") + f" v{i}_{j} " + _literal("\n"))
            parts.append(f"p{i}_{j}" + ("" if key in function["required"] else "?"))
        opening, closing = _literal(f"<function={function['name']}>\n"), _literal("</function>\n")
        rules.append(f"f{i}: {opening} {' '.join(parts)} {closing}")
        alternatives.append(f"f{i}")
    newline, functions = _literal("\n"), " | ".join(alternatives)
    rules.append(f"call: {markers[CALL_OPEN]} {newline} ({functions}) {markers[CALL_CLOSE]}")
    rules.append("calls: call (BLANK? call)*" if spec["parallel"] else "calls: call")
    return rules


_TEXT_MARKERS = {m: _literal(m) for m in (THINK_CLOSE, CALL_OPEN, CALL_CLOSE)}


def _grammar(spec: GrammarSpec, markers: dict, after_thinking: bool) -> str:
    """The llguidance grammar (Lark) of `spec`. `markers`: how `</think>`, `<tool_call>` and `</tool_call>`
    are written: the tokenizer's single token (`<[id]>`) where it has one, else their text."""
    value = json.loads(spec.spec)
    if spec.kind == "tool_call":
        rules, answer = _tool_call_rules(value, markers), "calls"
    else:
        rules, answer = [f"answer: {_json_rule(value, spec.field)}"], "answer"
    rules += [f"BLANK: {_BLANK}"] + _TEXT_RULES
    if not after_thinking:
        return "\n".join([f"start: {answer}"] + rules)
    # Thinking ends at `</think>` (the token where the tokenizer has one; its text spelled in pieces is not
    # allowed then, as the reply parser would split there), and may not hold eos.
    return "\n".join([f"start: TEXT? LT_THINK* {markers[THINK_CLOSE]} BLANK? {answer}"] + rules)


def _check_bitmask(words: np.ndarray, width: int) -> None:
    if not isinstance(words, np.ndarray) or words.dtype != np.int32 or words.ndim != 2 or \
            words.shape[1] != width or not words.flags["C_CONTIGUOUS"]:
        raise ValueError(f"bitmask: must be a C-contiguous numpy int32 array [rows, {width}], got "
                         f"{getattr(words, 'dtype', type(words).__name__)} {getattr(words, 'shape', '')}")


class GrammarMatcher:
    """One request's place in its grammar (vLLM's StructuredOutputGrammar). Not thread-safe: one request, one
    thread at a time. Once the grammar is complete llguidance stops and takes no token, eos included: the eos
    that ends the reply is then counted here (`_eos_past_stop`), so that accept, validate and rollback treat it
    as any other token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos_ids: frozenset[int]):
        self._m, self.vocab_size, self.eos_ids = matcher, vocab_size, eos_ids
        self.words = -(-vocab_size // 32)
        self.accepted = 0           # tokens accepted (and not rolled back): how far rollback may go
        self._ended = False         # an eos was accepted: nothing may follow
        self._eos_past_stop = 0     # 1 if that eos came after llguidance stopped (it did not consume it)

    def _check(self) -> None:
        if self._m.is_error():
            raise RuntimeError(f"grammar matcher failed: {_short(self._m.get_error())}")

    def fill_bitmask(self, words: np.ndarray, row: int) -> None:
        """Writes the tokens allowed next into `words[row]` (int32 [rows, ceil(V/32)]); once the grammar is
        complete only eos is allowed."""
        _check_bitmask(words, self.words)
        if not 0 <= row < words.shape[0]:
            raise ValueError(f"row {row}: outside the bitmask's {words.shape[0]} rows")
        self._check()
        llguidance.numpy.fill_next_token_bitmask(self._m, words, row)

    def accept(self, token_id: int) -> bool:
        """Advances past `token_id` if the grammar allows it (True); else changes nothing (False)."""
        token_id = int(token_id)
        self._check()
        if self._ended or not 0 <= token_id < self.vocab_size:
            return False
        if self._m.is_stopped():  # complete: only eos, which llguidance does not take then
            if token_id not in self.eos_ids:
                return False
            self._ended = self._eos_past_stop = True
        else:
            # validate first: a refused consume_token would leave llguidance in its (sticky) error state
            if self._m.validate_tokens([token_id]) != 1 or not self._m.consume_token(token_id):
                self._check()
                return False
            self._ended = token_id in self.eos_ids
        self.accepted += 1
        return True

    def validate(self, ids: Sequence[int]) -> int:
        """How many of `ids` (a draft), from the first, the grammar allows in a row; the state is unchanged."""
        self._check()
        ids = [int(t) for t in ids]
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < self.vocab_size), len(ids))
        ids = ids[:bad]
        if self._ended or not ids:
            return 0
        if self._m.is_stopped():
            return int(ids[0] in self.eos_ids)
        return self._m.validate_tokens(ids)

    def rollback(self, n: int) -> None:
        """Undoes the last `n` accepted tokens."""
        n = int(n)
        if not 0 <= n <= self.accepted:
            raise ValueError(f"cannot roll back {n} tokens: {self.accepted} accepted")
        self.accepted -= n
        if n and self._ended:
            n, self._ended, self._eos_past_stop = n - self._eos_past_stop, False, 0
        if n and not self._m.rollback(n):
            self._check()

    def fill_draft_bitmasks(self, words: np.ndarray, row: int, draft: Sequence[int]) -> int:
        """For speculative decoding: the masks of positions 0..len(draft) into rows row, row+1, ... (position
        i+1 as after drafted tokens 0..i), stopping at the first drafted token the grammar refuses; returns how
        many drafted tokens it allows. Rows past that are set to allow everything (their tokens are discarded).
        The state is unchanged."""
        accepted = 0
        for i in range(len(draft) + 1):
            self.fill_bitmask(words, row + i)
            if i == len(draft) or not self.accept(draft[i]):
                break
            accepted += 1
        words[row + accepted + 1:row + len(draft) + 1] = -1
        self.rollback(accepted)
        return accepted

    @property
    def terminated(self) -> bool:
        """The grammar is complete: nothing but eos may follow (or eos was accepted)."""
        return self._ended or self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        """The output so far is a whole document: eos is allowed (other tokens may be too)."""
        return not self._ended and self._m.is_accepting()

    def reset(self) -> None:
        """Back to the grammar's start."""
        self.rollback(self.accepted)


class GrammarBackend:
    """One per engine (vLLM's StructuredOutputBackend): the tokenizer as llguidance sees it, and a cache of
    compiled grammars keyed by (kind, spec, after_thinking); each request gets a copy of the compiled matcher.
    `tokenizer`: a qwenjax Tokenizer, or the text of a tokenizer.json. `vocab_size`: the model's (the logits'
    width; ids past the tokenizer's vocabulary are never allowed). `eos_ids`: the tokens that end a reply."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int], cache_size: int = 256):
        if not isinstance(tokenizer, str):
            with open(f"{tokenizer.path}/tokenizer.json", encoding="utf-8") as f:
                tokenizer = f.read()
        eos = sorted(set(int(e) for e in eos_ids))
        if not eos:
            raise ValueError("eos_ids: a constrained reply needs at least one token that ends it")
        try:
            self.tokenizer = llguidance.LLTokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos, slices=_SLICES)
        except ValueError as e:  # "vocab size too small; 4000 vs 4096"
            raise ValueError(f"vocab_size={vocab_size}: the model's vocabulary cannot be smaller than the "
                             f"tokenizer's ({e})") from None
        self.vocab_size, self.eos_ids = vocab_size, tuple(eos)
        self.words = -(-vocab_size // 32)
        self.markers = {m: self._marker(m) for m in _TEXT_MARKERS}
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_size, self._lock = cache_size, threading.Lock()
        self._executor = None

    def _marker(self, text: str) -> str:
        ids = self.tokenizer.tokenize_str(text, parse_special=True)
        if len(ids) == 1 and self.tokenizer.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return _TEXT_MARKERS[text]

    def allocate_bitmask(self, rows: int) -> np.ndarray:
        """An int32 [rows, ceil(V/32)] buffer, every token allowed."""
        return np.full((rows, self.words), -1, np.int32)

    def compile(self, spec: GrammarSpec, after_thinking: bool = False) -> llguidance.LLMatcher:
        """The compiled grammar (a matcher at its start, never advanced; cached). InputError names the field."""
        key = (spec.kind, spec.spec, bool(after_thinking))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        matcher = llguidance.LLMatcher(self.tokenizer, _grammar(spec, self.markers, after_thinking), log_level=0)
        if matcher.is_error():
            raise InputError(f"{spec.field}: {_short(matcher.get_error())}")
        with self._lock:
            self._cache[key] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher

    def matcher(self, spec: GrammarSpec, after_thinking: bool = False) -> GrammarMatcher:
        """A new request's matcher, at the start of `spec`'s grammar."""
        return GrammarMatcher(self.compile(spec, after_thinking).deep_copy(), self.vocab_size, frozenset(self.eos_ids))

    def fill_bitmasks(self, words: np.ndarray, rows: Sequence[tuple[GrammarMatcher, int]]) -> None:
        """`fill_bitmask` for many (matcher, row) pairs at once, on llguidance's thread pool."""
        _check_bitmask(words, self.words)
        for matcher, row in rows:
            matcher._check()
            if not 0 <= row < words.shape[0]:
                raise ValueError(f"row {row}: outside the bitmask's {words.shape[0]} rows")
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        llguidance.numpy.fill_next_token_bitmask_par(self._executor, [(m._m, r) for m, r in rows], words)


def apply_token_bitmask(logits: jax.Array, words: jax.Array, constrained: jax.Array | None = None) -> jax.Array:
    """`logits` [..., V] with the tokens their bitmask disallows at -inf (dtype kept: a select, no rounding).
    `words` [..., W] int32 (bit j of word i: token 32*i + j; ids at or past 32*W are disallowed), over the same
    leading axes (a batch, and a verify pass's positions); `constrained` [B] bool (default all): rows not
    constrained are returned as they are. Jittable."""
    vocab, width = logits.shape[-1], words.shape[-1]
    bits = (words[..., None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    allowed = bits.reshape(*words.shape[:-1], width * 32).astype(bool)
    allowed = allowed[..., :vocab] if width * 32 >= vocab else jnp.pad(
        allowed, [(0, 0)] * (allowed.ndim - 1) + [(0, vocab - width * 32)])
    if constrained is not None:
        allowed = allowed | ~constrained.reshape(-1, *[1] * (allowed.ndim - 1))
    return jnp.where(allowed, logits, jnp.array(-jnp.inf, logits.dtype))
