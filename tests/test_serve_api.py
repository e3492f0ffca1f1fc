"""A real `qwenjax serve` process on localhost, talked to with the official `openai` client and raw HTTP: the
endpoints, streaming, thinking split from the answer, usage and the prefix cache, bad requests, a load of 64
clients against a bounded queue, a client killed mid-stream, and SIGTERM."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

import qwenjax
from qwenjax.demo import DEFAULT_MODEL_DIR
from qwenjax.inference.tokenizer import Tokenizer, split_thinking

openai = pytest.importorskip("openai")

MAX_BATCH, MAX_LEN, MAX_QUEUE = 8, 1024, 16  # a tools block alone is ~480 tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(*flags: str, dtype: str | None = "float32"):
    """A `qwenjax serve` process on a free port, with `flags` (and `--dtype dtype`; None: the server's default):
    (the process, its URL) once /health answers."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwenjax.cli", "serve", "--port", str(port), "--log-level", "warning",
         *(["--dtype", dtype] if dtype else []), *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"qwenjax serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("qwenjax serve did not answer /health within 300 s")
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server():
    with _serving("--max-batch", str(MAX_BATCH), "--max-len", str(MAX_LEN), "--max-queue", str(MAX_QUEUE)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference():
    """The same checkpoint in this process: what each request must get alone."""
    return qwenjax.from_pretrained(DEFAULT_MODEL_DIR, dtype="float32"), Tokenizer(DEFAULT_MODEL_DIR)


def _metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-pydoc"]
    metrics = _metrics(server[1])
    for name in ("qwenjax_requests_total{reason=\"stop\"}", "qwenjax_prompt_tokens_total",
                 "qwenjax_generation_tokens_total", "qwenjax_generation_tokens_per_second", "qwenjax_queue_length",
                 "qwenjax_running_rows", "qwenjax_prefix_cache_hit_rate"):
        assert name in metrics


def test_completions_greedy_equal_generate(client, reference):
    m, tok = reference
    prompt = "The os module provides"
    alone = qwenjax.generate(m, [tok.encode(prompt)], max_new_tokens=24, temperature=0.0)[0]
    r = client.completions.create(model="tiny-pydoc", prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == tok.decode(alone)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode(prompt)), len(alone))
    streamed = client.completions.create(model="tiny-pydoc", prompt=prompt, max_tokens=24, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    # token ids as the prompt, a stop string cut from the text, two prompts at once
    r = client.completions.create(model="tiny-pydoc", prompt=[tok.encode(prompt), tok.encode("A list")],
                                  max_tokens=24, temperature=0, stop=[" "])
    assert r.choices[0].text == tok.decode(alone).split(" ")[0] and r.choices[0].finish_reason == "stop"
    assert len(r.choices) == 2 and " " not in r.choices[1].text


def test_chat_splits_thinking_and_counts_cached_tokens(client, reference):
    m, tok = reference
    messages = [{"role": "user", "content": "What does the json module do?"}]
    prompt = tok.encode(tok.apply_chat_template(messages))
    alone = qwenjax.generate(m, [prompt], max_new_tokens=48, eos_token_ids=2)[0]
    thinking, answer = split_thinking(tok.decode(alone), prompt_opened_thinking=True)
    r = client.chat.completions.create(model="tiny-pydoc", messages=messages, max_tokens=48, temperature=0)
    msg = r.choices[0].message
    assert (msg.reasoning_content or "", msg.content) == (thinking, answer)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(alone))
    chunks = list(client.chat.completions.create(model="tiny-pydoc", messages=messages, max_tokens=48,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas).strip() == thinking
    assert "".join(d.content or "" for d in deltas).strip() == answer
    assert chunks[-1].usage.completion_tokens == len(alone)
    # the next turn starts with this conversation: the prefix cache restores it, only the new turn is prefilled
    turn2 = messages + [{"role": "assistant", "content": "It reads and writes JSON."},
                        {"role": "user", "content": "And pickle?"}]
    prompt2 = tok.encode(tok.apply_chat_template(turn2))
    r2 = client.chat.completions.create(model="tiny-pydoc", messages=turn2, max_tokens=16, temperature=0)
    history = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False))
    assert r2.usage.prompt_tokens_details.cached_tokens == len(history) > 0
    alone2 = qwenjax.generate(m, [prompt2], max_new_tokens=16, eos_token_ids=2)[0]
    assert (r2.choices[0].message.reasoning_content or "", r2.choices[0].message.content) == split_thinking(
        tok.decode(alone2), prompt_opened_thinking=True)


