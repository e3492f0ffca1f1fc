"""Tool calls and thinking read from a reply (qwenjax.serve.reply_parser), on cases in the peers' style — vLLM's
qwen3coder and hermes tool-parser tests, SGLang's function-call parser tests: a model output, the calls expected
(name and typed arguments), the content left — with inputs of our own.

Every case runs whole and streamed: one character at a time, pieces of random sizes, and the bundled tokenizer's
tokens decoded as the server decodes them; the streamed deltas joined must give the whole-text result, and every
call's `function.arguments` must be a JSON object. Expected arguments are compared as canonical JSON, so `1`,
`1.0` and `true` differ."""

import json
import random
import time

import jinja2
import jinja2.ext
import jinja2.sandbox
import pytest

from qwenjax.demo import DEFAULT_MODEL_DIR
from qwenjax.inference.tokenizer import StreamDecoder, Tokenizer, split_thinking
from qwenjax.serve.reply_parser import MAX_NESTING, ReplyParser, collect, parse_tool_call


def _function(name: str, properties: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"The {name} tool.", "parameters": {
        "type": "object", "properties": properties, "required": list(properties)[:1]}}}


TOOLS = [
    _function("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"},
                              "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}),
    _function("bash", {"cmd": {"type": "string"}, "timeout": {"type": "number"}}),
    _function("write_file", {"path": {"type": "string"}, "content": {"type": "string"}}),
    _function("configure", {
        "enabled": {"type": "boolean"}, "ratio": {"type": "number"}, "retries": {"type": "integer"},
        "note": {"type": ["string", "null"]}, "label": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "tags": {"type": "array", "items": {"type": "string"}}, "options": {"type": "object"},
        "target": {"oneOf": [{"type": "array"}, {"type": "string"}]}, "level": {"enum": [1, 2, 3]},
        "mode": {"enum": ["fast", "slow"]}, "strict": {"const": True}, "count": {"type": ["integer", "string"]},
        "anything": {}, "choice": {"anyOf": [{"type": "boolean"}, {"type": "null"}]}}),
]


def xml(name: str, *params: tuple[str, str]) -> str:
    """A call as Qwen3.5's chat template writes it (`params`: (name, value text))."""
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in params)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def canonical(calls) -> list:
    return [(name, json.dumps(arguments, sort_keys=True)) for name, arguments in calls]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(DEFAULT_MODEL_DIR)


def splits(text: str, tok) -> dict[str, list[str]]:
    """The ways a reply arrives: whole, a character at a time, random piece sizes, the bundled tokenizer's tokens
    (decoded one at a time as the server's StreamDecoder does)."""
    rng = random.Random(len(text))
    out = {"whole": [text], "chars": list(text)}
    for trial in range(2):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, len(text) // 3))) if len(text) > 1 else []
        out[f"random{trial}"] = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    decoder = StreamDecoder(tok, skip_special_tokens=False)
    out["tokens"] = [decoder.push(t) for t in tok.encode(text)]
    assert "".join(out["tokens"]) == text  # the tokenizer round-trips the case's text
    return out


def parsed(text: str, tok, tools=TOOLS, thinking: bool = False, parse_tools: bool = True):
    """(reasoning, content, [(name, arguments)]) of `text`: the same whole and in every streamed split."""
    results = {}
    for mode, pieces in splits(text, tok).items():
        parser = ReplyParser(thinking, tools, parse_tools=parse_tools)
        deltas = [d for piece in pieces for d in parser.feed(piece)] + parser.finish()
        reasoning, content, calls = collect(deltas)
        assert parser.calls == len(calls)  # the count the server's finish_reason reads
        for call in calls:
            assert isinstance(json.loads(call.arguments), dict), call.arguments
        results[mode] = (reasoning, content, canonical((c.name, json.loads(c.arguments)) for c in calls))
    for mode, result in results.items():
        assert result == results["whole"], f"{mode} split: {result} != whole text's {results['whole']}"
    return results["whole"]


def check(text, calls, content="", tok=None, reasoning="", **kw):
    assert parsed(text, tok, **kw) == (reasoning, content, canonical(calls))


