"""What a request may hold, held to a real `qwenjax serve` on localhost: every field of OpenAI's request schemas is
implemented, a no-op that cannot change the reply, or refused by name, and so is any unknown field; README's field
table is the code's; echo and prompt logprobs are the model's own (in-process `m(ids)`, prefix-cache hits too);
vLLM's /tokenize, /detokenize and /tokenizer_info; the framework's errors in OpenAI's shape; hostile requests
(a lone surrogate, nesting 5,000 deep, top_k past int32, 100k-character stop strings, a 5 MB prompt, 300 prompts at
once) answered with a 4xx or served, never a 500, and never stalling /health or the requests beside them."""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import threading
import time
import urllib.request

import numpy as np
import pytest

from qwenjax.serve.protocol import FIELDS, field_table
from qwenjax.serve.responses import ChatChoice, StopScan, TextChoice
from test_serve_api import _metrics, _post, _serving, _stream

openai = pytest.importorskip("openai")

MAX_LEN, MAX_QUEUE = 512, 16
README = os.path.join(os.path.dirname(__file__), "..", "README.md")


@pytest.fixture(scope="module")
def server():
    with _serving("--max-batch", "8", "--max-len", str(MAX_LEN), "--max-queue", str(MAX_QUEUE),
                  "--prefill-chunk", "64", "--no-warmup") as s:
        yield s[1]


@pytest.fixture(scope="module")
def reference():
    import qwenjax
    from qwenjax.demo import DEFAULT_MODEL_DIR
    from qwenjax.inference.tokenizer import Tokenizer

    return qwenjax.from_pretrained(DEFAULT_MODEL_DIR, dtype="float32"), Tokenizer(DEFAULT_MODEL_DIR)


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _raw(url: str, path: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _is_openai_error(answer: dict, status: int) -> bool:
    return set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"} and \
        answer["error"]["code"] == status


# ---- the field table -----------------------------------------------------------------------------------------------
def test_every_openai_request_field_is_in_the_table():
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_create_params

    for params, endpoint in ((chat_create_params.CompletionCreateParamsBase, "chat"),
                             (completion_create_params.CompletionCreateParamsBase, "completions")):
        for name in [*params.__annotations__, "stream"]:
            assert name in FIELDS, f"OpenAI's {endpoint} field {name!r} is not in qwenjax.serve.protocol.FIELDS"
            assert endpoint in FIELDS[name].endpoints, (name, endpoint)


def test_readme_field_table_is_the_codes():
    text = open(README).read()
    assert field_table() in text, "README's field table is not `python -m qwenjax.serve.protocol`'s output"


# ---- refusing what would be ignored --------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "guided_json": {}}, "guided_json"),
    ("/v1/completions", {"prompt": "The", "echo_prompt": True}, "echo_prompt"),
    ("/v1/completions", {"prompt": "The", "stream": True, "stream_options": {"include_usage": True, "x": 1}},
     "stream_options.x"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "low"},
     "reasoning_effort"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]},
     "functions"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"]},
     "modalities"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "verbosity": "low"}, "verbosity"),
    ("/v1/completions", {"prompt": "The", "suffix": " end"}, "suffix"),
    ("/v1/completions", {"prompt": "The", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "The", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "The", "echo": True, "stream": True}, "echo"),
    ("/v1/completions", {"prompt": "The", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "The", "logit_bias": {"99999": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "The", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "The", "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "The", "repetition_penalty": 0}, "repetition_penalty"),
])
def test_fields_it_would_ignore_are_refused_by_name(server, path, body, param):
    status, answer = _post(server, path, body)
    assert status == 400 and _is_openai_error(answer, 400), answer
    assert answer["error"]["param"] == param and param in answer["error"]["message"], answer


def test_no_op_fields_change_nothing_and_developer_is_system(server):
    chat = {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a"
                                                                           " module?"}],
            "max_tokens": 8, "temperature": 0}
    _, plain = _post(server, "/v1/chat/completions", chat)
    _, extras = _post(server, "/v1/chat/completions", {
        **chat, "user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
        "safety_identifier": "s", "prompt_cache_key": "k", "prediction": {"type": "content", "content": "x"},
        "modalities": ["text"], "parallel_tool_calls": True, "response_format": {"type": "text"},
        "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "ignore_eos": False,
        "min_tokens": 0})
    developer = {**chat, "messages": [{"role": "developer", "content": "Answer briefly."}, chat["messages"][1]]}
    _, dev = _post(server, "/v1/chat/completions", developer)
    assert plain["choices"][0]["message"] == extras["choices"][0]["message"] == dev["choices"][0]["message"]
    _, as_system = _post(server, "/tokenize", {"messages": chat["messages"]})
    _, as_developer = _post(server, "/tokenize", {"messages": developer["messages"]})
    assert as_system["tokens"] == as_developer["tokens"]


