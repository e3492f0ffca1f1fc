"""Constrained decoding (qwenjax.inference.grammar): masks against oracles written here, a constrained greedy
decode over the bundled model whose replies must parse and validate, speculative checks, and request specs."""

import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
import regex

import qwenjax
from qwenjax.demo import DEFAULT_MODEL_DIR
from qwenjax.inference.grammar import GrammarBackend, GrammarSpec, apply_token_bitmask
from qwenjax.inference.sampling import argmax
from qwenjax.inference.tokenizer import Tokenizer
from qwenjax.model.cache import init_cache
from qwenjax.serve.reply_parser import parse_tool_call
from qwenjax.validate import InputError

EOS = (2, 0)  # the bundled model's generation_config.json: <|im_end|>, <|endoftext|>
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object", "properties": {
        "expression": {"type": "string", "maxLength": 12}}, "required": ["expression"]}}},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def backend(tok):
    return GrammarBackend(tok, 4096, EOS)


def allowed(words_row: np.ndarray) -> set[int]:
    """The token ids a bitmask row allows, read bit by bit (bit j of word i: token 32 i + j)."""
    return {32 * i + j for i, w in enumerate(words_row.tolist()) for j in range(32) if (w >> j) & 1}


# ---------------------------------------------------------------------------------------------- the token bytes
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a vocabulary entry uses for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@pytest.fixture(scope="module")
def token_bytes():
    """Each id's bytes, read from tokenizer.json itself; special (added) tokens as None."""
    data = json.load(open(f"{DEFAULT_MODEL_DIR}/tokenizer.json", encoding="utf-8"))
    decode = _byte_decoder()
    out: list = [None] * 4096
    for text, i in data["model"]["vocab"].items():
        out[i] = bytes(decode[c] for c in text)
    for added in data["added_tokens"]:  # the vocabulary repeats some of them; they are never text
        out[added["id"]] = None
    assert sum(b is None for b in out) == 5
    return out