# ---- the format: single, parallel, with content, JSON form (vLLM qwen3coder / hermes shapes) -----------------
WEATHER = xml("get_weather", ("city", "Dallas"), ("days", "3"), ("unit", "fahrenheit"))
BASICS = [
    pytest.param("This is a reply without tool calls.", [], "This is a reply without tool calls.", id="no_call"),
    pytest.param(WEATHER, [("get_weather", {"city": "Dallas", "days": 3, "unit": "fahrenheit"})], "",
                 id="single"),
    pytest.param("Sure, checking.\n\n" + WEATHER, [("get_weather", {"city": "Dallas", "days": 3,
                                                                     "unit": "fahrenheit"})], "Sure, checking.",
                 id="content_before"),
    pytest.param(xml("bash", ("cmd", "cd /tmp &&\nls -la\n  | wc -l")),
                 [("bash", {"cmd": "cd /tmp &&\nls -la\n  | wc -l"})], "", id="multiline_value"),
    pytest.param(WEATHER + "\n" + xml("get_weather", ("city", "Orlando"), ("days", "1")),
                 [("get_weather", {"city": "Dallas", "days": 3, "unit": "fahrenheit"}),
                  ("get_weather", {"city": "Orlando", "days": 1})], "", id="parallel"),
    pytest.param(xml("bash", ("cmd", "date")) + "\nI ran it.", [("bash", {"cmd": "date"})], "I ran it.",
                 id="content_after"),
    pytest.param(xml("now"), [("now", {})], "", id="no_parameters"),
    pytest.param(xml("lookup", ("key", "42"), ("flag", "True")), [("lookup", {"key": 42, "flag": True})], "",
                 id="undeclared_function_untyped"),
    pytest.param("<tool_call>\n<function=get weather>\n</function>\n</tool_call>", [],
                 "<tool_call>\n<function=get weather>\n</function>\n</tool_call>", id="name_with_space_is_text"),
    pytest.param("<tool_call>\n<function={{ tool.name }}>\n</function>\n</tool_call>", [],
                 "<tool_call>\n<function={{ tool.name }}>\n</function>\n</tool_call>", id="template_leftover_is_text"),
    pytest.param("Use <tool_call> tags to call tools.", [], "Use <tool_call> tags to call tools.",
                 id="prose_mentioning_the_tag"),
    pytest.param('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>',
                 [("get_weather", {"city": "Oslo", "days": 2})], "", id="json_single"),
    pytest.param('Checking.<tool_call>{"name": "bash", "arguments": {"cmd": "ls"}}</tool_call>\n<tool_call>'
                 '{"name": "bash", "parameters": {"cmd": "pwd"}}</tool_call>',
                 [("bash", {"cmd": "ls"}), ("bash", {"cmd": "pwd"})], "Checking.", id="json_parallel_parameters"),
    pytest.param('<tool_call>{"name": "write_file", "arguments": {"path": "a", "content": "x</tool_call>y"}}'
                 '</tool_call>', [("write_file", {"path": "a", "content": "x</tool_call>y"})], "",
                 id="json_close_tag_inside_a_string"),
    pytest.param('<tool_call>{"name": "bash", "arguments": {"cmd": "echo \\"}\\" \\\\"}}</tool_call>',
                 [("bash", {"cmd": 'echo "}" \\'})], "", id="json_escapes_and_brackets_in_strings"),
]


@pytest.mark.parametrize("text,calls,content", BASICS)
def test_format(tok, text, calls, content):
    check(text, calls, content, tok)


