"""The serving engine in process: continuous batching and the prefix cache give exactly what `qwenjax.generate`
gives each request alone; and the chat reply parser (thinking, tool calls), whole and streamed."""

from __future__ import annotations

import dataclasses
import json
import queue

import numpy as np
import pytest

import qwenjax
from qwenjax.demo import DEFAULT_MODEL_DIR
from qwenjax.inference.sampling import SamplingParams
from qwenjax.inference.tokenizer import Tokenizer
from qwenjax.serve.engine import Engine, Finished, QueueFull, Request
from qwenjax.serve.reply_parser import ReplyParser, collect, parse_tool_call
from qwenjax.validate import InputError

LENGTHS = [70, 5, 131, 1, 300, 17, 64, 65, 200, 3, 40, 90, 128, 256, 12, 33]


@pytest.fixture(scope="module")
def model():
    # fp32: in bf16 a batch of 1-4 rows runs the C++ matvec kernel and a larger one XLA's dot, whose results
    # differ in the last bit, and a greedy choice between two near-equal tokens can follow that bit (measured:
    # 2 of 16 random prompts diverge after 12+ tokens in bf16 at batch 8; none at batch 1, none in fp32)
    return qwenjax.from_pretrained(DEFAULT_MODEL_DIR, dtype="float32")


@pytest.fixture(scope="module")
def engine(model):
    eng = Engine(model, max_batch=16, max_len=512, prefill_chunk=256, tokenizer=Tokenizer(DEFAULT_MODEL_DIR))
    eng.start(warmup=False)  # each program compiles at first use: fewer than the warm-up compiles
    yield eng
    eng.stop()


def _submit(engine, prompt, max_tokens, **kw) -> queue.Queue:
    q = queue.Queue()
    q.request = engine.submit(Request(prompt=list(prompt), on_event=q.put, max_tokens=max_tokens, **kw))
    return q


def _collect(q) -> tuple[list[int], Finished]:
    tokens = []
    while True:
        event = q.get(timeout=300)
        if isinstance(event, Finished):
            return tokens, event
        tokens += event.ids


