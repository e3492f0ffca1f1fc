"""Tool calls end to end: the bundled chat templates render tools, tool calls and tool results as Qwen3.5's
official template does (checked against it, rendered by transformers), and what they render reads back through
the reply parser; a tiny model fine-tuned here (qwenjax's own trainer) to answer one question by thinking and
then calling a tool in that format, served by a real `qwenjax serve` with the bundled template, is read with
the `openai` client, and the call and its result go back through the template."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest

import qwenjax
from qwenjax.demo import (CHAT_TEMPLATE, CHAT_TEMPLATE_EMPTY_THINKING, DEFAULT_MODEL_DIR, DEFAULT_VISION_MODEL_DIR,
                          write_random_checkpoint)
from qwenjax.inference.tokenizer import Tokenizer, TokenizerError
from qwenjax.serve.prefix_cache import chat_snapshot_points
from qwenjax.serve.reply_parser import ReplyParser, collect
from qwenjax.train.loop import RunConfig, finetune
from qwenjax.train.step import TrainConfig
from test_reply_parser import QWEN35_TEMPLATE
from test_reply_parser import TOOLS as TYPED_TOOLS

QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
THOUGHT = "I should look it up."
REPLY = (f"{THOUGHT}\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
         "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]


# ---- the bundled templates against Qwen3.5's ---------------------------------------------------------------------
def _call(name: str, **arguments) -> dict:
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": arguments}}


EVERY_TYPE = _call("configure", enabled=True, ratio=1e-05, retries=3, note=None, label="42", limit=None,
                   tags=["a", "b c"], options={"verbose": False, "depth": None, "levels": [1, 2.5]}, target=["x"],
                   level=2, mode="fast", strict=True, count="12", anything={"k": [True, None]}, choice=False)
WRITE = _call("write_file", path="t.py", content='X = "</parameter>"\n<tool_call>\n<function=bash>\n'
              "<parameter=cmd>\nls\n</parameter>\n</function>\n</tool_call>\nprint(X)")
CONVERSATIONS = {  # (messages, tools)
    "tool_exchange": ([
        {"role": "system", "content": "  You are terse.  "}, {"role": "user", "content": "Set it up, then write t.py."},
        {"role": "assistant", "content": "On it.", "reasoning_content": "Two tools.",
         "tool_calls": [EVERY_TYPE, WRITE]},
        {"role": "tool", "tool_call_id": "call_configure", "content": "configured"},
        {"role": "tool", "tool_call_id": "call_write_file", "content": "written"},
        {"role": "assistant", "content": "<think>\nNow check.\n</think>\n\n", "tool_calls": [
            _call("bash", cmd="python t.py", timeout=2.5)]},
        {"role": "tool", "tool_call_id": "call_bash", "content": "</parameter>"}], TYPED_TOOLS),
    "earlier_turns": ([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", city="Oslo", days=1)]},
        {"role": "tool", "content": "rain"}, {"role": "assistant", "content": "<think>It rains.</think>Rain."},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "tomorrow?"}]}],
        TYPED_TOOLS),
    "no_tools": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!", "tool_calls": [_call("bash", cmd="echo")]},
                  {"role": "tool", "content": "ok"}], None),
    "plain": ([{"role": "user", "content": " Hello, who are you? "}], None),
}


def _with_template(tmp_path, template: str, name: str) -> str:
    path = tmp_path / name
    shutil.copytree(DEFAULT_MODEL_DIR, path)
    (path / "chat_template.jinja").write_text(template)
    return str(path)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """Qwen3.5's template in the bundled model's directory, rendered by transformers."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        _with_template(tmp_path_factory.mktemp("official"), QWEN35_TEMPLATE, "qwen3.5"))


def _renders(messages, tools):
    for generation_prompt in (True, False):
        for thinking in (True, False):
            yield dict(tools=tools, add_generation_prompt=generation_prompt, enable_thinking=thinking)


def test_bundled_template_files_are_the_demo_templates():
    for directory, template in ((DEFAULT_MODEL_DIR, CHAT_TEMPLATE),
                                (DEFAULT_VISION_MODEL_DIR, CHAT_TEMPLATE_EMPTY_THINKING)):
        with open(os.path.join(directory, "chat_template.jinja")) as f:
            assert f.read() == template, directory


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_bundled_template_renders_as_qwen35(official, name):
    """The bundled text model's template renders every conversation as Qwen3.5's official template does under
    transformers: the `# Tools` block, reasoning kept after the last question, calls with every parameter type,
    parallel calls, tool results grouped into one user turn; with and without the generation prompt and
    thinking."""
    messages, tools = CONVERSATIONS[name]
    ours = Tokenizer(DEFAULT_MODEL_DIR)
    for kwargs in _renders(messages, tools):
        assert ours.apply_chat_template(messages, **kwargs) == official.apply_chat_template(
            messages, tokenize=False, **kwargs), kwargs