def test_speculative_server_equals_generate(reference, tmp_path):
    """`--speculative 2 --draft-vocab FILE`: the bundled model's MTP head drafts from the vocabulary's tokens, and
    every greedy reply, streamed or not, is plain greedy decoding's; the prefix cache serves the next turn; /metrics
    counts drafts and accepted ones. The vocabulary leaves out every token of the completion's greedy reply: its
    drafts are all rejected (the whole vocabulary's are accepted half the time), while the chat replies, made of
    other tokens too, keep some."""
    m, tok = reference
    prompt = "The os module provides"
    alone = qwenjax.generate(m, [tok.encode(prompt)], max_new_tokens=40, temperature=0.0)[0]
    vocab = tmp_path / "draft_vocab.json"
    vocab.write_text(json.dumps(sorted(set(range(m.config.vocab_size)) - set(alone))))
    with _serving("--speculative", "2", "--draft-vocab", str(vocab), "--max-batch", "4", "--max-len", "256",
                  "--prefill-chunk", "64", "--no-warmup") as (_, url):
        spec = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # three at once: batched verify passes
            replies = list(pool.map(lambda stream: spec.completions.create(
                model="tiny-pydoc", prompt=prompt, max_tokens=40, temperature=0, stream=stream), [False, True, False]))
        assert replies[0].choices[0].text == tok.decode(alone) == replies[2].choices[0].text
        assert "".join(c.choices[0].text for c in replies[1]) == tok.decode(alone)
        assert replies[0].usage.completion_tokens == len(alone)
        metrics = _metrics(url)
        assert metrics["qwenjax_spec_decode_accepted_tokens_total"] == 0 < \
            metrics["qwenjax_spec_decode_draft_tokens_total"]
        messages = [{"role": "user", "content": "What does the json module do?"}]
        turn2 = messages + [{"role": "assistant", "content": "It reads and writes JSON."},
                            {"role": "user", "content": "And pickle?"}]
        spec.chat.completions.create(model="tiny-pydoc", messages=messages, max_tokens=16, temperature=0)
        r = spec.chat.completions.create(model="tiny-pydoc", messages=turn2, max_tokens=24, temperature=0)
        alone = qwenjax.generate(m, [tok.encode(tok.apply_chat_template(turn2))], max_new_tokens=24,
                                 eos_token_ids=2)[0]
        assert (r.choices[0].message.reasoning_content or "", r.choices[0].message.content) == split_thinking(
            tok.decode(alone), prompt_opened_thinking=True)
        assert r.usage.prompt_tokens_details.cached_tokens > 0
        metrics = _metrics(url)
        assert 0 < metrics["qwenjax_spec_decode_accepted_tokens_total"] < \
            metrics["qwenjax_spec_decode_draft_tokens_total"]