def test_sampling_controls_are_generates(server, reference):
    """Each control over HTTP gives the tokens `qwenjax.generate` gives with it (greedy), and does something."""
    import qwenjax

    m, tok = reference
    prompt = "The os module"
    ids = tok.encode(prompt)
    plain = qwenjax.generate(m, ids, max_new_tokens=12)[0]
    for http, kwargs in [
        ({"presence_penalty": 1.5, "frequency_penalty": 1.0}, dict(presence_penalty=1.5, frequency_penalty=1.0)),
        ({"repetition_penalty": 1.8}, dict(repetition_penalty=1.8)),
        ({"logit_bias": {str(plain[1]): -100, "7": 4.0}}, dict(logit_bias=((plain[1], -100.0), (7, 4.0)))),
        ({"min_tokens": 12, "ignore_eos": True}, dict(min_tokens=12, ignore_eos=True)),
    ]:
        want = qwenjax.generate(m, ids, max_new_tokens=12, **kwargs)[0]
        status, answer = _post(server, "/v1/completions", {"prompt": ids, "max_tokens": 12, "temperature": 0,
                                                           **http})
        assert status == 200, answer
        assert answer["choices"][0]["text"] == tok.decode(want), http
        assert answer["usage"]["completion_tokens"] == len(want)
        assert want != plain or "min_tokens" in http, http
    _, answer = _post(server, "/v1/completions", {"prompt": ids, "max_tokens": 5, "temperature": 0,
                                                  "logit_bias": {"7": 100}})
    assert answer["choices"][0]["text"] == tok.decode([7] * 5)


def test_models_by_id(server):
    assert _get(f"{server}/v1/models/tiny-pydoc")[1]["id"] == "tiny-pydoc"
    status, answer = _get(f"{server}/v1/models/gpt-4o")
    assert status == 404 and _is_openai_error(answer, 404) and "gpt-4o" in answer["error"]["message"]


# ---- evaluation: echo, prompt logprobs, the tokenizer endpoints ----------------------------------------------------
def _log_softmax(m, ids: list[int]) -> np.ndarray:
    logits = np.asarray(m(np.array([ids], np.int32))[0], np.float64)
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)


def test_echo_logprobs_are_the_models_and_lm_eval_reads_them(server, reference):
    m, tok = reference
    prompts = ["The module provides functions", "Return a new list of the"]
    status, answer = _post(server, "/v1/completions", {"prompt": prompts, "max_tokens": 1, "logprobs": 1,
                                                       "echo": True, "temperature": 0})
    assert status == 200, answer
    for p, choice in zip(prompts, sorted(answer["choices"], key=lambda c: c["index"])):
        ids = tok.encode(p)
        lp = _log_softmax(m, ids + [int(np.argmax(_log_softmax(m, ids)[-1]))])
        got = choice["logprobs"]
        assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
        assert len(got["token_logprobs"]) == len(ids) + 1 and choice["text"].startswith(p)
        want = [lp[i - 1, t] for i, t in enumerate(ids) if i] + [lp[len(ids) - 1].max()]
        np.testing.assert_allclose(got["token_logprobs"][1:], want, atol=1e-4)
        for i in range(1, len(ids)):  # lm-eval's greedy check: the top alternative against the token's own
            assert max(got["top_logprobs"][i].values()) == pytest.approx(lp[i - 1].max(), abs=1e-4)
        assert got["text_offset"][:len(ids)] == [start for start, _ in tok.encode_with_offsets(p)[1]]
        assert got["text_offset"][-1] == len(p)


