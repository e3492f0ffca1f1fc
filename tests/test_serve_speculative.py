"""Speculative sampling in the serving engine: rows verified together in batched passes, each with its own seed,
draw from plain sampling's distribution (the distribution test of test_speculative.py, on the engine's programs:
per-row keys, limits and stop ids, prefill drafts, rows joining and leaving between passes)."""

from __future__ import annotations

import queue

import pytest

import qwenjax
from qwenjax.inference.sampling import SamplingParams
from qwenjax.serve.engine import Engine, Finished, Request
from qwenjax.testing import add_mtp_tensors_, hf_mtp_head, make_hf_checkpoint
from test_speculative import three_token_chi_square

PROMPT, N, MAX_BATCH = [3, 1, 4, 1, 5], 4096, 64
SAMPLING = SamplingParams(temperature=1.0, top_k=6)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """8 tokens, a random MTP head far from the model: most drafts are rejected, some kept."""
    path = tmp_path_factory.mktemp("spec-engine")
    hf = make_hf_checkpoint(path, seed=5, vocab_size=8)
    add_mtp_tensors_(path, hf_mtp_head(hf.config, seed=6))
    return qwenjax.from_pretrained(path, dtype="float32")


@pytest.fixture(scope="module")
def p_value(model):
    return three_token_chi_square(model, PROMPT, SAMPLING)


def _serve_all(m, k: int, **engine_kw) -> tuple[list[list[int]], int, int]:
    """N requests of PROMPT, 3 tokens each, seeds 0 .. N-1, through an engine of 64 rows drafting k tokens: their
    tokens, and the drafts verified and accepted."""
    eng = Engine(m, max_batch=MAX_BATCH, max_len=64, prefill_chunk=64, max_queue=N, prefix_cache_bytes=0,
                 speculative=k, **engine_kw).start(warmup=False)
    try:
        queues = []
        for seed in range(N):
            q = queue.Queue()
            eng.submit(Request(prompt=PROMPT, on_event=q.put, max_tokens=3, sampling=SAMPLING, seed=seed,
                               stop_token_ids=frozenset()))
            queues.append(q)
        rows = []
        for q in queues:
            tokens = []
            while not isinstance(event := q.get(timeout=300), Finished):
                tokens += event.ids
            assert event.reason == "length"
            rows.append(tokens)
        return rows, eng.stats.drafted_tokens, eng.stats.accepted_tokens
    finally:
        eng.stop()


def test_engine_speculative_sampling_has_plain_sampling_distribution(model, p_value):
    """4,096 seeded requests (temperature 1, top-k 6) through 64 rows, k = 2 drafts from 5 of the 8 tokens (the
    head's q is 0 elsewhere): the first token comes from the prefill, the second and third from verify passes,
    each a kept draft (the second judged after the first) or a draw from the residual distribution of a
    rejection. Their joint counts must not reject the exact distribution at p = 0.001. (The statistic's power on
    this model, prompt and N: test_speculative.py's test_speculative_sampling_has_plain_sampling_distribution
    rejects drafts always kept.)"""
    rows, drafted, accepted = _serve_all(model, 2, draft_vocab=[0, 2, 3, 5, 7])
    assert 0 < accepted < drafted
    assert p_value(rows) > 1e-3
