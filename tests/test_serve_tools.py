"""Tool calls end to end: a tiny model fine-tuned here (qwenjax's own trainer) to answer one question by thinking
and then calling a tool in Qwen3.5's XML format, served by a real `qwenjax serve`, read with the `openai` client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

import qwenjax
from qwenjax.demo import write_random_checkpoint
from qwenjax.inference.tokenizer import Tokenizer
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


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    """A random tiny-chat checkpoint trained until its greedy reply to QUESTION is REPLY (~15 s on 2 cores)."""
    root = tmp_path_factory.mktemp("tools")
    base = write_random_checkpoint(root / "base")
    tok = Tokenizer(base)
    text = tok.apply_chat_template(QUESTION) + REPLY + "<|im_end|>"
    data = root / "data.jsonl"
    data.write_text((json.dumps({"text": text}) + "\n") * 4)
    finetune(qwenjax.from_pretrained(base, dtype="float32"), tok, data, root / "run", progress=False,
             train=TrainConfig(learning_rate=1e-2, warmup_steps=5, total_steps=120, weight_decay=0.0),
             run=RunConfig(pack_len=256, rows=2, save_every=1000))
    out = str(root / "run" / "export")
    m = qwenjax.from_pretrained(out, dtype="float32")
    learned = tok.decode(qwenjax.generate(m, [tok.encode(tok.apply_chat_template(QUESTION))], max_new_tokens=160,
                                          temperature=0.0)[0])
    assert learned == REPLY, f"the fine-tune did not learn the reply: {learned!r}"
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


def test_without_tools_the_markup_stays_text_and_tool_results_go_back(client):
    r = client.chat.completions.create(model="tools", messages=QUESTION, max_tokens=160, temperature=0)
    assert r.choices[0].finish_reason == "stop" and "<function=get_weather>" in r.choices[0].message.content
    # the call and its result fed back: the assistant's tool_calls (arguments as a JSON string) and a tool message
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
    r = client.chat.completions.create(model="tools", tools=TOOLS, max_tokens=8, temperature=0, messages=[
        *QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}])
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls") and r.usage.prompt_tokens > 0