def test_continuous_batching_equals_generate_alone(model, engine):
    """16 concurrent greedy requests, prompts of 1 to 300 tokens (two prefill chunks for the longest), some
    stopping early at eos: each gets the tokens `generate` gives it alone."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 4000, n).tolist() for n in LENGTHS]
    eos = {r: None for r in range(len(prompts))}
    queues = [_submit(engine, p, 24, stop_token_ids=frozenset()) for p in prompts]
    served = [_collect(q) for q in queues]
    for r, (p, (tokens, done)) in enumerate(zip(prompts, served)):
        alone = qwenjax.generate(model, [p], max_new_tokens=24, eos_token_ids=())[0]
        assert tokens == alone, f"row {r} (prompt of {len(p)} tokens)"
        assert (done.reason, done.prompt_tokens, done.completion_tokens) == ("length", len(p), 24)
        eos[r] = alone[5]
    # the same prompts again, each stopping at its own 6th token: rows leave the batch at different steps
    queues = [_submit(engine, p, 24, stop_token_ids=frozenset({eos[r]})) for r, p in enumerate(prompts)]
    for r, q in enumerate(queues):
        tokens, done = _collect(q)
        alone = qwenjax.generate(model, [prompts[r]], max_new_tokens=24, eos_token_ids=eos[r])[0]
        assert tokens == alone and done.reason == "stop", f"row {r}"


def test_prefix_cache_is_exact_and_prefills_only_the_rest(model, engine):
    """A second turn restores the first turn's prompt and reply from the prefix cache (GDN state and KV) and
    prefills only its new tokens; its tokens equal those of a cache-off engine."""
    rng = np.random.default_rng(1)
    first = rng.integers(5, 4000, 150).tolist()
    reply, _ = _collect(_submit(engine, first, 20, stop_token_ids=frozenset()))
    second = first + reply[:-1] + rng.integers(5, 4000, 30).tolist()  # the reply's last token was never fed
    prefilled = engine.stats.prefilled_tokens
    tokens, done = _collect(_submit(engine, second, 20, stop_token_ids=frozenset()))
    assert done.cached_tokens == len(first) + len(reply) - 1
    assert engine.stats.prefilled_tokens - prefilled == len(second) - done.cached_tokens == 30
    off = Engine(model, max_batch=2, max_len=512, prefix_cache_bytes=0).start(warmup=False)
    try:
        assert _collect(_submit(off, second, 20, stop_token_ids=frozenset()))[0] == tokens
        assert off.prefix_cache.hits == 0
    finally:
        off.stop()
    # a block boundary of a long prompt (256 tokens) serves another prompt sharing only that block
    shared = rng.integers(5, 4000, 256).tolist()
    _collect(_submit(engine, shared + [11] * 40, 4, stop_token_ids=frozenset()))
    other = shared + [12] * 40
    tokens, done = _collect(_submit(engine, other, 8, stop_token_ids=frozenset()))
    assert done.cached_tokens == 256
    assert tokens == qwenjax.generate(model, [other], max_new_tokens=8, eos_token_ids=())[0]


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    """Each row samples with its own key (seed, token index): the same request gives the same tokens alone and
    beside 15 others with other settings."""
    prompt = list(range(100, 140))
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01)
    alone, _ = _collect(_submit(engine, prompt, 16, sampling=params, seed=7, stop_token_ids=frozenset()))
    others = [_submit(engine, list(range(200 + i, 230 + i)), 16, sampling=SamplingParams(temperature=1.0 + i / 10),
                      seed=i, stop_token_ids=frozenset()) for i in range(15)]
    again = _submit(engine, prompt, 16, sampling=params, seed=7, stop_token_ids=frozenset())
    [_collect(q) for q in others]
    assert _collect(again)[0] == alone
    other_seed, _ = _collect(_submit(engine, prompt, 16, sampling=params, seed=8, stop_token_ids=frozenset()))
    assert other_seed != alone


def test_cancel_frees_the_row_and_bad_requests_are_refused(model, engine):
    cancelled = engine.stats.requests["cancelled"]
    q = _submit(engine, [5] * 10, 400, stop_token_ids=frozenset())
    assert q.get(timeout=300).ids  # running
    engine.cancel(q.request)
    tokens, done = _collect(q)
    assert done.reason == "cancelled" and done.completion_tokens < 400 and engine.running == 0
    assert engine.stats.requests["cancelled"] == cancelled + 1
    bad = [(dict(prompt=[5] * 13, max_tokens=500), "needs 513 cache slots"),
           (dict(prompt=[5, 4096]), "prompt token 1 is 4096"),
           (dict(prompt=[]), "empty"),
           (dict(prompt=[5, 1.5]), "list of token ids"),
           (dict(seed=-1), "seed: must be >= 0"),
           (dict(seed=2 ** 63), "seed: must be <= 9223372036854775807"),
           (dict(min_tokens=6), "min_tokens: must be <= 5"),
           (dict(ignore_eos=1), "ignore_eos: must be true or false"),
           (dict(stop_token_ids=frozenset({2, 4096})), "stop_token_ids: 4096 is not a token id"),
           (dict(stop_strings=("ok", "")), "a stop string is empty"),
           (dict(sampling=SamplingParams(logit_bias=((4096, 1.0),))), r"logit_bias\[0\]: token id 4096"),
           (dict(sampling={"temperature": 1.0}), "must be a SamplingParams"),
           (dict(logprobs=21), "logprobs=21")]
    for fields, match in bad:
        with pytest.raises(InputError, match=match):
            engine.submit(Request(**{"prompt": [5], "on_event": print, "max_tokens": 5, **fields}))
    with pytest.raises(ValueError, match="tokenizer"):  # the engine's own setup, not the request's
        Engine(model, max_batch=1, max_len=64).submit(Request(prompt=[5], on_event=print, max_tokens=5,
                                                              stop_strings=("x",)))


def test_queue_accounting_cancel_and_submit_all(model):
    """A queued request's cancellation takes it out of the queue at once (it no longer counts toward the limit)
    and is counted; `submit_all` queues all or none: QueueFull when they do not fit now, InputError when they
    never could, or when one of them is bad (naming it)."""
    eng = Engine(model, max_batch=1, max_len=64, max_queue=3)  # not started: nothing leaves the queue
    queues = [queue.Queue() for _ in range(6)]
    requests = [Request(prompt=[5, i], on_event=q.put, max_tokens=4) for i, q in enumerate(queues)]
    assert eng.submit_all(requests[:2]) == requests[:2] and eng.queue_length == 2
    with pytest.raises(QueueFull):
        eng.submit_all(requests[2:4])
    assert eng.queue_length == 2
    eng.cancel(requests[0])
    assert eng.queue_length == 1 and eng.stats.requests["cancelled"] == 1
    assert queues[0].get_nowait() == Finished("cancelled", 2, 0, 0)
    eng.submit_all(requests[2:4])
    assert eng.queue_length == 3
    with pytest.raises(QueueFull):
        eng.submit(requests[4])
    with pytest.raises(InputError, match="4 requests at once can never fit this server's queue of 3"):
        Engine(model, max_batch=1, max_len=64, max_queue=3).submit_all(requests[:4])
    fresh = Engine(model, max_batch=1, max_len=64, max_queue=3)
    with pytest.raises(InputError, match="request 1 of 2: max_tokens: must be >= 1"):
        fresh.submit_all([requests[5], Request(prompt=[5], on_event=print, max_tokens=0)])
    assert fresh.queue_length == 0


def test_steps_are_dispatched_ahead_and_none_is_wasted(engine):
    """The loop dispatches the next step before it reads this one's tokens, yet a request that ends at its length
    takes exactly max_tokens - 1 decode steps (its first token comes from the prefill): none runs past it."""
    before = engine.stats.decode_steps
    tokens, done = _collect(_submit(engine, [7, 8, 9], 9, stop_token_ids=frozenset()))
    assert done.reason == "length" and len(tokens) == 9
    assert engine.stats.decode_steps - before == 8


# ---- logit controls and failures of one request ----------------------------------------------------------------
def _control_cases(tokenizer):
    """(prompt, max_tokens, SamplingParams fields, Request fields) for 16 requests, 8 with logit controls and 8
    without. "Return an iterator" ends at eos, its 22nd token."""
    rng = np.random.default_rng(9)
    ends = tokenizer.encode("Return an iterator")
    random = [rng.integers(5, 400, n).tolist() for n in (30, 5, 70, 12, 140, 3, 50, 21)]
    controlled = [(random[0], 16, dict(repetition_penalty=1.4), {}),
                  (random[1], 16, dict(frequency_penalty=0.8), {}),
                  (random[2], 16, dict(presence_penalty=1.5), {}),
                  (random[3], 16, dict(logit_bias=((16, 4.0), (290, -100.0))), {}),
                  (random[4], 16, dict(repetition_penalty=1.2, frequency_penalty=0.4, presence_penalty=0.4,
                                       logit_bias=((201, 2.0),)), {}),
                  (ends, 40, {}, dict(min_tokens=25)),
                  (ends, 30, {}, dict(ignore_eos=True)),
                  (ends, 40, dict(repetition_penalty=0.8), dict(min_tokens=22))]
    plain = [(p, 16, {}, {}) for p in random[5:]] + [(ends, 30, {}, {})] * 5
    return controlled + plain


@pytest.mark.parametrize("which", ["engine", "spec_engine"])
def test_logit_controls_per_row_equal_generate_alone(model, which, request):
    """16 requests at once, 8 with logit controls (each penalty, a bias, all together, min_tokens, ignore_eos)
    and 8 without, ending at eos or at their length; one's prompt half restored from the prefix cache (its
    penalties still read the whole prompt): each gets the tokens `generate` gives it alone with the same
    settings, plainly and with 2 drafts a step."""
    eng = request.getfixturevalue(which)
    cases = _control_cases(eng.tokenizer)
    # a first request leaves a snapshot of its first 128 tokens; case 4 (140 tokens) starts with them
    _collect(_submit(eng, cases[4][0][:128] + [7, 8], 2, snapshot_at=(128,)))
    queues = [_submit(eng, p, n, sampling=SamplingParams(**s), **kw) for p, n, s, kw in cases]
    for r, ((prompt, n, sampling, kw), q) in enumerate(zip(cases, queues)):
        tokens, done = _collect(q)
        alone = qwenjax.generate(model, [prompt], max_new_tokens=n, **sampling, **kw)[0]
        assert tokens == alone, f"request {r}: {sampling} {kw}"
        if r == 4:
            assert done.cached_tokens == 128
        if "min_tokens" in kw:
            assert not {0, 2} & set(tokens[:kw["min_tokens"]]) and len(tokens) > kw["min_tokens"]
        if kw.get("ignore_eos"):
            assert len(tokens) == n and done.reason == "length"
        if prompt == cases[5][0] and not sampling and not kw:  # without controls it ends at eos, before its length
            assert len(tokens) < n and done.reason == "stop"


def test_a_bias_of_100_forces_its_token(engine):
    for sampling in (SamplingParams(logit_bias=((77, 100.0),)),
                     SamplingParams(temperature=1.0, top_p=0.9, logit_bias=((77, 100.0),))):
        assert _collect(_submit(engine, list(range(100, 120)), 8, sampling=sampling, seed=3))[0] == [77] * 8


def test_a_request_that_fails_on_the_host_fails_alone(model, engine):
    """16 requests submitted together: one whose host-side preparation fails (its settings replaced after it was
    checked) finishes with "error" alone; one with top_k = 2^31 (past the vocabulary: off, never an int32
    overflow) samples what top_k = 0 samples; the other 14 give what `generate` gives each alone."""
    rng = np.random.default_rng(10)
    prompts = [rng.integers(5, 4000, n).tolist() for n in LENGTHS[:14]]
    sampled = dict(temperature=1.0, top_p=0.95)
    errors = engine.stats.requests["error"]
    with engine._lock:  # the loop admits none of them before all are in
        queues = [_submit(engine, p, 12, stop_token_ids=frozenset()) for p in prompts]
        huge = _submit(engine, prompts[0], 12, sampling=SamplingParams(top_k=2 ** 31, **sampled), seed=5,
                       stop_token_ids=frozenset())
        bad = _submit(engine, prompts[1], 12)
        bad.request.sampling = None
    tokens, done = _collect(bad)
    assert (tokens, done.reason) == ([], "error") and "AttributeError" in done.error
    assert engine.stats.requests["error"] == errors + 1
    for r, (p, q) in enumerate(zip(prompts, queues)):
        tokens, done = _collect(q)
        assert done.reason == "length" and tokens == qwenjax.generate(model, [p], max_new_tokens=12,
                                                                      eos_token_ids=())[0], f"request {r}"
    top_k_off = _submit(engine, prompts[0], 12, sampling=SamplingParams(**sampled), seed=5, stop_token_ids=frozenset())
    assert _collect(huge)[0] == _collect(top_k_off)[0]


# ---- speculative decoding --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spec_engine(model):
    """Two drafts a step from the bundled model's trained MTP head; prefill chunks of 64 (a 150-token prompt
    prefills in three, its head rows carried across them)."""
    eng = Engine(model, max_batch=16, max_len=512, prefill_chunk=64, speculative=2,
                 tokenizer=Tokenizer(DEFAULT_MODEL_DIR)).start(warmup=False)
    yield eng
    eng.stop()


def test_speculative_engine_greedy_equals_generate_alone(model, spec_engine):
    """16 concurrent greedy requests through verify passes that keep 1-3 tokens a row: each gets plain greedy
    decoding's tokens, including rows that stop at eos in the middle of a pass (the tokens after it are kept
    by the cache, never sent)."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(5, 4000, n).tolist() for n in LENGTHS]
    alone = [qwenjax.generate(model, [p], max_new_tokens=20, eos_token_ids=())[0] for p in prompts]
    before = dataclasses.replace(spec_engine.stats)
    queues = [_submit(spec_engine, p, 20, stop_token_ids=frozenset()) for p in prompts]
    for r, q in enumerate(queues):
        tokens, done = _collect(q)
        assert tokens == alone[r], f"row {r} (prompt of {len(prompts[r])} tokens)"
        assert (done.reason, done.completion_tokens) == ("length", 20)
    accepted = spec_engine.stats.accepted_tokens - before.accepted_tokens
    passes = (spec_engine.stats.drafted_tokens - before.drafted_tokens) // 2  # rows x verify passes
    assert 0 < accepted < 2 * passes
    assert passes < 16 * 19  # fewer than plain decoding's 19 steps a row
    queues = [_submit(spec_engine, p, 20, stop_token_ids=frozenset({alone[r][6]})) for r, p in enumerate(prompts)]
    for r, q in enumerate(queues):
        tokens, done = _collect(q)
        assert tokens == alone[r][:alone[r].index(alone[r][6]) + 1] and done.reason == "stop", f"row {r}"