# ---- defect 1 and 2: values typed by the schema, Python literals as the template writes them, anyOf ---------
TYPED = [  # (parameter of `configure`, value text, value)
    ("enabled", "True", True), ("enabled", "False", False), ("enabled", "true", True), ("enabled", "false", False),
    ("enabled", "None", None), ("enabled", "yes", "yes"),
    ("ratio", "0.25", 0.25), ("ratio", "1e-05", 1e-05), ("ratio", "3", 3), ("ratio", "-7.5", -7.5),
    ("ratio", "nan", "nan"), ("ratio", "inf", "inf"), ("ratio", "1e400", "1e400"),
    ("retries", "3", 3), ("retries", "3.0", 3), ("retries", "2.5", "2.5"), ("retries", "three", "three"),
    ("retries", "100000000000000000000", 10 ** 20),
    ("note", "42", "42"), ("note", "None", None), ("note", "null", None), ("note", "Some text", "Some text"),
    ("note", "True", "True"),
    ("label", "42", "42"), ("label", "None", None), ("label", "  padded  ", "  padded  "),
    ("limit", "7", 7), ("limit", "None", None), ("limit", "null", None), ("limit", "seven", "seven"),
    ("choice", "True", True), ("choice", "None", None),
    ("tags", '["a", "b"]', ["a", "b"]), ("tags", "['a', 'b']", ["a", "b"]), ("tags", "('a',)", ["a"]),
    ("tags", "[]", []), ("tags", "not a list", "not a list"), ("tags", '{"a": 1}', '{"a": 1}'),
    ("options", '{"verbose": true, "depth": null, "nested": {"x": [1, 2.5]}}',
     {"verbose": True, "depth": None, "nested": {"x": [1, 2.5]}}),
    ("options", "{'verbose': True, 'depth': None}", {"verbose": True, "depth": None}), ("options", "{}", {}),
    ("options", "{1: 2}", "{1: 2}"), ("options", "{'a': {1, 2}}", "{'a': {1, 2}}"),
    ("options", '{"bad": NaN}', '{"bad": NaN}'),
    ("target", '["x", "y"]', ["x", "y"]), ("target", "x", "x"),
    ("level", "2", 2), ("mode", "fast", "fast"), ("strict", "True", True), ("count", "42", "42"),
    ("anything", "[1, 2]", [1, 2]), ("anything", "True", True), ("anything", "None", None),
    ("anything", "free text", "free text"), ("anything", '"quoted"', "quoted"), ("anything", "", ""),
]


@pytest.mark.parametrize("key,text,value", TYPED, ids=[f"{k}={t}" for k, t, _ in TYPED])
def test_values_typed_by_the_schema(tok, key, text, value):
    check(xml("configure", (key, text)), [("configure", {key: value})], "", tok)


STRINGS = ["True", "None", "null", "42", "[1, 2]", "  spaced  ", "line one\nline two", "\nleading newline",
           "trailing newline\n", "", '{"looks": "like json"}', "Ünïcödé 🙂"]


@pytest.mark.parametrize("text", STRINGS, ids=[repr(s) for s in STRINGS])
def test_string_parameters_keep_the_text(tok, text):
    check(xml("get_weather", ("city", text)), [("get_weather", {"city": text})], "", tok)


# ---- defect 3: markup inside values (code written to files) -------------------------------------------------
def _written(path: str, content: str):
    return xml("write_file", ("path", path), ("content", content)), [("write_file", {"path": path,
                                                                                     "content": content})]


MARKUP = {
    "inline_parameter_tag": "Use <parameter=name> to name one.",
    "close_tag_then_text": 'x = "a</parameter>b"',
    "close_tag_line_then_text": "first\n</parameter>\nsecond",
    "function_tag_line": "<function=other>\nx",
    "tool_call_lines": "<tool_call>\nnot a call\n</tool_call>",
    "function_close_line": "x\n</function>\ny",
    "close_tags_then_more": "x\n</parameter>\n</function>\nmore",
    "close_tags_tool_call_then_more": "x\n</parameter>\n</function>\n</tool_call>\nmore",
    "another_functions_call": xml("bash", ("cmd", "ls")),
    "this_functions_call": xml("write_file", ("path", "inner.txt"), ("content", "inner")),
    "two_calls_of_it": xml("write_file", ("path", "a"), ("content", "1")) + "\n" + xml("bash", ("cmd", "x")),
    "given_parameter_after_close": "x\n</parameter>\n<parameter=path>\ny\n</parameter>\nz",
    "undeclared_parameter_after_close": "x\n</parameter>\n<parameter=mode>\ny\n</parameter>\nz",
    "regex_in_code": 'PATTERN = re.compile(r"<parameter=(.*?)>\\n(.*?)\\n</parameter>", re.S)\n',
    "think_tags": "<think>\n</think>\n<think>",
    "json_like": '{"name": "bash", "arguments": {"cmd": "ls"}}</tool_call>',
}


