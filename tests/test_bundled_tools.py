"""The bundled default model (qwenjax/assets/tiny-pydoc) calls tools: scripts/train_tool_model.py fine-tuned it on
synthetic tool-use conversations. `qwenjax serve` with no --model, asked with the `openai` client a weather
question with the weather tool offered (tool_choice "auto": the model decides), answers with a parsed tool call to
get_weather whose arguments are a JSON object, whole and streamed."""

from __future__ import annotations

import json

import pytest

from test_serve_api import _serving

openai = pytest.importorskip("openai")

# The tool as a user writes it (not the training script's generator): OpenAI's function-tool form.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a given city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def client():
    """`qwenjax serve` with no --model: the bundled model (a prompt with the tool is ~300 tokens)."""
    with _serving("--max-batch", "2", "--max-len", "1024") as (_, url):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_bundled_model_answers_a_weather_question_with_a_parsed_tool_call(client, stream):
    kw = dict(model="tiny-pydoc", messages=QUESTION, tools=[WEATHER], tool_choice="auto", max_tokens=96,
              temperature=0)
    if stream:
        chunks = list(client.chat.completions.create(**kw, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        calls = [tc for d in deltas for tc in (d.tool_calls or ())]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        content = "".join(d.content or "" for d in deltas)
        assert len(finish) == 1
        finish = finish[0]
    else:
        choice = client.chat.completions.create(**kw).choices[0]
        calls, finish, content = choice.message.tool_calls or [], choice.finish_reason, choice.message.content or ""
    assert finish == "tool_calls", (finish, content)
    assert len(calls) == 1 and calls[0].function.name == "get_weather", calls
    assert calls[0].id and calls[0].type == "function"
    arguments = json.loads(calls[0].function.arguments)
    assert isinstance(arguments, dict), arguments  # a JSON object, as the schema's `object`
    assert "<tool_call>" not in content and "<function=" not in content