def test_speculative_engine_prefix_cache_is_exact(model, spec_engine):
    """A second turn restored from the prefix cache (the head's buffer and the last token's hidden state with
    the GDN state and KV) gives plain greedy decoding's tokens, prefilling only its new tokens; so does a prompt
    sharing only a 64-token block boundary of a chunked prefill."""
    rng = np.random.default_rng(6)
    first = rng.integers(5, 4000, 150).tolist()
    reply, _ = _collect(_submit(spec_engine, first, 12, stop_token_ids=frozenset()))
    second = first + reply[:-1] + rng.integers(5, 4000, 30).tolist()
    tokens, done = _collect(_submit(spec_engine, second, 16, stop_token_ids=frozenset()))
    assert done.cached_tokens == len(first) + len(reply) - 1
    assert tokens == qwenjax.generate(model, [second], max_new_tokens=16, eos_token_ids=())[0]
    other = first[:128] + rng.integers(5, 4000, 10).tolist()
    tokens, done = _collect(_submit(spec_engine, other, 16, stop_token_ids=frozenset()))
    assert done.cached_tokens == 128
    assert tokens == qwenjax.generate(model, [other], max_new_tokens=16, eos_token_ids=())[0]


def test_speculative_engine_seeded_sampling_and_logprobs(model, engine, spec_engine):
    """A seeded sampled request draws the same tokens alone and beside others, greedy rows beside it keep
    greedy's tokens, and a greedy request's logprobs equal the plain engine's."""
    prompt = list(range(100, 140))
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9)
    alone, _ = _collect(_submit(spec_engine, prompt, 16, sampling=params, seed=7, stop_token_ids=frozenset()))
    greedy_prompts = [list(range(300 + i, 320 + i)) for i in range(5)]
    others = [_submit(spec_engine, p, 16, stop_token_ids=frozenset()) for p in greedy_prompts]
    again = _submit(spec_engine, prompt, 16, sampling=params, seed=7, stop_token_ids=frozenset())
    for p, q in zip(greedy_prompts, others):
        assert _collect(q)[0] == qwenjax.generate(model, [p], max_new_tokens=16, eos_token_ids=())[0]
    assert _collect(again)[0] == alone

    def with_logprobs(eng):
        q = _submit(eng, prompt, 12, logprobs=3, stop_token_ids=frozenset())
        tokens, entries = [], []
        while not isinstance(event := q.get(timeout=300), Finished):
            tokens += event.ids
            entries += event.logprobs
        return tokens, entries

    (tokens, spec), (plain_tokens, plain) = with_logprobs(spec_engine), with_logprobs(engine)
    assert tokens == plain_tokens and len(spec) == 12
    for (lp, top), (lp0, top0) in zip(spec, plain):
        assert lp == pytest.approx(lp0, abs=1e-4) and [i for i, _ in top] == [i for i, _ in top0]