@pytest.mark.parametrize("content", MARKUP.values(), ids=MARKUP.keys())
def test_markup_inside_a_value(tok, content):
    text, calls = _written("out/file.txt", content)
    check("Writing it.\n" + text, calls, "Writing it.", tok)
    assert parse_tool_call(text[len("<tool_call>"):-len("</tool_call>")], TOOLS).arguments == json.dumps(
        calls[0][1], ensure_ascii=False)


def test_markup_inside_a_value_of_a_call_inside_thinking(tok):
    text, calls = _written("notes.md", "<think>\nnested\n</think>\n" + xml("bash", ("cmd", "ls")))
    check("I will save it.\n" + text + "\n</think>\n\nSaved.", calls, "Saved.", tok, reasoning="I will save it.",
          thinking=True)


def test_a_declared_parameter_not_given_yet_is_the_structure(tok):
    """The rule that decides: `</parameter>` then a parameter the schema declares and the call has not given is
    where the value ends (here `path` comes after `content`)."""
    text = "<tool_call>\n<function=write_file>\n<parameter=content>\nx\n</parameter>\n<parameter=path>\ny\n" \
           "</parameter>\n</function>\n</tool_call>"
    check(text, [("write_file", {"content": "x", "path": "y"})], "", tok)


MALFORMED = [  # what the strict reading cannot close is read leniently once the reply is over
    pytest.param("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n3\n</parameter>\n"
                 "</function>\n</tool_call>", [("get_weather", {"city": "Paris", "days": 3})],
                 id="missing_close_before_next_parameter"),
    pytest.param("<tool_call>\n<function=bash>\n<parameter=cmd>\nls\n</function>\n</tool_call>",
                 [("bash", {"cmd": "ls"})], id="missing_close_before_function_end"),
    pytest.param("<tool_call>\n<function=bash>\n<parameter=cmd>\nls\n</parameter>\n</tool_call>",
                 [("bash", {"cmd": "ls"})], id="missing_function_end"),
    pytest.param("<tool_call>\n<function=bash>\n<parameter=cmd>\nls\n</parameter>\n</function>\n</tool_call>\n"
                 "Done.", [("bash", {"cmd": "ls"})], id="text_after_the_call"),
    pytest.param(xml("get_weather", ("city", "42"), ("extra", "[1, 2]"), ("days", "2")),
                 [("get_weather", {"city": "42", "extra": [1, 2], "days": 2})], id="undeclared_parameter"),
]


@pytest.mark.parametrize("text,calls", MALFORMED)
def test_malformed_calls_read_leniently(tok, text, calls):
    content = text.split("</tool_call>")[-1].strip()
    check(text, calls, content, tok)


@pytest.mark.parametrize("content", ["<parameter=x>\nno close for it", "x\n</parameter>\n<parameter=path>\ny"])
def test_an_unpaired_tag_on_its_own_line_leaves_the_call_as_text(tok, content):
    """A value with `<parameter=…>` on its own line and no `</parameter>` for it: the value's own `</parameter>`
    pairs with that tag, so the call never closes. Where the value ends is a guess; the call stays text (a
    client sees it, nothing runs with a wrong value)."""
    text, _ = _written("a", content)
    check(text, [], text, tok)


# ---- defect 4: a JSON-form call whose arguments are not an object stays text -----------------------------------
NOT_OBJECTS = {
    "string": '{"name": "bash", "arguments": "hello"}',
    "unclosed_list": '{"name": "bash", "arguments": [oops}',
    "string_with_tail": '{"name": "bash", "arguments": "{\\"a\\": 1} tail"}',
    "object_with_tail": '{"name": "bash", "arguments": {"a": 1} tail}',
    "list": '{"name": "bash", "arguments": [1, 2]}',
    "number": '{"name": "bash", "arguments": 5}',
    "nan": '{"name": "bash", "arguments": {"x": NaN}}',
    "no_name": '{"arguments": {"cmd": "ls"}}',
    "name_not_a_string": '{"name": 5, "arguments": {}}',
    "two_objects": '{"name": "bash", "arguments": {}} {"name": "bash", "arguments": {}}',
    "not_json": "{name: bash}",
}