def test_logprobs_are_the_models(client, reference):
    """Greedy tokens' log-probabilities equal a full forward's log-softmax at their positions; the top
    alternatives come sorted, the chosen one first; streamed chunks carry the same entries."""
    import jax
    import numpy as np

    m, tok = reference
    prompt = tok.encode("The os module provides")
    r = client.completions.create(model="tiny-pydoc", prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    generated = [tok.token_to_id(t) if tok.token_to_id(t) is not None else tok.encode(t)[0] for t in lp.tokens]
    full = np.asarray(jax.nn.log_softmax(m([prompt + generated[:-1]])[0].astype("float32"), axis=-1))
    expected = [full[len(prompt) - 1 + j, t] for j, t in enumerate(generated)]
    np.testing.assert_allclose(lp.token_logprobs, expected, atol=1e-4)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        values = list(top.values())
        assert len(top) == 3 and values == sorted(values, reverse=True) and abs(values[0] - chosen) < 1e-6
    messages = [{"role": "user", "content": "Name a module."}]
    whole = client.chat.completions.create(model="tiny-pydoc", messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    streamed = client.chat.completions.create(model="tiny-pydoc", messages=messages, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=True)
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in entries] == [(e.token, round(e.logprob, 5)) for e in content]


def _post(url: str, path: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@contextlib.contextmanager
def _stream(url: str, path: str, body: dict):
    """(status, an iterator of the response's non-empty lines) of a streamed POST; leaving closes the connection."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        yield response.status, (line.decode().rstrip("\r\n") for line in iter(response.readline, b"")
                                if line.strip())
    finally:
        conn.close()


@pytest.mark.parametrize("body, status, names", [
    (b'{"model": "tiny-pydoc", "messages": [', 400, "not valid JSON"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-4"),
    ({"messages": [{"role": "user", "content": "hi " * 600}]}, 400, "--max-len"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 2.5}, 400, "top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "wizard"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400,
     "takes no images"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "needs logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
])
def test_bad_requests_get_a_4xx_naming_the_culprit(server, body, status, names):
    code, answer = _post(server[1], "/v1/chat/completions", body)
    assert code == status and names in answer["error"]["message"], answer
    assert answer["error"]["type"] in ("invalid_request_error", "model_not_found") or code == 404
    code, answer = _post(server[1], "/v1/completions", {"prompt": "The", "max_tokens": 2})
    assert code == 200 and answer["usage"]["completion_tokens"] == 2  # still serving


def test_load_64_clients_every_request_answered_or_refused(server):
    """64 clients x 3 requests against 8 rows and a queue of 16: each answered in full or refused with a 429."""
    url = server[1]

    def client_run(i: int) -> list[int]:
        codes = []
        for j in range(3):
            body = {"prompt": f"Client {i} request {j}:", "max_tokens": 8, "temperature": 0.7, "seed": i}
            if j == 1:
                with _stream(url, "/v1/completions", {**body, "stream": True}) as (status, lines):
                    lines = list(lines)
                codes.append(status)
                if status == 200:
                    assert lines[-1] == "data: [DONE]"
                    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
                else:
                    assert json.loads(lines[0])["error"]["type"] == "rate_limit_error"
                continue
            status, answer = _post(url, "/v1/completions", body)
            codes.append(status)
            if status == 200:
                assert answer["usage"]["completion_tokens"] >= 1
            else:
                assert answer["error"]["type"] == "rate_limit_error"
        return codes

    before = _metrics(url)
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        codes = [c for result in pool.map(client_run, range(64)) for c in result]
    assert len(codes) == 192 and set(codes) <= {200, 429} and codes.count(200) >= MAX_BATCH + MAX_QUEUE
    after = _metrics(url)
    answered = sum(after[f'qwenjax_requests_total{{reason="{r}"}}'] - before[f'qwenjax_requests_total{{reason="{r}"}}']
                   for r in ("stop", "length"))
    assert answered == codes.count(200)
    assert after["qwenjax_requests_refused_total"] - before["qwenjax_requests_refused_total"] == codes.count(429)


# Every filter set, at values that keep all but the least likely tokens (the checkpoint's defaults are top_k 20,
# top_p 0.95): the sampling tests' requests then differ in data alone and share compiled programs.
UNFILTERED = {"top_k": 4096, "top_p": 1 - 1e-7, "min_p": 1e-9}


def test_sampling_filters_keep_only_their_tokens(client):
    """At temperature 3, four choices of 16 tokens each (one compiled program: see UNFILTERED): with top_k 3
    every token is among the model's 3 most likely (its own log-probabilities, the raw logits' ranking, as
    `logprobs` reports them); with min_p 0.2 every token's probability at that temperature is at least 0.2 of the
    most likely one's, p / p_max = exp((lp - lp_max) / T); top_k 1, top_p 1e-6 and min_p 1 each keep only the most
    likely token: greedy's text. Unfiltered, tokens break both rules and the text is not greedy's; filtered (not
    at a limit), some tokens are not the most likely: it is sampling."""
    prompt, temperature, floor = "The os module provides", 3.0, np.log(0.2)
    greedy = client.completions.create(model="tiny-pydoc", prompt=prompt, max_tokens=16, temperature=0)
    greedy = greedy.choices[0].text

    def sample(**filters):  # (texts, [(the chosen token's log-probability, the 3 most likely's)] over the choices)
        r = client.completions.create(model="tiny-pydoc", prompt=prompt, max_tokens=16, temperature=temperature,
                                      seed=3, n=4, logprobs=3, extra_body={**UNFILTERED, **filters})
        assert len(r.choices) == 4
        return [c.text for c in r.choices], [(lp, sorted(top.values(), reverse=True)) for c in r.choices
                                             for lp, top in zip(c.logprobs.token_logprobs, c.logprobs.top_logprobs)]

    in_top_3 = lambda lp, top: lp >= top[-1] - 1e-5
    kept_by_min_p = lambda lp, top: (lp - top[0]) / temperature >= floor - 1e-5
    texts, free = sample()
    assert greedy not in texts
    assert not all(in_top_3(*t) for t in free) and not all(kept_by_min_p(*t) for t in free)
    for filters, rule in (({"top_k": 3}, in_top_3), ({"min_p": 0.2}, kept_by_min_p)):
        _, tokens = sample(**filters)
        assert all(rule(*t) for t in tokens), filters
        assert any(lp < top[0] - 1e-5 for lp, top in tokens), filters
    for filters in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        texts, tokens = sample(**filters)
        assert texts == [greedy] * 4 and all(abs(lp - top[0]) < 1e-5 for lp, top in tokens), filters


def test_n_choices_each_seeded_apart(client):
    """n = 3: three choices (indices 0-2) from one prompt, prefilled once (usage counts the prompt once, the
    tokens of all three), each its own sample; the same request gives the same three, and streamed the chunks
    carry the same texts by index."""
    body = dict(model="tiny-pydoc", prompt="The os module provides", max_tokens=12, temperature=1.0, seed=11, n=3,
                logprobs=3, extra_body=UNFILTERED)  # the programs of test_sampling_filters_keep_only_their_tokens
    r = client.completions.create(**body)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.text for c in r.choices]
    assert len(set(texts)) == 3
    assert r.usage.prompt_tokens == len(Tokenizer(DEFAULT_MODEL_DIR).encode(body["prompt"]))
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices) > 3
    assert [c.text for c in client.completions.create(**body).choices] == texts
    streamed = ["", "", ""]
    for chunk in client.completions.create(stream=True, **body):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == texts


def test_enable_thinking_false_goes_to_the_template(client, reference):
    """chat_template_kwargs {"enable_thinking": false}: the template's empty thinking block ends the prompt (the
    usage counts its tokens), the reply is generate's on that prompt, and none of it is reasoning."""
    m, tok = reference
    messages = [{"role": "user", "content": "What does the os module do?"}]
    on, off = (tok.apply_chat_template(messages, enable_thinking=flag) for flag in (True, False))
    assert off.endswith("<think>\n\n</think>\n\n") and not on.endswith("</think>\n\n")
    ask = lambda **kw: client.chat.completions.create(model="tiny-pydoc", messages=messages, max_tokens=24,
                                                      temperature=0, **kw)
    r = ask(extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    alone = qwenjax.generate(m, [tok.encode(off)], max_new_tokens=24, eos_token_ids=2)[0]
    assert r.usage.prompt_tokens == len(tok.encode(off)) != len(tok.encode(on))
    assert (r.choices[0].message.reasoning_content or "", r.choices[0].message.content) == split_thinking(
        tok.decode(alone), prompt_opened_thinking=False)
    assert not r.choices[0].message.reasoning_content
    r = ask(extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert r.usage.prompt_tokens == len(tok.encode(on)) == ask().usage.prompt_tokens


BUNDLED_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a city.",
                                      "parameters": {"type": "object", "required": ["city"], "properties": {
                                          "city": {"type": "string", "description": "The city name"}}}}},
    {"type": "function", "function": {"name": "calculator", "description": "Evaluate an arithmetic expression.",
                                      "parameters": {"type": "object", "required": ["expression"], "properties": {
                                          "expression": {"type": "string", "description": "The expression"}}}}}]