# ---- the reply parser -------------------------------------------------------------------------------------------
XML_CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
            "</parameter>\n</function>\n</tool_call>")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]


def _streamed(parser: ReplyParser, text: str, step: int):
    deltas = []
    for i in range(0, len(text), step):
        deltas += parser.feed(text[i:i + step])
    return collect(deltas + parser.finish())


@pytest.mark.parametrize("step", [1, 2, 7, 10_000])
def test_reply_parser_thinking_answer_and_xml_tool_call(step):
    text = "Let me look.\n</think>\n\nI will check." + XML_CALL
    reasoning, content, calls = _streamed(ReplyParser(thinking=True, tools=TOOLS), text, step)
    assert (reasoning, content) == ("Let me look.", "I will check.")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris", "days": 3})]


@pytest.mark.parametrize("step", [1, 3, 10_000])
def test_reply_parser_tool_call_inside_thinking_and_json_form(step):
    text = ('I need the weather. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
            "</think>\n\n" + XML_CALL.replace("Paris", "Rome"))
    reasoning, content, calls = _streamed(ReplyParser(thinking=True, tools=TOOLS), text, step)
    assert reasoning == "I need the weather." and content == ""
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Oslo", "Rome"]


def test_reply_parser_keeps_what_is_not_a_call():
    # no thinking block opened by the prompt; an unclosed call at the end and a broken one stay text
    reasoning, content, calls = _streamed(ReplyParser(thinking=False, tools=TOOLS),
                                          "<think>hm</think>Answer <tool_call>oops</tool_call> end", 4)
    assert (reasoning, content, calls) == ("hm", "Answer <tool_call>oops</tool_call> end", [])
    # an XML parameter typed "string" stays a string; untyped values are read as JSON when they parse
    call = parse_tool_call("<function=f>\n<parameter=city>\n42\n</parameter>\n<parameter=n>\n[1, 2]\n</parameter>"
                           "\n</function>", [{"function": {"name": "f", "parameters": {"properties": {
                               "city": {"type": "string"}}}}}])
    assert json.loads(call.arguments) == {"city": "42", "n": [1, 2]}
    assert parse_tool_call("not a call") is None