@pytest.mark.parametrize("body", NOT_OBJECTS.values(), ids=NOT_OBJECTS.keys())
def test_json_call_without_object_arguments_stays_text(tok, body):
    text = f"Before <tool_call>{body}</tool_call> after"
    check(text, [], text, tok)
    assert parse_tool_call(body, TOOLS) is None


@pytest.mark.parametrize("arguments,expected", [
    ('"{\\"cmd\\": \\"ls\\"}"', {"cmd": "ls"}), ("null", {}), (None, {}), ('{"cmd": "ls", "n": [1, true, null]}',
                                                                          {"cmd": "ls", "n": [1, True, None]})],
    ids=["object_in_a_string", "null", "missing", "nested"])
def test_json_call_arguments(tok, arguments, expected):
    body = '{"name": "bash"' + ("" if arguments is None else f', "arguments": {arguments}') + "}"
    check(f"<tool_call>{body}</tool_call>", [("bash", expected)], "", tok)


# ---- defect 5: a call cut off stays text --------------------------------------------------------------------------
COMPLETE = xml("bash", ("cmd", "ls"), ("timeout", "5"))
CUT = {
    "in_value": "<tool_call>\n<function=bash>\n<parameter=cmd>\nls",
    "after_parameter": COMPLETE[:COMPLETE.index("<parameter=timeout>")],
    "after_function": COMPLETE[:COMPLETE.index("</tool_call>")],
    "in_close_tag": COMPLETE[:-3],
    "open_tag_only": "<tool_call>",
    "open_tag_and_newline": "<tool_call>\n",
    "in_function_tag": "<tool_call>\n<function=ba",
    "json": '<tool_call>\n{"name": "bash", "arguments": {"cmd": "ls"}}',
    "json_in_string": '<tool_call>{"name": "bash", "arguments": {"cmd": "l',
    "value_holding_a_whole_call": "<tool_call>\n<function=write_file>\n<parameter=content>\n" + COMPLETE,
}


@pytest.mark.parametrize("cut", CUT.values(), ids=CUT.keys())
def test_a_cut_off_call_stays_text(tok, cut):
    check("Let me run it.\n" + cut, [], "Let me run it.\n" + cut.rstrip(), tok)
    check(COMPLETE + "\n" + cut, [("bash", {"cmd": "ls", "timeout": 5})], cut.rstrip(), tok)
    check("Plan.\n" + cut, [], "", tok, reasoning="Plan.\n" + cut.rstrip(), thinking=True)


# ---- defect 6: one thinking split, split_thinking's -----------------------------------------------------------
THINKING = [  # (reply, prompt opened <think>, reasoning, content)
    ("<think>\nplan\n</think>\n\nanswer", True, "plan", "answer"),
    ("  \n<think>plan</think>answer", True, "plan", "answer"),
    ("plan\n</think>\n\nanswer", True, "plan", "answer"),
    ("<think>\nstill going", True, "still going", ""),
    ("<think><think>x</think>y", True, "<think>x", "y"),
    ("a</think>b</think>c", True, "a", "b</think>c"),
    ("a <think> b</think>c", True, "a <think> b", "c"),
    ("</think>only answer", True, "", "only answer"),
    ("<think>a</think>b", False, "a", "b"),
    ("\n<think>\na\n</think>\n\nb <think>c</think>", False, "a", "b <think>c</think>"),
    ("just an answer", False, "", "just an answer"),
]


@pytest.mark.parametrize("text,opened,reasoning,content", THINKING, ids=[repr(t[0]) for t in THINKING])
def test_thinking_split(tok, text, opened, reasoning, content):
    check(text, [], content, tok, reasoning=reasoning, thinking=opened)
    assert split_thinking(text, prompt_opened_thinking=opened) == (reasoning, content)


