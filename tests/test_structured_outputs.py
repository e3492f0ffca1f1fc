"""Structured outputs in the serving engine and over HTTP: `response_format` json_object / json_schema and
`tool_choice` "required" / a named function, by a token mask per step (qwenjax.inference.grammar).

- The engine: constrained rows beside free ones, greedy and seeded sampling, with and without speculative decoding.
  A constrained greedy reply equals the independent step-by-step masked decode of test_grammar.py (the oracle); a
  free row beside constrained ones gets what `qwenjax.generate` gives it alone; every constrained reply parses and
  validates against its schema.
- A real `qwenjax serve` read with the `openai` client: json_schema (strict) and json_object, tool calls forced
  by "required" and by name, streamed and not; bad specs and conflicting fields are 400s naming the field.
"""

from __future__ import annotations

import json
import queue

import jsonschema
import pytest

import qwenjax
from qwenjax.demo import DEFAULT_MODEL_DIR
from qwenjax.inference.grammar import GrammarSpec
from qwenjax.inference.sampling import SamplingParams
from qwenjax.serve.engine import Engine, Finished, Request
from qwenjax.serve.reply_parser import ReplyParser, collect
from test_grammar import SCHEMA, TOOLS, decode, tok  # noqa: F401  (fixtures: the oracle decode, the tokenizer)
from test_serve_api import _serving

openai = pytest.importorskip("openai")

QUESTIONS = ["Describe os.path.join.", "What is the weather in Paris?", "Describe the class list.",
             "The json module"]
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "doc", "strict": True, "schema": SCHEMA}}
# a string parameter capped: left free in a string, this model writes docs text until max_tokens
SHORT_TOOLS = json.loads(json.dumps(TOOLS))
SHORT_TOOLS[0]["function"]["parameters"]["properties"]["city"]["maxLength"] = 30
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _chat_prompt(tokenizer, question: str) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                          enable_thinking=False))


def _check_call(text: str, tools: list[dict], name: str | None = None) -> None:
    """`text` is one or more tool calls, each of a tool of `tools` (`name`'s) with arguments of its schema."""
    parser = ReplyParser(False, tools)
    _, content, calls = collect(parser.feed(text) + parser.finish())
    assert calls and not content.strip(), text
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls:
        assert name in (None, call.name), text
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])


@pytest.fixture(scope="module")
def model():
    return qwenjax.from_pretrained(DEFAULT_MODEL_DIR, dtype="float32")


def _serve_all(model, tokenizer, requests: list[dict], k: int) -> list[tuple[str, str]]:
    """`requests` (Request fields; `question` for the prompt) at once through an engine drafting k tokens:
    each one's (finish reason, text)."""
    engine = Engine(model, max_batch=4, max_len=1024, tokenizer=tokenizer, speculative=k).start(warmup=False)
    try:
        inboxes = []
        for fields in requests:
            fields = dict(fields)
            inboxes.append(queue.Queue())
            engine.submit(Request(prompt=_chat_prompt(tokenizer, fields.pop("question")), on_event=inboxes[-1].put,
                                  **fields))
        out = []
        for inbox in inboxes:
            ids, event = [], inbox.get(timeout=600)
            while not isinstance(event, Finished):
                ids += event.ids
                event = inbox.get(timeout=600)
            assert event.error is None, event.error
            out.append((event.reason, tokenizer.decode(ids, skip_special_tokens=False)))
        return out
    finally:
        engine.stop()