def as_text(data: bytes) -> str | None:
    """`data` as text; an incomplete UTF-8 sequence at the end completed to some character (the grammar may still
    be waiting for its last bytes); None if the bytes cannot be UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.end != len(data) or e.reason != "unexpected end of data":
            return None
    for tail in (bytes([second]) + b"\x80" * more for more in range(3) for second in (0x80, 0xA0, 0x90, 0x8F)):
        try:
            return (data + tail).decode("utf-8")
        except UnicodeDecodeError:
            pass
    return None


# ------------------------------------------------------------------------------------------- apply_token_bitmask
def reference_apply(logits: np.ndarray, words: np.ndarray, constrained: np.ndarray) -> np.ndarray:
    out = logits.copy()
    for b in range(logits.shape[0]):
        if constrained[b]:
            for t in range(logits.shape[1]):
                word = t // 32
                if word >= words.shape[1] or not (int(words[b, word]) >> (t % 32)) & 1:
                    out[b, t] = -np.inf
    return out


@pytest.mark.parametrize("vocab, width", [(100, 3), (70, 3), (64, 2)])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_apply_token_bitmask_matches_numpy_reference(vocab, width, dtype):
    """Disallowed ids at -inf in constrained rows only; ids past the words' 32 W bits disallowed (a model vocab
    wider than the tokenizer's); the logits' dtype kept; jitted."""
    rng = np.random.default_rng(vocab)
    logits = rng.normal(size=(5, vocab)).astype(np.float32)
    logits = np.asarray(jnp.asarray(logits, dtype).astype(jnp.float32))  # values the dtype can hold
    words = rng.integers(-2**31, 2**31, size=(5, width), dtype=np.int64).astype(np.int32)
    words[1] = -1    # every bit
    words[2] = 0     # none
    constrained = np.array([True, True, True, False, True])
    got = jax.jit(apply_token_bitmask)(jnp.asarray(logits, dtype), jnp.asarray(words), jnp.asarray(constrained))
    assert got.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), reference_apply(logits, words, constrained))


# ------------------------------------------------------------------------------------ masks against JSON's rules
JSON_STRING = regex.compile(r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"')
JSON_NUMBER = regex.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
JSON_LITERAL = regex.compile(r"true|false|null")


class JsonPrefix:
    """An independent oracle: does text stay a prefix of one JSON object (RFC 8259), written with the whitespace
    the grammar allows between tokens (at most one space) and none around it?
    Strings, numbers and literals are matched by RFC 8259's regexes (partial matches while they grow)."""

    def __init__(self):
        self.stack, self.mode, self.ws = [], "root", ""
        self.sub = None  # the string, number or literal being read: ("str" | "num" | "lit", its text, is a key)

    def copy(self):
        other = JsonPrefix()
        other.stack, other.mode, other.ws, other.sub = list(self.stack), self.mode, self.ws, self.sub
        return other

    def feed(self, text: str) -> bool:
        return all(self._char(c) for c in text)

    @property
    def complete(self) -> bool:
        return self.mode == "done"

    def _after_value(self):
        self.mode = "done" if not self.stack else "comma_or_close"

    def _char(self, c: str) -> bool:
        if self.sub:
            kind, word, key = self.sub
            pattern = {"str": JSON_STRING, "num": JSON_NUMBER, "lit": JSON_LITERAL}[kind]
            if pattern.fullmatch(word + c, partial=True):
                self.sub = (kind, word + c, key)
                if kind != "num" and pattern.fullmatch(word + c):  # a closing quote, a literal's last letter
                    self.sub = None
                    if key:
                        self.mode = "colon"
                    else:
                        self._after_value()
                return True
            if kind != "num" or not pattern.fullmatch(word):
                return False
            self.sub = None  # the number ended: `c` comes after it
            self._after_value()
        if c in " \t\n\r":
            if self.mode in ("root", "done"):
                return False
            self.ws += c
            return self.ws == " "
        self.ws = ""
        mode = self.mode
        if mode in ("root", "value", "value_or_close"):
            if c == "{":
                self.stack.append("{")
                self.mode = "key_or_close"
            elif mode == "root":
                return False
            elif c == "[":
                self.stack.append("[")
                self.mode = "value_or_close"
            elif c in '"-0123456789tfn':
                self.sub = ("str" if c == '"' else "lit" if c in "tfn" else "num", c, False)
            elif c == "]" and mode == "value_or_close":
                self.stack.pop()
                self._after_value()
            else:
                return False
        elif mode in ("key_or_close", "key"):
            if c == '"':
                self.sub = ("str", c, True)
            elif c == "}" and mode == "key_or_close":
                self.stack.pop()
                self._after_value()
            else:
                return False
        elif mode == "colon":
            if c != ":":
                return False
            self.mode = "value"
        elif mode == "comma_or_close":
            if c == ",":
                self.mode = "key" if self.stack[-1] == "{" else "value"
            elif c == {"{": "}", "[": "]"}[self.stack[-1]]:
                self.stack.pop()
                self._after_value()
            else:
                return False
        else:
            return False
        return True


def test_json_prefix_oracle_agrees_with_json_loads():
    """The oracle itself, on documents json.loads judges: each complete one parses to a dict, each broken one is
    refused by the oracle at some point."""
    good = ['{}', '{"a": 1}', '{"a": [1, -2.5e+3, true, null, "x\\u00e9\\n"], "b": {"c": false}}',
            '{ "a": 0.5, "b": [] }', '{"é": "ü😀"}', '{"a" :-0}']
    bad = ['{"a": 01}', '{"a": 1.}', '{"a": tru}', '{a: 1}', '{"a": [1,]}', '{"a": "\\x"}', '{"a": 1} ', ' {}',
           '{"a": "\t"}', '{"a":  1}', '[1]', '{"a": 1,}', '{"a": -}', '{\n  "a": 0.5\n}']
    for text in good:
        o = JsonPrefix()
        assert o.feed(text) and o.complete, text
        assert isinstance(json.loads(text), dict)
    for text in bad:
        o = JsonPrefix()
        assert not (o.feed(text) and o.complete), text


def _json_backslash_or_del(text: str) -> bool:
    return "\\" in text or "\x7f" in text


def unexplained(refused: set[int], mask: set[int], token_bytes) -> list[int]:
    """Tokens the oracle takes but the mask refuses, less those llguidance refuses by design: where the grammar
    fixes the next bytes, it allows their canonical tokenization only, so a token spelling a shorter start of an
    allowed token (`f` where `function` is allowed) may be refused."""
    longer = [token_bytes[t] for t in mask if token_bytes[t] is not None]
    return sorted(t for t in refused if token_bytes[t] is None or
                  not any(b != token_bytes[t] and b.startswith(token_bytes[t]) for b in longer))