def test_thinking_split_is_split_thinkings_on_random_replies(tok):
    """On replies made of the thinking tags, space and words: the parser's split is split_thinking's where the
    prompt opened the block, or where the reply opens it first or never closes it (split_thinking, seeing the
    whole text, calls what precedes a lone `</think>` thinking; a stream cannot wait for it)."""
    rng = random.Random(0)
    parts = ["<think>", "</think>", " ", "\n", "a", "b c", "<thi", "nk>", "</", "<"]
    for _ in range(300):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 12)))
        for opened in (True, False):
            if opened or text.lstrip().startswith("<think>") or "</think>" not in text:
                for parse_tools in (True, False):
                    reasoning, content, calls = parsed(text, tok, thinking=opened, parse_tools=parse_tools)
                    assert (reasoning, content) == split_thinking(text, prompt_opened_thinking=opened), text


@pytest.mark.parametrize("text", ["answer</think>more", "answer <think>x</think> y"])
def test_a_lone_think_close_without_an_opened_block_stays_in_the_answer(tok, text):
    """The one place the split differs from split_thinking's (which calls "answer" thinking here): with no
    block opened by the prompt or the reply's start, a stream cannot hold the answer back for a `</think>`."""
    check(text, [], text, tok, thinking=False)


# ---- defect 7: hostile replies and tools never raise --------------------------------------------------------------
DEEP = "[" * 5000 + "]" * 5000
HOSTILE_REPLIES = {
    "deep_json_text": ("Look: " + DEEP, [], "Look: " + DEEP),
    "deep_json_call": (f'<tool_call>{{"name": "bash", "arguments": {{"cmd": {DEEP}}}}}</tool_call>', [],
                       f'<tool_call>{{"name": "bash", "arguments": {{"cmd": {DEEP}}}}}</tool_call>'),
    "deep_json_string_arguments": ('<tool_call>{"name": "bash", "arguments": ' + json.dumps("{\"a\": " + DEEP + "}")
                                   + "}</tool_call>", [], None),
    "deep_object_value": (xml("configure", ("options", "{\"a\": " + DEEP + "}")),
                          [("configure", {"options": "{\"a\": " + DEEP + "}"})], ""),
    "deep_python_value": (xml("configure", ("tags", "(" * 5000 + ")" * 5000)),
                          [("configure", {"tags": "(" * 5000 + ")" * 5000})], ""),
    "deep_untyped_value": (xml("configure", ("anything", DEEP)), [("configure", {"anything": DEEP})], ""),
    "nesting_at_the_limit": (xml("configure", ("tags", "[" * MAX_NESTING + "]" * MAX_NESTING)),
                             [("configure", {"tags": json.loads("[" * MAX_NESTING + "]" * MAX_NESTING)})], ""),
    "huge_integer": (xml("configure", ("retries", "9" * 5000)), [("configure", {"retries": "9" * 5000})], ""),
    "long_name": ("<tool_call>\n<function=" + "f" * 400 + ">\n</function>\n</tool_call>", [], None),
}


@pytest.mark.parametrize("text,calls,content", HOSTILE_REPLIES.values(), ids=HOSTILE_REPLIES.keys())
def test_hostile_replies(tok, text, calls, content):
    check(text, calls, text if content is None else content, tok)


def _deep_anyof(depth: int) -> dict:
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"anyOf": [schema, {"type": "null"}]}
    return schema


HOSTILE_TOOLS = {
    "not_a_list": {"function": {"name": "configure"}},
    "not_dicts": ["configure", 5, None, ["x"]],
    "function_not_a_dict": [{"function": "configure"}],
    "parameters_not_a_dict": [{"function": {"name": "configure", "parameters": "p"}}],
    "properties_a_list": [{"function": {"name": "configure", "parameters": {"properties": ["retries"]}}}],
    "properties_empty": [{"function": {"name": "configure", "parameters": {"properties": {}}}}],
    "property_not_a_dict": [{"function": {"name": "configure", "parameters": {"properties": {"retries": "int"}}}}],
    "odd_keywords": [{"function": {"name": "configure", "parameters": {"properties": {"retries": {
        "type": [5, None, {"x": 1}], "anyOf": "x", "oneOf": [None, 3], "enum": 3}}}}}],
    "bare_function": [{"name": "configure", "parameters": {"properties": {"retries": {"type": "integer"}}}}],
    "deep_anyof": [{"function": {"name": "configure", "parameters": {"properties": {"retries": _deep_anyof(5000)}}}}],
}