@pytest.mark.parametrize("k", [0, 2])
def test_engine_constrained_rows_beside_free_rows(model, tok, decode, k):  # noqa: F811
    """Four rows at once: a json_schema row and a named-tool row (greedy: the oracle's replies), a free greedy row
    to its length (generate's reply alone), a "required" row sampled with a seed (it validates)."""
    schema_spec = GrammarSpec.from_response_format(JSON_SCHEMA)
    named = GrammarSpec.from_tools(SHORT_TOOLS, NAMED)
    required = GrammarSpec.from_tools(SHORT_TOOLS, "required", parallel_tool_calls=False)
    sampled = SamplingParams(temperature=0.9, top_p=0.95)
    got = _serve_all(model, tok, [
        dict(question=QUESTIONS[0], max_tokens=400, grammar=schema_spec),
        dict(question=QUESTIONS[1], max_tokens=200, grammar=named),
        dict(question=QUESTIONS[3], max_tokens=40, ignore_eos=True),
        dict(question=QUESTIONS[1], max_tokens=200, grammar=required, sampling=sampled, seed=7)], k)
    assert [reason for reason, _ in got] == ["stop", "stop", "length", "stop"]
    assert got[0][1] == decode(schema_spec, QUESTIONS[0], 400)[0]
    jsonschema.validate(json.loads(got[0][1]), SCHEMA)
    assert got[1][1] == decode(named, QUESTIONS[1], 200)[0]
    _check_call(got[1][1], SHORT_TOOLS, "get_weather")
    alone = qwenjax.generate(model, [_chat_prompt(tok, QUESTIONS[3])], max_new_tokens=40, ignore_eos=True)[0]
    assert got[2][1] == tok.decode(alone, skip_special_tokens=False)
    _check_call(got[3][1], SHORT_TOOLS)


def test_engine_refuses_what_a_grammar_cannot_honour(model, tok):  # noqa: F811
    """min_tokens and ignore_eos hold eos back, where a grammar may allow nothing else: refused by name."""
    engine = Engine(model, max_batch=1, max_len=256, tokenizer=tok)
    spec = GrammarSpec.from_response_format({"type": "json_object"})
    for fields in (dict(min_tokens=3), dict(ignore_eos=True)):
        with pytest.raises(qwenjax.validate.InputError, match=next(iter(fields))):
            engine.check(Request(prompt=[1, 2], on_event=print, max_tokens=8, grammar=spec, **fields))


# ---- over HTTP ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    with _serving("--max-batch", "4", "--max-len", "1024", "--no-warmup") as (_, url):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def _ask(client, question: str, **kwargs):
    return client.chat.completions.create(
        model="tiny-pydoc", messages=[{"role": "user", "content": question}], temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}}, **kwargs)


def _streamed(client, question: str, **kwargs) -> tuple[str, list[dict], str]:
    """A streamed reply's (content, tool calls assembled from their deltas, finish reason)."""
    content, calls, reason = "", {}, None
    for chunk in _ask(client, question, stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        reason = chunk.choices[0].finish_reason or reason
    return content, [calls[i] for i in sorted(calls)], reason


def test_response_format_json_schema_and_object(client):
    r = _ask(client, QUESTIONS[0], response_format=JSON_SCHEMA, max_tokens=400)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    content, calls, reason = _streamed(client, QUESTIONS[0], response_format=JSON_SCHEMA, max_tokens=400)
    assert (content, calls, reason) == (r.choices[0].message.content, [], "stop")
    r = _ask(client, QUESTIONS[2], response_format={"type": "json_object"}, max_tokens=300)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize("choice", ["required", NAMED])
def test_tool_choice_forces_a_call(client, choice):
    kwargs = dict(tools=SHORT_TOOLS, tool_choice=choice, parallel_tool_calls=False, max_tokens=200)
    r = _ask(client, QUESTIONS[1], **kwargs)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1
    call = message.tool_calls[0].function
    assert choice == "required" or call.name == "get_weather"
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in SHORT_TOOLS}
    jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    content, calls, reason = _streamed(client, QUESTIONS[1], **kwargs)
    assert calls == [{"name": call.name, "arguments": call.arguments}] and reason == "tool_calls"


@pytest.mark.parametrize("fields,param", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                         "minProperties": "a"}}}),
     "response_format"),
    (dict(response_format={"type": "xml"}), "response_format"),
    (dict(tools=SHORT_TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(response_format={"type": "json_object"}, tools=SHORT_TOOLS, tool_choice="required"), "response_format"),
    (dict(response_format={"type": "json_object"}, extra_body={"min_tokens": 2}), "min_tokens"),
    (dict(response_format={"type": "json_object"}, extra_body={"ignore_eos": True}), "ignore_eos"),
])
def test_bad_constraints_are_400s_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-pydoc", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=8, **fields)
    assert e.value.body["param"] == param, e.value.body