@pytest.mark.parametrize("prefix", ['', '{', '{"na', '{"name": ', '{"name": "Bo', '{"n": 12', '{"n": -',
                                    '{"a": [1, 2.5', '{"a": [true, ', '{"a": {"b": null}', '{"a": 1}',
                                    '{"a": "x" ', '{"a": 1e'])
def test_json_object_mask_matches_oracle(backend, tok, token_bytes, prefix):
    """At each state, a token is allowed iff the oracle keeps the text a prefix of a JSON object; eos iff the
    object is complete, and then nothing else. Special tokens are never text. Exceptions, each one way only:
    llguidance writes escapes only as JSON needs them (no `\\/`, no `\\u` for printable characters) and no raw
    DEL, so tokens with a backslash or DEL may be refused where JSON would take them."""
    spec = GrammarSpec.from_response_format({"type": "json_object"})
    m = backend.matcher(spec)
    for t in tok.encode(prefix):
        assert m.accept(t), (prefix, t)
    words = backend.allocate_bitmask(2)
    words[:] = 0
    m.fill_bitmask(words, 1)
    assert not words[0].any()
    mask = allowed(words[1])
    base = JsonPrefix()
    assert base.feed(prefix)
    oracle = set(EOS) if base.complete else set()
    for t, data in enumerate(token_bytes):
        text = None if data is None else as_text(prefix.encode() + data)
        if text is not None and base.copy().feed(text[len(prefix):]):
            oracle.add(t)
    assert mask <= oracle, [tok.decode([t], False) for t in sorted(mask - oracle)[:20]]
    missing = [t for t in unexplained(oracle - mask, mask, token_bytes)
               if not _json_backslash_or_del(as_text(token_bytes[t]) or "")]
    assert not missing, [tok.decode([t], False) for t in missing[:20]]
    assert m.terminated == base.complete
    if base.complete:
        assert mask == set(EOS)


# ------------------------------------------------------------------------ masks against a regex of the tool format
# special tokens as characters from the end of Unicode's last private-use plane, which no text here holds
SPECIAL_CHAR = {i: chr(0x10FF00 + i % 256) for i in (0, 1, 2, 4094, 4095)}
_TEXT = r"[^\U0010ff00-\U0010ffff]"
_FREE = rf"(?:(?!</?(?:parameter|function|tool_call)[=>]){_TEXT})"


def tool_call_language(parallel: bool, thinking: bool) -> regex.Pattern:
    """TOOLS' calls in Qwen3.5's XML format, written from the format's description (not from the grammar)."""
    weather = (r"<function=get_weather>\n<parameter=city>\n" + _FREE + r"*</parameter>\n"
               r"(?:<parameter=days>\n-?(?:0|[1-9][0-9]*)\n</parameter>\n)?"
               r"(?:<parameter=unit>\n(?:celsius|fahrenheit)\n</parameter>\n)?</function>\n")
    calculator = r"<function=calculator>\n<parameter=expression>\n" + _FREE + r"{0,12}\n</parameter>\n</function>\n"
    call = rf"<tool_call>\n(?:{weather}|{calculator})</tool_call>"
    calls = rf"{call}(?:[ \t\n\r]{{0,8}}{call})*" if parallel else call
    think = rf"(?:(?!</think>){_TEXT})*{SPECIAL_CHAR[4095]}[ \t\n\r]{{0,8}}" if thinking else ""
    return regex.compile(think + calls)


CITY = "<tool_call>\n<function=get_weather>\n<parameter=city>\n"
EXPRESSION = "<tool_call>\n<function=calculator>\n<parameter=expression>\n"
THINK_END = SPECIAL_CHAR[4095]  # the `</think>` token