@pytest.mark.parametrize("tools", HOSTILE_TOOLS.values(), ids=HOSTILE_TOOLS.keys())
def test_hostile_tools(tok, tools):
    """Tools of any shape: what is not a schema types nothing (values then read as JSON or the template's Python
    scalars where they parse, the text otherwise); none raises."""
    text = xml("configure", ("retries", "3")) + xml("configure", ("note", "None")) + xml("configure", ("x", "a b"))
    check(text, [("configure", {"retries": 3}), ("configure", {"note": None}), ("configure", {"x": "a b"})], "",
          tok, tools=tools)


def test_random_markup_never_raises_and_streams_as_it_reads_whole(tok):
    """Replies made of random call fragments: no exception, and every split gives the whole text's result."""
    rng = random.Random(1)
    parts = ["<tool_call>", "</tool_call>", "<function=", "bash", "write_file", ">", "</function>", "<parameter=",
             "cmd", "content", "path", "</parameter>", "\n", " ", "ls", "42", "True", "None", "{", "}", "[", "]",
             '"', ":", ",", '"name"', '"arguments"', "<think>", "</think>", "<tool_", "x", "\\"]
    calls = 0
    for _ in range(150):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(1, 40)))
        if rng.random() < 0.3:
            text = text + xml("bash", ("cmd", text)) + text
        for tools, thinking in ((TOOLS, False), (None, True)):
            calls += len(parsed(text, tok, tools=tools, thinking=thinking)[2])
    assert calls > 0


# ---- the official template's rendering, read back ---------------------------------------------------------------
def _raise(message):
    raise jinja2.TemplateError(message)