def test_echo_with_max_tokens_0_and_prompt_logprobs_survive_the_prefix_cache(server, reference):
    m, tok = reference
    prompt = "The " + "module provides functions for lists and dictionaries. " * 12  # > prefill chunk: cached
    ids = tok.encode(prompt)
    lp = _log_softmax(m, ids)
    before = _metrics(server)["qwenjax_prefix_cache_hits_total"]
    for attempt in range(2):
        status, answer = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True,
                                                           "logprobs": 0})
        assert status == 200 and answer["choices"][0]["text"] == prompt and answer["usage"]["completion_tokens"] == 0
        np.testing.assert_allclose(answer["choices"][0]["logprobs"]["token_logprobs"][1:],
                                   [lp[i - 1, t] for i, t in enumerate(ids) if i], atol=1e-4)
        status, answer = _post(server, "/v1/completions", {"prompt": ids, "max_tokens": 2, "prompt_logprobs": 3,
                                                           "temperature": 0})
        pl = answer["choices"][0]["prompt_logprobs"]
        assert pl[0] is None and len(pl) == len(ids)
        for i in range(1, len(ids)):
            mine = pl[i][str(ids[i])]
            assert mine["logprob"] == pytest.approx(lp[i - 1, ids[i]], abs=1e-4)
            assert mine["rank"] == 1 + int((lp[i - 1] > lp[i - 1, ids[i]]).sum())
            top3 = sorted((v["rank"], int(k)) for k, v in pl[i].items() if v["rank"] <= 3)
            assert [k for _, k in top3][:3] == list(np.argsort(-lp[i - 1])[:3])
    assert _metrics(server)["qwenjax_prefix_cache_hits_total"] > before  # the second time came from the cache


def test_tokenizer_endpoints_are_vllms(server, reference):
    _, tok = reference
    _, info = _get(f"{server}/tokenizer_info")
    assert info["eos_token"] == tok.special_tokens["eos_token"] and info["chat_template"] == tok.chat_template_source
    status, out = _post(server, "/tokenize", {"prompt": "The module", "add_special_tokens": False,
                                              "return_token_strs": True})
    assert out["tokens"] == tok.encode("The module") and out["count"] == len(out["tokens"])
    assert "".join(out["token_strs"]) == "The module" and out["max_model_len"] == MAX_LEN
    messages = [{"role": "user", "content": "hi"}]
    _, out = _post(server, "/tokenize", {"messages": messages})
    assert out["tokens"] == tok.encode(tok.apply_chat_template(messages))
    _, out = _post(server, "/detokenize", {"tokens": tok.encode("The module")})
    assert out == {"prompt": "The module"}
    status, out = _post(server, "/detokenize", {"tokens": [10 ** 9]})
    assert status == 400 and out["error"]["param"] == "tokens"
    status, out = _post(server, "/tokenize", {"prompt": "a", "messages": messages})
    assert status == 400


def test_continuous_usage_stats_in_every_chunk(server):
    with _stream(server, "/v1/completions", {"prompt": "The module", "max_tokens": 6, "stream": True,
                                             "temperature": 0, "stream_options": {"continuous_usage_stats": True,
                                                                                  "include_usage": True}}) as (
            status, it):
        lines = [json.loads(line[6:]) for line in it if line != "data: [DONE]"]
    assert status == 200
    counts = [c["usage"]["completion_tokens"] for c in lines]
    assert all("usage" in c for c in lines) and counts == sorted(counts) and counts[-1] == 6


# ---- the framework's own errors, hostile requests ------------------------------------------------------------------
@pytest.mark.parametrize("data", [b'{"prompt": "\xff\xfe", "max_tokens": 2}', b"[" * 5000 + b"]" * 5000,
                                  b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"])
def test_unreadable_bodies_get_openai_errors(server, data):
    status, answer = _raw(server, "/v1/completions", data)
    assert status == 400 and _is_openai_error(answer, 400), answer


def test_unknown_routes_and_methods_get_openai_errors(server):
    status, answer = _get(f"{server}/v2/nothing")
    assert status == 404 and _is_openai_error(answer, 404)
    status, answer = _get(f"{server}/v1/completions")
    assert status == 405 and _is_openai_error(answer, 405)


def test_lone_surrogates_and_deep_tool_arguments_are_400s(server):
    status, answer = _raw(server, "/v1/completions", b'{"prompt": "ab\\udfff", "max_tokens": 2}')
    assert status == 400 and answer["error"]["param"] == "prompt" and "surrogate" in answer["error"]["message"]
    status, answer = _raw(server, "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "x\udfffy"}]}, ensure_ascii=True).encode())
    assert status == 400 and answer["error"]["param"].startswith("messages"), answer
    deep = "[" * 5000 + "]" * 5000
    status, answer = _post(server, "/v1/chat/completions", {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function",
                                                              "function": {"name": "f", "arguments": deep}}]},
        {"role": "tool", "tool_call_id": "c", "content": "ok"}], "max_tokens": 2})
    assert status == 400 and "tool_calls" in answer["error"]["param"], answer