@pytest.mark.parametrize("parallel, thinking, prefix", [
    (True, False, ""), (True, False, "<tool_call>\n<"), (True, False, "<tool_call>\n<function=get_weather>\n"),
    (True, False, CITY + "Paris <b"), (True, False, CITY + "Paris\n</"), (True, False, CITY + "Paris <parameter"),
    (True, False, CITY + "Paris </function"), (True, False, EXPRESSION + "1<tool_call"),
    (True, False, CITY + "Paris\n</parameter>\n"), (True, False, CITY + "A\n</parameter>\n<parameter=days>\n1"),
    (True, False, EXPRESSION + "1 + 2 * 3 - "),
    (True, False, EXPRESSION + "1\n</parameter>\n</function>\n</tool_call>"),
    (False, False, EXPRESSION + "1\n</parameter>\n</function>\n</tool_call>"),
    (True, True, ""), (True, True, "Let me see <"), (True, True, "Let me see </think"),
    (True, True, "I will call it." + THINK_END + "\n"),
])
def test_tool_call_mask_matches_format(backend, tok, token_bytes, parallel, thinking, prefix):
    """Qwen3.5's tool calls for `tool_choice: "required"`: a token is allowed iff the text stays a prefix of the
    format (regex partial match), special tokens only where the format names them (`</think>`), eos iff a call
    is complete."""
    spec = GrammarSpec.from_tools(TOOLS, "required", parallel_tool_calls=parallel)
    m = backend.matcher(spec, after_thinking=thinking)
    ids = [t for piece in prefix.split(THINK_END) for t in tok.encode(piece) + [4095]][:-1]
    for t in ids:
        assert m.accept(t), (prefix, tok.decode([t], False))
    words = backend.allocate_bitmask(1)
    m.fill_bitmask(words, 0)
    mask = allowed(words[0])
    language, text = tool_call_language(parallel, thinking), prefix
    oracle = set(EOS) if language.fullmatch(text) else set()
    for t, data in enumerate(token_bytes):
        piece = SPECIAL_CHAR[t] if data is None else as_text(text.encode() + data)
        piece = piece if data is None or piece is None else piece[len(text):]
        if piece is not None and language.fullmatch(text + piece, partial=True):
            oracle.add(t)
    assert mask <= oracle, [tok.decode([t], False) for t in sorted(mask - oracle)[:10]]
    assert not unexplained(oracle - mask, mask, token_bytes), \
        [tok.decode([t], False) for t in unexplained(oracle - mask, mask, token_bytes)[:10]]


def test_after_thinking_constrains_only_after_the_close(backend, tok, token_bytes):
    """Thinking takes any text (tokens that can be UTF-8) but eos and special tokens, and not `</think>` spelled
    in pieces; after the `</think>` token and a blank line, only the JSON object."""
    spec = GrammarSpec.from_response_format({"type": "json_object"})
    m = backend.matcher(spec, after_thinking=True)
    words = backend.allocate_bitmask(1)
    m.fill_bitmask(words, 0)
    text = {t for t, data in enumerate(token_bytes) if data is not None and as_text(data) is not None}
    assert allowed(words[0]) == text | {4095} and len(text) > 4000
    spelled = tok.encode("a </think") + tok.encode(">")
    assert m.validate(spelled) == len(spelled) - 1
    for t in tok.encode("Some thought {not json"):
        assert m.accept(t)
    assert m.accept(4095) and all(m.accept(t) for t in tok.encode("\n\n"))
    m.fill_bitmask(words, 0)
    texts = [tok.decode([t], False) for t in allowed(words[0])]
    assert "{" in texts and all(t.strip(" \t\n\r")[:1] in ("{", "") for t in texts), texts


# ---------------------------------------------------------------------------- speculative use, eos and the cache
DOCS = [("json_object", '{"a": [1, 2], "b": "x y"}'),
        ("tool_call", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                      "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")]


def _spec(kind):
    return GrammarSpec.from_response_format({"type": "json_object"}) if kind == "json_object" else \
        GrammarSpec.from_tools(TOOLS, {"type": "function", "function": {"name": "get_weather"}})