def test_engine_under_a_mesh_equals_generate(model):
    """Rows over the data axis, heads over the tensor axis (8 fake CPU devices): the engine's programs (row
    windows, prefix-cache snapshots and restores) run sharded and give what one device gives."""
    sharded = qwenjax.from_pretrained(DEFAULT_MODEL_DIR, dtype="float32", mesh="data=2,fsdp=2,tensor=2")
    eng = Engine(sharded, max_batch=4, max_len=512, prefill_chunk=64).start(warmup=False)
    try:
        rng = np.random.default_rng(3)
        prompts = [rng.integers(5, 4000, n).tolist() for n in (3, 70, 150, 9)]
        queues = [_submit(eng, p, 10, stop_token_ids=frozenset()) for p in prompts]
        for p, q in zip(prompts, queues):
            assert _collect(q)[0] == qwenjax.generate(model, [p], max_new_tokens=10, eos_token_ids=())[0]
        again = prompts[2] + [17, 18]  # restored from the snapshot at its 128-token block boundary
        tokens, done = _collect(_submit(eng, again, 6, stop_token_ids=frozenset()))
        assert done.cached_tokens == 128
        assert tokens == qwenjax.generate(model, [again], max_new_tokens=6, eos_token_ids=())[0]
        assert len(eng._cache.layers[0].state.sharding.device_set) == 8
    finally:
        eng.stop()