@pytest.mark.parametrize("question, name, argument", [("What's the weather in Lyon?", "get_weather", "city"),
                                                      ("What is 12 * 34?", "calculator", "expression")])
def test_the_bundled_model_calls_a_tool(client, question, name, argument):
    """The bundled model, fine-tuned to call tools (scripts/train_tool_model.py), answers a weather and a
    calculator question with a parsed call to the right tool, tool_choice left to it, streamed and not. Its
    arguments are typed but made up: it picks tools, it never learned to copy values (its card)."""
    ask = dict(model="tiny-pydoc", messages=[{"role": "user", "content": question}], tools=BUNDLED_TOOLS,
               max_tokens=80, temperature=0)
    r = client.chat.completions.create(**ask)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    call, = r.choices[0].message.tool_calls
    assert call.function.name == name and call.id and call.type == "function"
    args = json.loads(call.function.arguments)
    assert list(args) == [argument] and isinstance(args[argument], str) and args[argument], args
    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    streamed = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
    assert streamed[0].function.name == name and streamed[0].id
    assert json.loads("".join(t.function.arguments or "" for t in streamed)) == args


def test_metrics_count_prefilled_and_cached_tokens_and_the_cache_size(server, client):
    """A 300-token prompt prefills in full (two chunks) and leaves snapshots (its 256-token block boundary and
    its end); a prompt sharing its first 256 tokens prefills only its own 20: /metrics' prompt, prefilled and
    cached counters, prefix-cache lookups, hits, entries and bytes move by exactly that."""
    url = server[1]
    rng = np.random.default_rng(21)
    first = rng.integers(5, 4000, 300).tolist()
    second = first[:256] + rng.integers(5, 4000, 20).tolist()
    names = ["qwenjax_prompt_tokens_total", "qwenjax_prefill_tokens_total", "qwenjax_cached_prompt_tokens_total",
             "qwenjax_prefix_cache_lookups_total", "qwenjax_prefix_cache_hits_total",
             "qwenjax_prefix_cache_entries", "qwenjax_prefix_cache_bytes", "qwenjax_generation_tokens_total"]
    moved = lambda a, b: [b[k] - a[k] for k in names]
    m0 = _metrics(url)
    r1 = client.completions.create(model="tiny-pydoc", prompt=first, max_tokens=4, temperature=0)
    m1 = _metrics(url)
    r2 = client.completions.create(model="tiny-pydoc", prompt=second, max_tokens=4, temperature=0)
    m2 = _metrics(url)
    assert (r1.usage.prompt_tokens_details.cached_tokens, r2.usage.prompt_tokens_details.cached_tokens) == (0, 256)
    prompt, prefilled, cached, lookups, hits, entries, size, generated = moved(m0, m1)
    assert (prompt, prefilled, cached, lookups, hits, generated) == (300, 300, 0, 1, 0, r1.usage.completion_tokens)
    assert entries == 2 and size > 0
    prompt, prefilled, cached, lookups, hits, entries, more, generated = moved(m1, m2)
    assert (prompt, prefilled, cached, lookups, hits, generated) == (276, 20, 256, 1, 1, r2.usage.completion_tokens)
    assert entries == 1 and 0 < more < size  # the new snapshot holds keys and values of its 20-odd tokens alone
    assert m2["qwenjax_prefix_cache_hit_rate"] == pytest.approx(
        m2["qwenjax_prefix_cache_hits_total"] / m2["qwenjax_prefix_cache_lookups_total"], abs=1e-4)


