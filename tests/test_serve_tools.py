"""Tool calls end to end: a tiny model fine-tuned here (qwenjax's own trainer) to answer one question by thinking
and then calling a tool in Qwen3.5's XML format, served by a real `qwenjax serve`, read with the `openai` client.
Its chat template, like Qwen3.5's, lists the tools and writes an assistant's tool calls back in that format, so a
call and its result go back through it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest

import qwenjax
from qwenjax.demo import chat_template, write_random_checkpoint
from qwenjax.inference.tokenizer import Tokenizer
from qwenjax.serve.reply_parser import ReplyParser, collect
from qwenjax.train.loop import RunConfig, finetune
from qwenjax.train.step import TrainConfig

openai = pytest.importorskip("openai")

QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
THOUGHT = "I should look it up."
REPLY = (f"{THOUGHT}\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
         "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
# The demo template with Qwen3.5's handling of tools: a system turn listing them, and an assistant's tool calls
# written as <tool_call> blocks from their arguments (a mapping: a JSON string would not render).
TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n# Tools\\n' }}
{%- for tool in tools %}
{{- tool.function.name + ': ' + tool.function.description + '\\n' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- endif %}
""" + chat_template("""\
{{- '<|im_start|>assistant\\n' + (message.content or '') }}
{%- for call in message.tool_calls or [] %}
{%- set call = call.function if call.function is defined else call %}
{{- '<tool_call>\\n<function=' + call.name + '>\\n' }}
{%- for name, value in call.arguments | items %}
{{- '<parameter=' + name + '>\\n' + (value if value is string else value | tojson) + '\\n</parameter>\\n' }}
{%- endfor %}
{{- '</function>\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}""")


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    """A random tiny-chat checkpoint with TEMPLATE, trained until its greedy reply to QUESTION, with TOOLS or
    without, is REPLY (~30 s on 2 cores)."""
    root = tmp_path_factory.mktemp("tools")
    base = write_random_checkpoint(root / "base")
    (root / "base" / "chat_template.jinja").write_text(TEMPLATE)
    tok = Tokenizer(base)
    prompts = [tok.apply_chat_template(QUESTION, tools=tools) for tools in (TOOLS, None)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": p + REPLY + "<|im_end|>"}) + "\n" for p in prompts * 2))
    finetune(qwenjax.from_pretrained(base, dtype="float32"), tok, data, root / "run", progress=False,
             train=TrainConfig(learning_rate=1e-2, warmup_steps=5, total_steps=120, weight_decay=0.0),
             run=RunConfig(pack_len=384, rows=2, save_every=1000))
    out = str(root / "run" / "export")
    m = qwenjax.from_pretrained(out, dtype="float32")
    for prompt in prompts:
        learned = tok.decode(qwenjax.generate(m, [tok.encode(prompt)], max_new_tokens=160, temperature=0.0)[0])
        assert learned == REPLY, f"the fine-tune did not learn the reply to {prompt!r}: {learned!r}"
    return out


@pytest.fixture(scope="module")
def client(tool_model):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "qwenjax.cli", "serve", "--model", tool_model, "--port",
                             str(port), "--max-batch", "4", "--max-len", "512", "--dtype", "float32",
                             "--served-model-name", "tools", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"qwenjax serve did not start:\n{proc.stdout.read()}")
            time.sleep(0.5)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    proc.terminate()
    proc.wait(timeout=60)


def test_tool_call_parsed_from_the_reply(client):
    r = client.chat.completions.create(model="tools", messages=QUESTION, tools=TOOLS, max_tokens=160, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == THOUGHT and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}  # typed by the tool's schema


def test_tool_call_streamed_as_a_delta(client):
    chunks = list(client.chat.completions.create(model="tools", messages=QUESTION, tools=TOOLS, max_tokens=160,
                                                 temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or ())]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 3}
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas).strip() == THOUGHT
    assert not "".join(d.content or "" for d in deltas).strip()  # no tool-call markup leaks into the answer
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_the_markup_stays_text(client):
    r = client.chat.completions.create(model="tools", messages=QUESTION, max_tokens=160, temperature=0)
    assert r.choices[0].finish_reason == "stop" and "<function=get_weather>" in r.choices[0].message.content
    assert r.choices[0].message.tool_calls is None


def test_a_tool_call_and_its_result_go_back_through_the_template(client, tool_model):
    """The call the server returned (arguments as a JSON string) sent back in the assistant's message, with the
    tool's result: the template gets the arguments as a mapping and writes the call as the model wrote it, then
    the result; the second turn's prompt is that rendering token for token (its length, and the reply's
    log-probabilities, which depend on every prompt token, equal a forward pass over it), and the reply is
    `generate`'s on it."""
    first = client.chat.completions.create(model="tools", messages=QUESTION, tools=TOOLS, max_tokens=160,
                                           temperature=0).choices[0].message
    [call] = first.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    result = {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}
    messages = [*QUESTION, {"role": "assistant", "content": first.content, "tool_calls": [call.model_dump()]}, result]
    tok = Tokenizer(tool_model)
    text = tok.apply_chat_template([*QUESTION, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}]},
        result], tools=TOOLS)
    assert text.endswith(REPLY.split("</think>\n\n")[1] + "<|im_end|>\n<|im_start|>user\n<tool_response>\n"
                         "sunny, 21 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n")
    prompt = tok.encode(text)
    m = qwenjax.from_pretrained(tool_model, dtype="float32")
    alone = qwenjax.generate(m, [prompt], max_new_tokens=24, temperature=0.0)[0]
    r = client.chat.completions.create(model="tools", messages=messages, tools=TOOLS, max_tokens=24, temperature=0,
                                       logprobs=True)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(alone))
    full = np.asarray(jax.nn.log_softmax(m([prompt + alone[:-1]])[0].astype("float32"), axis=-1))
    np.testing.assert_allclose([e.logprob for e in r.choices[0].logprobs.content],
                               [full[len(prompt) - 1 + j, t] for j, t in enumerate(alone)], atol=1e-4)
    parser = ReplyParser(thinking=True, tools=TOOLS)
    reasoning, content, calls = collect(parser.feed(tok.decode(alone)) + parser.finish())
    msg = r.choices[0].message
    assert (msg.reasoning_content or "", msg.content or "") == (reasoning, content)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls or ()] == [
        (c.name, json.loads(c.arguments)) for c in calls]