def test_vision_template_renders_the_tool_parts_as_qwen35(official):
    """The vision model's template writes every assistant turn after an empty thinking block (as it was
    trained), which is what Qwen3.5 writes for turns after the last question that carry no reasoning: there the
    two agree, tools, calls and results included; an earlier turn keeps its empty block, where Qwen3.5 drops it."""
    vision = Tokenizer(DEFAULT_VISION_MODEL_DIR)
    messages = [{"role": "user", "content": "Look it up."},
                {"role": "assistant", "content": "", "tool_calls": [EVERY_TYPE, WRITE]},
                {"role": "tool", "content": "done"}, {"role": "tool", "content": "done too"},
                {"role": "assistant", "content": "Both done."}]
    for kwargs in _renders(messages, TYPED_TOOLS):
        assert vision.apply_chat_template(messages, **kwargs) == official.apply_chat_template(
            messages, tokenize=False, **kwargs), kwargs
    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
               {"role": "user", "content": "Bye"}]
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>" in vision.apply_chat_template(earlier)
    assert "<|im_start|>assistant\nHello<|im_end|>" in official.apply_chat_template(earlier, tokenize=False)


def test_bundled_template_refuses_what_qwen35_refuses(official):
    ours = Tokenizer(DEFAULT_MODEL_DIR)
    for messages in ([], [{"role": "system", "content": "x"}], [{"role": "tool", "content": "r"}],
                     [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
                     [{"role": "critic", "content": "a"}, {"role": "user", "content": "b"}]):
        with pytest.raises(TokenizerError):
            ours.apply_chat_template(messages)
        with pytest.raises(Exception):
            official.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("directory", [DEFAULT_MODEL_DIR, DEFAULT_VISION_MODEL_DIR], ids=["text", "vision"])
def test_rendered_calls_read_back_with_their_types(directory):
    """An assistant turn the bundled template writes (reasoning, content, parallel calls with every parameter
    type, markup inside a value), read by the reply parser as a reply to the generation prompt: the same
    calls, the same typed arguments."""
    tok = Tokenizer(directory)
    turn = {"role": "assistant", "content": "On it.", "reasoning_content": "Two tools.",
            "tool_calls": [EVERY_TYPE, WRITE]}
    text = tok.apply_chat_template([{"role": "user", "content": "Go."}, turn], tools=TYPED_TOOLS,
                                   add_generation_prompt=False)
    reply = text.split("<|im_start|>assistant\n<think>\n", 1)[1].removesuffix("<|im_end|>\n")
    parser = ReplyParser(thinking=True, tools=TYPED_TOOLS)
    reasoning, content, calls = collect([d for ch in reply for d in parser.feed(ch)] + parser.finish())
    assert (reasoning, content) == (("Two tools.", "On it.") if directory == DEFAULT_MODEL_DIR else ("", "On it."))
    assert [(c.name, json.dumps(json.loads(c.arguments), sort_keys=True)) for c in calls] == [
        (c["function"]["name"], json.dumps(c["function"]["arguments"], sort_keys=True)) for c in (EVERY_TYPE, WRITE)]


def test_prefix_cache_snapshots_hold_across_tool_turns():
    """Each request of a tool exchange starts with the rendering of the conversation before it (the turns after
    the last question keep their thinking, so appending calls and results does not re-render them): the
    snapshot the last request left is a prefix of the next prompt."""
    tok = Tokenizer(DEFAULT_MODEL_DIR)
    exchange = CONVERSATIONS["tool_exchange"][0]
    previous = None
    for messages in (exchange[:2], exchange[:5], exchange[:7]):  # the question, then after each tool result
        prompt = tok.encode(tok.apply_chat_template(messages, tools=TYPED_TOOLS))
        history = tok.encode(tok.apply_chat_template(messages, tools=TYPED_TOOLS, add_generation_prompt=False))
        assert chat_snapshot_points(tok, messages, prompt, tools=TYPED_TOOLS) == (len(history),)
        if previous is not None:
            assert prompt[:len(previous)] == previous
        previous = history


# ---- a model served with the bundled template --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    """A random tiny-chat checkpoint (its template is the bundled one), trained until its greedy reply to
    QUESTION, with TOOLS or without, is REPLY. The tools' block makes the prompt ~1,400 byte tokens."""
    root = tmp_path_factory.mktemp("tools")
    base = write_random_checkpoint(root / "base")
    tok = Tokenizer(base)
    prompts = [tok.apply_chat_template(QUESTION, tools=tools) for tools in (TOOLS, None)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": p + REPLY + "<|im_end|>"}) + "\n" for p in prompts * 2))
    finetune(qwenjax.from_pretrained(base, dtype="float32"), tok, data, root / "run", progress=False,
             train=TrainConfig(learning_rate=1e-2, warmup_steps=5, total_steps=120, weight_decay=0.0),
             run=RunConfig(pack_len=1536, rows=2, save_every=1000))
    out = str(root / "run" / "export")
    m = qwenjax.from_pretrained(out, dtype="float32")
    for prompt in prompts:
        learned = tok.decode(qwenjax.generate(m, [tok.encode(prompt)], max_new_tokens=160, temperature=0.0)[0])
        assert learned == REPLY, f"the fine-tune did not learn the reply to {prompt!r}: {learned!r}"
    return out


@pytest.fixture(scope="module")
def client(tool_model):
    import socket

    openai = pytest.importorskip("openai")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "qwenjax.cli", "serve", "--model", tool_model, "--port",
                             str(port), "--max-batch", "4", "--max-len", "2048", "--dtype", "float32",
                             "--served-model-name", "tools", "--log-level", "warning", "--no-warmup"],
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