def test_a_client_killed_mid_stream_frees_its_row(server):
    url = server[1]
    before = _metrics(url)['qwenjax_requests_total{reason="cancelled"}']
    # "The": 480 greedy tokens without an eos ("Once" ends after 26, which may come before the close is seen)
    with _stream(url, "/v1/completions", {"prompt": "The", "max_tokens": 480, "stream": True,
                                          "temperature": 0}) as (status, lines):
        assert status == 200 and next(lines).startswith("data: ")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        metrics = _metrics(url)
        if metrics["qwenjax_running_rows"] == 0 and metrics['qwenjax_requests_total{reason="cancelled"}'] > before:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the row was not freed: {metrics}")


def test_sigterm_finishes_in_flight_requests_then_exits(server, reference):
    """Last in this file: it stops the server. A stream of 400 greedy tokens, SIGTERM after its first: every token
    arrives (generate's, and the closing usage counts them all) before the server exits."""
    proc, url = server
    m, tok = reference
    alone = qwenjax.generate(m, [tok.encode("The")], max_new_tokens=400, temperature=0.0)[0]
    with _stream(url, "/v1/completions", {"prompt": "The", "max_tokens": 400, "stream": True, "temperature": 0,
                                          "stream_options": {"include_usage": True}}) as (status, lines):
        first = next(lines)
        proc.send_signal(signal.SIGTERM)
        rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in [first, *rest[:-1]]]
    assert "".join(c["text"] for e in events for c in e["choices"]) == tok.decode(alone)
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == len(alone) == 400
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    if os.name == "posix":
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{url}/health", timeout=2)
