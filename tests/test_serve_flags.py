"""Server flags and checkpoint defaults, on one `qwenjax serve` in its default dtype (bfloat16) of a copy of the
bundled model with a generation_config.json of its own: a batch-1 request equals `qwenjax.generate` in bf16;
sampling settings a request leaves out come from generation_config.json; --prefix-cache-mb 0 turns the prefix
cache off; a non-streamed client that disconnects frees its row; --shutdown-timeout bounds the wait for in-flight
requests on SIGTERM."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import time
import urllib.parse

import numpy as np
import pytest

import qwenjax
from qwenjax.demo import DEFAULT_MODEL_DIR
from qwenjax.inference.tokenizer import Tokenizer, split_thinking
from test_serve_api import _metrics, _serving, _stream

openai = pytest.importorskip("openai")

MAX_LEN, SHUTDOWN_TIMEOUT = 2048, 1.0
LONG = {"prompt": "The", "max_tokens": 2000, "temperature": 0}  # greedy "The" runs 2000 tokens without an eos


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The bundled model, its generation_config.json sampling at temperature 1 from the 2 most likely tokens
    (top_k 2, no top_p; the bundled one has top_k 20, top_p 0.95)."""
    path = tmp_path_factory.mktemp("flags") / "tiny-pydoc"
    shutil.copytree(DEFAULT_MODEL_DIR, path)
    config = json.loads((path / "generation_config.json").read_text())
    config.pop("top_p")
    config.update(do_sample=True, temperature=1.0, top_k=2)
    (path / "generation_config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def server(model_dir):
    # one row: each request alone, and programs compiled at first use
    with _serving("--model", model_dir, "--max-batch", "1", "--max-len", str(MAX_LEN), "--prefill-chunk", "64",
                  "--prefix-cache-mb", "0", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT), "--no-warmup",
                  dtype=None) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key="unused", max_retries=0, timeout=300)


def test_bf16_batch_of_one_equals_generate(client, model_dir):
    """The server's default dtype: a greedy request alone gets `qwenjax.generate`'s bf16 tokens (a short prompt,
    a 300-token one prefilled in five chunks, a chat)."""
    m, tok = qwenjax.from_pretrained(model_dir, dtype="bfloat16"), Tokenizer(model_dir)
    for prompt in ("The os module provides", np.random.default_rng(5).integers(5, 4000, 300).tolist()):
        ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
        alone = qwenjax.generate(m, [ids], max_new_tokens=48, temperature=0.0)[0]
        r = client.completions.create(model="tiny-pydoc", prompt=prompt, max_tokens=48, temperature=0)
        assert r.choices[0].text == tok.decode(alone), f"prompt of {len(ids)} tokens"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(alone))
    messages = [{"role": "user", "content": "What does the json module do?"}]
    prompt = tok.encode(tok.apply_chat_template(messages))
    alone = qwenjax.generate(m, [prompt], max_new_tokens=48, temperature=0.0)[0]
    r = client.chat.completions.create(model="tiny-pydoc", messages=messages, max_tokens=48, temperature=0)
    assert (r.choices[0].message.reasoning_content or "", r.choices[0].message.content) == split_thinking(
        tok.decode(alone), prompt_opened_thinking=True)
    assert r.usage.completion_tokens == len(alone)


def test_unset_sampling_settings_come_from_generation_config(client):
    """generation_config.json samples at temperature 1 from the 2 most likely tokens: requests that set neither
    are sampled (three seeds, three texts), every token among the 2 most likely (the model's own log-probabilities,
    as `logprobs` reports them); a request's own top_k (4096: every token, the same compiled program) takes tokens
    from further down; its own temperature 0 is greedy, whatever the seed."""
    prompt = "The os module provides"

    def sample(seed, **fields):
        c = client.completions.create(model="tiny-pydoc", prompt=prompt, max_tokens=24, seed=seed, logprobs=2,
                                      extra_body=fields).choices[0]
        return c.text, [(lp, min(top.values())) for lp, top in zip(c.logprobs.token_logprobs,
                                                                    c.logprobs.top_logprobs)]

    runs = [sample(seed) for seed in (1, 2, 3)]
    assert len({text for text, _ in runs}) == 3
    assert all(lp >= second - 1e-5 for _, tokens in runs for lp, second in tokens)
    wide = [sample(seed, top_k=4096) for seed in (1, 2, 3)]
    assert any(lp < second - 1e-5 for _, tokens in wide for lp, second in tokens)
    greedy = [client.completions.create(model="tiny-pydoc", prompt=prompt, max_tokens=24, temperature=0,
                                        seed=seed).choices[0].text for seed in (1, 2)]
    assert greedy[0] == greedy[1] not in {text for text, _ in runs}