def official_render(messages: list[dict], tools=None, **kwargs) -> str:
    """Qwen3.5's chat template rendered by jinja2 as transformers renders it (test_serve_tools checks that
    transformers itself gives the same)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    env.globals["raise_exception"] = _raise
    return env.from_string(QWEN35_TEMPLATE).render(messages=messages, tools=tools, **kwargs)


ROUND_TRIP_ARGUMENTS = [
    ("get_weather", {"city": "São Paulo", "days": 7, "unit": "celsius"}),
    ("configure", {"enabled": True, "ratio": 1e-05, "retries": 0, "note": None, "label": "42", "limit": None,
                   "tags": ["a", "b c"], "options": {"verbose": False, "depth": None, "levels": [1, 2.5]},
                   "target": ["x"], "level": 3, "mode": "slow", "strict": True, "count": "12",
                   "anything": {"k": [True, None]}, "choice": False}),
    ("configure", {"enabled": False, "ratio": 3.0, "retries": 10 ** 20, "note": "multi\nline", "limit": 5,
                   "tags": [], "options": {}, "target": "plain", "choice": None}),
    ("write_file", {"path": "tests/t.py", "content": 'X = "</parameter>"\n' + xml("bash", ("cmd", "ls")) +
                    "\n<tool_call>\n</function>\n"}),
    ("bash", {"cmd": "", "timeout": 2.5}),
]


@pytest.mark.parametrize("name,arguments", ROUND_TRIP_ARGUMENTS, ids=[f"{n}{i}" for i, (n, _) in
                                                                       enumerate(ROUND_TRIP_ARGUMENTS)])
def test_official_template_rendering_reads_back(tok, name, arguments):
    """A call rendered by Qwen3.5's official template (values with str(): `True`, `None`, `1e-05`), after some
    reasoning and content, with a second call beside it: the reply parser gives back the same typed arguments."""
    calls = [{"type": "function", "function": {"name": name, "arguments": arguments}},
             {"type": "function", "function": {"name": "bash", "arguments": {"cmd": "true"}}}]
    messages = [{"role": "user", "content": "Do it."}, {"role": "assistant", "content": "On it.",
                                                        "reasoning_content": "I need a tool.", "tool_calls": calls}]
    text = official_render(messages, tools=TOOLS)
    turn = text.split("<|im_start|>assistant\n<think>\n", 1)[1].removesuffix("<|im_end|>\n")
    check(turn, [(name, arguments), ("bash", {"cmd": "true"})], "On it.", tok, reasoning="I need a tool.",
          thinking=True)


def test_a_long_reply_streamed_a_character_at_a_time_is_linear():
    """200 KB replies fed one character at a time — plain text, thinking, and a call whose value is code full of
    the format's tags (a `</tool_call>` on every line, each a point where the call might end) — each in about a
    second on one loaded core; quadratic re-reading would take minutes."""
    line = 'x = "<parameter=a>" if y else "</parameter>"  # </tool_call> <function=f>\n'
    code = line * (200_000 // len(line))
    replies = {"text": ("word " * 40_000, False), "thinking": ("hmm " * 50_000 + "</think>\nok", True),
               "call": (xml("write_file", ("path", "a.py"), ("content", code)), False),
               "cut_call": (xml("write_file", ("path", "a.py"), ("content", code))[:-40], False)}
    for what, (text, opened) in replies.items():
        parser = ReplyParser(opened, TOOLS)
        start = time.perf_counter()
        deltas = [d for ch in text for d in parser.feed(ch)] + parser.finish()
        took = time.perf_counter() - start
        reasoning, content, calls = collect(deltas)
        assert len(reasoning) + len(content) + sum(len(c.arguments) for c in calls) >= len(text) * 0.9
        assert took < 5.0, f"{what}: {took:.1f} s"


# Qwen3.5's chat template, as published with Qwen/Qwen3.5-35B-A3B (chat_template.jinja; Apache-2.0), the oracle
# the parser's round trip and the bundled templates (test_serve_tools) are checked against.
QWEN35_TEMPLATE = (r"""{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count, is_system_content=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain images.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ image_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain videos.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ video_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- else %}
                {{- raise_exception('Unexpected item type in content.') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- if tools and tools is iterable and tools is not mapping %}
    {{- '<|im_start|>system\n' }}
    {{- "# Tools\n\nYou have access to the following functions:\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>" }}
    {{- '\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"""
    r"""<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</p"""
    r"""arameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat"""
    r""" can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder"""
    r""":\n- Function calls MUST follow the specified format: an inner <function=...></function> blo"""
    r"""ck must be nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be spe"""
    r"""cified\n- You may provide optional reasoning for your function call in natural language BEFO"""
    r"""RE the function call, but NOT after\n- If there is no function call available, answer the qu"""
    r"""estion like normal with your current knowledge and do not tell the user about function call"""
    r"""s\n</IMPORTANT>' }}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {%- if content %}
            {{- '\n\n' + content }}
        {%- endif %}
    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {{- '<|im_start|>system\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set content = render_content(message.content, false)|trim %}
        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if ns.multi_step_tool %}
    {{- raise_exception('No user query found in messages.') }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true)|trim %}
    {%- if message.role == "system" %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>"""
    r"""')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- set reasoning_content = reasoning_content|trim %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content + '\n</think>\n\n'"""
    r""" + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if loop.first %}
                    {%- if content|trim %}
                        {{- '\n\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- else %}
                        {{- '<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- endif %}
                {%- else %}
                    {{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                {%- endif %}
                {%- if tool_call.arguments is defined %}
                    {%- for args_name, args_value in tool_call.arguments|items %}
                        {{- '<parameter=' + args_name + '>\n' }}
                        {%- set args_value = args_value | tojson | safe if args_value is mapping or """
    r"""(args_value is sequence and args_value is not string) else args_value | string %}
                        {{- args_value }}
                        {{- '\n</parameter>\n' }}
                    {%- endfor %}
                {%- endif %}
                {{- '</function>\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if not loop.last and loop.nextitem.role != "tool" %}
            {{- '<|im_end|>\n' }}
        {%- elif loop.last %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected message role.') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}""")