def _alone(url: str, prompt: str, n: int) -> list:
    _, answer = _post(url, "/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0})
    return answer["choices"][0]["text"]


def test_a_huge_top_k_is_served_and_the_rows_beside_it_are_untouched(server):
    prompts = [f"The {w} module" for w in ("os", "sys", "json", "re", "time", "math")]
    alone = [_alone(server, p, 12) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        running = [pool.submit(_alone, server, p, 12) for p in prompts]
        time.sleep(0.2)
        bad = pool.submit(_post, server, "/v1/completions", {"prompt": "The", "max_tokens": 3, "top_k": 2 ** 31,
                                                             "temperature": 1.0, "seed": 1})
        assert bad.result()[0] == 200
        assert [f.result() for f in running] == alone


def test_stop_strings_scan_linearly():
    rng = random.Random(0)
    for _ in range(300):
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3)))
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        scan, cut = StopScan(stops), None
        for end in sorted({0, len(text), *(rng.randint(0, len(text)) for _ in range(4))}):
            cut = scan.feed(text[:end])
            if cut is not None:
                break
        ends = [(text.find(s) + len(s), -len(s), text.find(s)) for s in stops if s in text[:end]]
        assert cut == (min(ends)[2] if ends else None), (stops, text)
        if cut is None:  # the most that may begin a stop string is held back
            assert scan.partial == max((k for s in stops for k in range(len(s), 0, -1)
                                        if text[:end].endswith(s[:k]) and k < len(s)), default=0)
    long_stop = "ab" * 50_000
    scan = StopScan((long_stop, "zz"))
    started = time.perf_counter()
    text = ""
    for _ in range(2000):
        text += "ab"
        assert scan.feed(text) is None
    assert scan.partial == 4000 and time.perf_counter() - started < 2.0


def _health_latency(url: str, stop: threading.Event, worst: list) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        urllib.request.urlopen(f"{url}/health", timeout=60).read()
        worst[0] = max(worst[0], time.perf_counter() - started)
        time.sleep(0.02)


@pytest.mark.parametrize("body", [
    {"prompt": "The module", "max_tokens": 4, "stop": ["x" * 100_000, "y" * 100_000, "z" * 100_000]},
    {"messages": [{"role": "user", "content": "hi " * 1_700_000}], "max_tokens": 2},
])
def test_big_bodies_do_not_stall_the_event_loop(server, body):
    stop, worst = threading.Event(), [0.0]
    watcher = threading.Thread(target=_health_latency, args=(server, stop, worst))
    watcher.start()
    try:
        time.sleep(0.3)
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        status, answer = _post(server, path, body)
        assert status == (400 if "messages" in body else 200), answer
    finally:
        stop.set()
        watcher.join()
    assert worst[0] < 1.0, f"/health took {worst[0]:.2f} s while the big request was read"


def test_what_can_never_fit_is_a_400_and_leaves_nothing_queued(server):
    status, answer = _post(server, "/v1/completions", {"prompt": ["The"] * 300, "max_tokens": 2})
    assert status == 400 and answer["error"]["param"] == "prompt" and "--max-queue" in answer["error"]["message"]
    assert _metrics(server)["qwenjax_queue_length"] == 0
    assert _post(server, "/v1/completions", {"prompt": "The", "max_tokens": 2})[0] == 200


def test_parallel_tool_calls_false_keeps_the_first_call(reference):
    _, tok = reference
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer"}}}}}]
    reply = ("<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>\n"
             "<tool_call>\n<function=f>\n<parameter=x>\n2\n</parameter>\n</function>\n</tool_call>")
    for parallel, count in ((True, 2), (False, 1)):
        choice = ChatChoice(tok, (), False, tools, parallel)
        choice.push(tok.encode(reply))
        choice.delta(final=True)
        calls = choice.message()["tool_calls"]
        assert [json.loads(c["function"]["arguments"])["x"] for c in calls] == [1, 2][:count]



def test_stop_strings_count_only_past_min_tokens(reference):
    """vLLM's rule, as the engine keeps it (qwenjax.inference.generate.StopStrings): a stop string ending within
    the first min_tokens tokens' text does not end the reply or cut its text."""
    _, tok = reference
    ids = tok.encode("The module. The module. The end")
    for min_tokens, want in ((0, "The"), (len(tok.encode("The module. The")), "The module. The")):
        choice = TextChoice(tok, (" module",), min_tokens=min_tokens)
        for t in ids:
            choice.push([t])
        assert choice.stopped and choice.message()["text"] == want, (min_tokens, choice.message())