@pytest.mark.parametrize("kind, doc", DOCS)
def test_validate_and_draft_masks_agree_with_token_by_token(backend, tok, kind, doc):
    """validate(draft) is the number of drafted tokens consumed one by one before the first refusal (eos
    included), from every position, with a wrong token planted; fill_draft_bitmasks writes the masks that
    stepping gives, and neither changes the state."""
    ids = tok.encode(doc) + [EOS[0]]
    rng = np.random.default_rng(0)
    for start in range(0, len(ids), 3):
        draft = list(ids[start:start + 5])
        if start % 2:
            draft[len(draft) // 2] = int(rng.integers(3, 4094))
        m = backend.matcher(_spec(kind))
        assert all(m.accept(t) for t in ids[:start])
        stepwise, masks, words = 0, [], backend.allocate_bitmask(1)
        for t in draft + [None]:
            m.fill_bitmask(words, 0)
            masks.append(words[0].copy())
            if t is None or not m.accept(t):
                break
            stepwise += 1
        m.rollback(stepwise)
        assert m.validate(draft) == stepwise, (start, draft)
        rows = backend.allocate_bitmask(len(draft) + 1)
        assert m.fill_draft_bitmasks(rows, 0, draft) == stepwise
        for i, mask in enumerate(masks[:stepwise + 1]):
            np.testing.assert_array_equal(rows[i], mask)
        assert (rows[stepwise + 1:] == -1).all()
        assert m.validate(draft) == stepwise  # unchanged by the above


def test_complete_grammar_allows_only_eos(backend, tok):
    m, ids = backend.matcher(_spec("json_object")), tok.encode('{"a": 1}')
    for t in ids:
        assert m.accept(t)
    assert m.terminated and m.accepting
    words = backend.allocate_bitmask(1)
    m.fill_bitmask(words, 0)
    assert allowed(words[0]) == set(EOS)
    assert not m.accept(tok.encode(" ")[0]) and m.validate([EOS[1], EOS[0]]) == 1
    assert m.accept(EOS[1]) and m.terminated and not m.accept(EOS[0]) and m.validate([EOS[0]]) == 0
    m.rollback(2)  # the eos and the object's last token
    assert not m.terminated and m.validate([ids[-1], EOS[0]]) == 2


def test_rollback_and_bad_ids_leave_the_matcher_usable(backend, tok):
    """Rolling back past the start, or token ids outside the vocabulary, are refused without breaking the
    matcher (llguidance's own errors would be permanent); a long reply rolls back whole."""
    m, ids = backend.matcher(_spec("json_object")), tok.encode('{"a": "' + "word " * 200 + '"}') + [EOS[0]]
    assert all(m.accept(t) for t in ids) and m.accepted == len(ids)
    with pytest.raises(ValueError, match="cannot roll back"):
        m.rollback(len(ids) + 1)
    m.rollback(len(ids))
    assert not m.accept(-1) and not m.accept(4096) and m.validate(ids[:3] + [4096] + ids[3:]) == 3
    assert m.validate(ids) == len(ids)
    m.accept(ids[0])
    m.reset()
    assert m.accepted == 0 and m.validate(ids) == len(ids)


def test_tool_parameters_by_schema(backend, tok):
    """Values as Qwen3.5 writes them: a string (or a type list with one) as raw text, other types as JSON, `$ref`s
    into the parameters' `$defs` (as pydantic writes them) resolved, enum and const as their texts."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
                            "additionalProperties": False}},
        "properties": {"p": {"$ref": "#/$defs/Point"}, "s": {"type": ["string", "null"]},
                       "n": {"type": "number"}, "c": {"const": 3}, "b": {"type": "boolean"}},
        "required": ["p", "s", "n", "c", "b"]}}}
    m = backend.matcher(GrammarSpec.from_tools([tool], "required"))
    head = "<tool_call>\n<function=f>\n<parameter=p>\n"
    good = (head + '{"x": 1}\n</parameter>\n<parameter=s>\n"quoted" <i>text</i>\n</parameter>\n<parameter=n>\n'
            "-2.5e3\n</parameter>\n<parameter=c>\n3\n</parameter>\n<parameter=b>\ntrue\n</parameter>\n</function>\n"
            "</tool_call>")
    ids = tok.encode(good) + [EOS[0]]
    assert m.validate(ids) == len(ids)
    call = parse_tool_call(good[len("<tool_call>"):-len("</tool_call>")], [tool])
    assert json.loads(call.arguments) == {"p": {"x": 1}, "s": '"quoted" <i>text</i>', "n": -2500.0, "c": 3,
                                          "b": True}
    for bad in ('{"x": "1"}', '{"y": 1}', "Point(x=1)"):
        ids = tok.encode(head + bad + "\n</parameter>")
        assert m.validate(ids) < len(ids), bad


def test_tool_calls_may_end_or_go_on(backend, tok):
    """With parallel calls, a complete call allows eos or another call; a named function allows only one."""
    call = DOCS[1][1]
    for spec, more in ((GrammarSpec.from_tools(TOOLS, "required"), True), (_spec("tool_call"), False)):
        m = backend.matcher(spec)
        assert all(m.accept(t) for t in tok.encode(call))
        assert m.accepting and m.terminated == (not more)
        assert (m.validate(tok.encode("\n" + call) + [EOS[0]]) == len(tok.encode("\n" + call)) + 1) == more


def test_vocab_wider_than_tokenizer_is_never_allowed(tok):
    be = GrammarBackend(tok, 4096 + 40, EOS)
    assert be.words == 130
    m = be.matcher(GrammarSpec.from_response_format({"type": "json_object"}), after_thinking=True)
    words = be.allocate_bitmask(1)
    m.fill_bitmask(words, 0)
    assert max(allowed(words[0])) == 4095 and len(allowed(words[0])) > 4000
    with pytest.raises(ValueError, match="vocab_size=4000"):
        GrammarBackend(tok, 4000, EOS)


def test_cache_and_matchers(backend):
    spec = GrammarSpec.from_response_format({"type": "json_object"})
    assert backend.compile(spec) is backend.compile(GrammarSpec.from_response_format({"type": "json_object"}))
    assert backend.compile(spec, after_thinking=True) is not backend.compile(spec)
    a, b = backend.matcher(spec), backend.matcher(spec)
    assert a.accept(93)  # `{`
    assert b.validate([93]) == 1 and not b.accept(5)
    words = backend.allocate_bitmask(2)
    backend.fill_bitmasks(words, [(a, 0), (b, 1)])
    single = backend.allocate_bitmask(1)
    a.fill_bitmask(single, 0)
    np.testing.assert_array_equal(words[0], single[0])
    b.fill_bitmask(single, 0)
    np.testing.assert_array_equal(words[1], single[0])
    with pytest.raises(ValueError, match="bitmask"):
        a.fill_bitmask(np.zeros((1, 100), np.int32), 0)


# ----------------------------------------------------------------------------------------------- request specs
def test_specs_from_request_fields():
    assert GrammarSpec.from_response_format(None) is None
    assert GrammarSpec.from_response_format({"type": "text"}) is None
    assert GrammarSpec.from_response_format({"type": "json_object"}).kind == "json_object"
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    spec = GrammarSpec.from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                                   "strict": True}})
    assert spec.kind == "json_schema" and json.loads(spec.spec) == schema and list(json.loads(spec.spec)) == ["type",
                                                                                                            "properties"]
    for choice in (None, "auto", "none"):
        assert GrammarSpec.from_tools(TOOLS, choice) is None
    named = GrammarSpec.from_tools(TOOLS, {"type": "function", "function": {"name": "calculator"}})
    assert [f["name"] for f in json.loads(named.spec)["functions"]] == ["calculator"]


@pytest.mark.parametrize("rf, field", [
    ({"type": "json"}, "response_format.type"),
    ("json_object", "response_format"),
    ({"type": "json_object", "schema": {}}, "response_format"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}}, "response_format.json_schema.strict"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schemas": {}}}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "color"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"x-guidance": {"lenient": True}}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}},
     "response_format.json_schema.schema"),
])
def test_bad_response_format_names_the_field(rf, field):
    with pytest.raises(InputError, match=re.escape(field) + ":"):
        GrammarSpec.from_response_format(rf)


def _tool(name="f", **properties):
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object",
                                                                          "properties": properties}}}


@pytest.mark.parametrize("tools, choice, field", [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
    (TOOLS, "sometimes", "tool_choice"),
    (TOOLS, {"type": "tool", "function": {"name": "calculator"}}, "tool_choice.type"),
    ([], "required", "tool_choice"),
    ([_tool(), _tool()], "required", "tools"),
    ([_tool(name="a>b")], "required", "tools[0].function.name"),
    ([_tool(x={"type": "string", "pattern": "^a$"})], "required", "tools[0].function.parameters.properties.x"),
    ([_tool(x={"type": "integer", "minimum": "1"})], "required", "tools[0].function.parameters.properties.x"),
    ([_tool(x={"type": "string", "anyOf": [{"maxLength": 3}]})], "required",
     "tools[0].function.parameters.properties.x"),
    ([_tool(x={"$ref": "#/$defs/Missing"})], "required", "tools[0].function.parameters.properties.x"),
    ([_tool(**{"a\nb": {"type": "string"}})], "required", "tools[0].function.parameters.properties key"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "required",
     "tools[0].function.parameters.type"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"properties": {}, "required": ["x"]}}}],
     "required", "tools[0].function.parameters.required"),
])
def test_bad_tools_name_the_field(tools, choice, field):
    with pytest.raises(InputError, match=re.escape(field) + ":"):
        GrammarSpec.from_tools(tools, choice)


# ------------------------------------------------------------------------------ greedy decoding over the model
@pytest.fixture(scope="module")
def decode(tok):
    """Greedy decoding of the bundled model with a grammar: mask (apply_token_bitmask), argmax, accept."""
    from flax import nnx

    m = qwenjax.from_pretrained(DEFAULT_MODEL_DIR, dtype="float32")
    backend = GrammarBackend(tok, m.config.vocab_size, EOS)
    graphdef, width, capacity = m.graphdef, 128, 128 + 400
    prefill = jax.jit(lambda p, c, ids, mask: nnx.merge(graphdef, p).extend(ids, c, attention_mask=mask, fresh=True))
    step = jax.jit(lambda p, c, t: nnx.merge(graphdef, p).extend(t[:, None], c))
    pick = jax.jit(lambda logits, words, constrained: argmax(apply_token_bitmask(logits, words, constrained)))

    def run(spec: GrammarSpec, question: str, max_new_tokens: int) -> tuple[str, int]:
        """The reply's text (eos dropped) and at how many steps the mask changed the model's own choice."""
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}], enable_thinking=False))
        ids, mask = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
        ids[0, :len(prompt)], mask[0, :len(prompt)] = prompt, 1
        logits, cache = prefill(m.params, init_cache(m.config, 1, capacity, m.dtype), ids, mask)
        matcher, words, out, changed = backend.matcher(spec), backend.allocate_bitmask(1), [], 0
        for _ in range(max_new_tokens):
            matcher.fill_bitmask(words, 0)
            token = int(pick(logits, words, np.ones(1, bool))[0])
            changed += token != int(argmax(logits)[0])
            assert matcher.accept(token)
            out.append(token)
            if token in EOS:
                break
            logits, cache = step(m.params, cache, np.array([token], np.int32))
        assert out[-1] in EOS and matcher.terminated, tok.decode(out, False)
        return tok.decode(out[:-1], skip_special_tokens=False), changed

    return run


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "kind": {"enum": ["function", "class", "module"]},
    "lines": {"type": "integer", "minimum": 1, "maximum": 9999},
    "args": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4}},
    "required": ["name", "kind", "lines", "args"], "additionalProperties": False}


def test_decode_json_object_and_schema(decode):
    """Each reply parses and validates, though the model left alone would have written something else."""
    text, changed = decode(GrammarSpec.from_response_format({"type": "json_object"}),
                           "Describe the os.path module as a JSON object.", 100)
    assert isinstance(json.loads(text), dict) and changed
    spec = GrammarSpec.from_response_format({"type": "json_schema", "json_schema": {"name": "doc", "strict": True,
                                                                                   "schema": SCHEMA}})
    for question in ("Describe os.path.join.", "Describe the class list."):
        text, changed = decode(spec, question, 400)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert changed


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_decode_tool_call(decode, choice):
    """One call (parallel_tool_calls false for "required": this model would call tools forever), parsed by the
    server's reply parser into a tool of TOOLS (the named one) with arguments of their schema's types."""
    tools = json.loads(json.dumps(TOOLS))
    tools[0]["function"]["parameters"]["properties"]["city"]["maxLength"] = 30  # this model rambles in free text
    text, changed = decode(GrammarSpec.from_tools(tools, choice, parallel_tool_calls=False),
                           "What does the os module do?", 200)  # one it answers in text, unconstrained
    assert changed
    assert text.startswith("<tool_call>") and text.endswith("</tool_call>")
    call = parse_tool_call(text[len("<tool_call>"):-len("</tool_call>")], tools)
    function = {t["function"]["name"]: t["function"] for t in tools}[call.name]
    if isinstance(choice, dict):
        assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), function["parameters"])