def test_prefix_cache_mb_0_turns_the_cache_off(server, client):
    """With --prefix-cache-mb 0 a chat's next turn and a repeated prompt are prefilled in full: no cached tokens
    in usage, and /metrics' cached tokens, prefix-cache hits, entries and bytes stay 0."""
    messages = [{"role": "user", "content": "What does the json module do?"}]
    turn2 = messages + [{"role": "assistant", "content": "It reads and writes JSON."},
                        {"role": "user", "content": "And pickle?"}]
    client.chat.completions.create(model="tiny-pydoc", messages=messages, max_tokens=8, temperature=0)
    r = client.chat.completions.create(model="tiny-pydoc", messages=turn2, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    prompt = np.random.default_rng(6).integers(5, 4000, 300).tolist()
    for _ in range(2):
        r = client.completions.create(model="tiny-pydoc", prompt=prompt, max_tokens=4, temperature=0)
        assert r.usage.prompt_tokens_details.cached_tokens == 0
    metrics = _metrics(server[1])
    assert metrics["qwenjax_prefill_tokens_total"] == metrics["qwenjax_prompt_tokens_total"] > 600
    for name in ("qwenjax_cached_prompt_tokens_total", "qwenjax_prefix_cache_hits_total",
                 "qwenjax_prefix_cache_entries", "qwenjax_prefix_cache_bytes"):
        assert metrics[name] == 0, name


def test_a_non_streamed_client_that_disconnects_frees_its_row(server):
    """A non-streamed request for 2000 tokens whose client closes the connection while it runs: the row is freed
    (running rows back to 0, the request counted as cancelled) long before its 2000 tokens."""
    url = server[1]
    before = _metrics(url)
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(LONG), {"Content-Type": "application/json"})
    deadline = time.monotonic() + 60
    while _metrics(url)["qwenjax_running_rows"] == 0:
        assert time.monotonic() < deadline, "the request never took a row"
        time.sleep(0.05)
    conn.close()
    while (metrics := _metrics(url))["qwenjax_running_rows"] != 0:
        assert time.monotonic() < deadline, f"the row was not freed: {metrics}"
        time.sleep(0.1)
    moved = {r: metrics[f'qwenjax_requests_total{{reason="{r}"}}'] - before[f'qwenjax_requests_total{{reason="{r}"}}']
             for r in ("stop", "length", "cancelled")}
    assert moved == {"stop": 0, "length": 0, "cancelled": 1}
    assert metrics["qwenjax_generation_tokens_total"] - before["qwenjax_generation_tokens_total"] < 2000


def test_shutdown_timeout_bounds_the_wait_for_in_flight_requests(server):
    """Last in this file: it stops the server. SIGTERM during a stream of 2000 tokens (seconds of work): the
    server waits --shutdown-timeout (1 s) for it, then cancels it and exits; the stream ends without [DONE]."""
    proc, url = server
    received = []
    with _stream(url, "/v1/completions", {**LONG, "stream": True}) as (status, lines):
        assert status == 200
        received.append(next(lines))
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            received += list(lines)
        except (http.client.HTTPException, OSError):  # the connection dropped mid-chunk
            pass
        code = proc.wait(timeout=60)
        waited = time.monotonic() - sent
    assert code in (0, -signal.SIGTERM)
    assert SHUTDOWN_TIMEOUT <= waited < SHUTDOWN_TIMEOUT + 20
    assert "data: [DONE]" not in received
    text = "".join(json.loads(line.removeprefix("data: "))["choices"][0]["text"] for line in received)
    assert 0 < len(text) and len(received) < 2000
