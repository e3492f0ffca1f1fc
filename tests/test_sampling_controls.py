"""Logit controls with vLLM's definitions (logit_bias, min_tokens, repetition / frequency / presence penalties):
each against hand-computed values and a numpy transcription of vLLM's formulas; per row, and per verified position
of a speculative pass; `qwenjax.generate` with them against a step-by-step oracle on the bundled model; and the
stop-string check, linear in the text it holds back."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenjax
from qwenjax.demo import DEFAULT_MODEL_DIR
from qwenjax.inference.generate import StopStrings
from qwenjax.inference.sampling import (RowSampling, SamplingParams, TokenHistory, adjust_logits, argmax,
                                        sample_rows)
from qwenjax.inference.tokenizer import Tokenizer
from qwenjax.validate import InputError


def reference(logits, prompt, output, *, presence=0.0, frequency=0.0, repetition=1.0, logit_bias=(),
              min_tokens=0, stop_ids=()) -> np.ndarray:
    """One row's logits [V] as vLLM's sampler leaves them before temperature, transcribed from vllm/v1/sample:
    logit bias and min_tokens (logits processors), then `apply_penalties` (vllm/model_executor/layers/utils.py);
    in float64 from the fp32 settings, so its only roundings are those of the fp32 inputs."""
    f32 = lambda v: np.float64(np.float32(v))
    x = np.array(logits, np.float32).astype(np.float64)
    vocab = x.shape[0]
    for token, bias in logit_bias:
        x[token] += f32(bias)
    if len(output) < min_tokens:
        x[list(stop_ids)] = -np.inf
    counts = np.bincount(np.asarray(output, int), minlength=vocab).astype(np.float64)
    prompt_mask = np.zeros(vocab, bool)
    prompt_mask[list(prompt)] = True
    output_mask = counts > 0
    penalties = np.where(prompt_mask | output_mask, f32(repetition), 1.0)
    scaling = np.where(x > 0, np.float64(np.float32(1) / np.float32(penalties)), penalties)
    x = x * scaling
    x = x - f32(frequency) * counts
    x = x - f32(presence) * output_mask
    return x


# fp32 against the float64 reference: a few roundings of terms below 16 (XLA also contracts a product and a
# subtraction into one fused multiply-add, which rounds once where numpy's fp32 would round twice)
FP32_TERMS = 4 * 16 * np.finfo(np.float32).eps


def _adjust(logits, prompt, output, params: SamplingParams, min_tokens=0, stop_ids=()):
    """adjust_logits for one row [V] (as the engine's programs call it: a RowSampling and a TokenHistory)."""
    vocab = len(logits)
    rows = RowSampling.of([params], vocab_size=vocab, min_tokens=[min_tokens], stop_ids=[stop_ids])
    ids = jnp.asarray([prompt], jnp.int32)
    history = TokenHistory.of_prompts(ids, jnp.ones_like(ids), vocab)
    if output:
        history = history.add(jnp.asarray([output], jnp.int32))
    return np.asarray(adjust_logits(jnp.asarray([logits], jnp.float32), rows, history, len(output)))[0]


LOGITS = [2.0, -1.0, 0.5, 3.0, -0.5, 0.0]
PROMPT, OUTPUT = [0], [2, 2, 4]


@pytest.mark.parametrize("params, want", [
    # token 0 is in the prompt, 2 twice and 4 once in the output
    (SamplingParams(repetition_penalty=2.0), [1.0, -1.0, 0.25, 3.0, -1.0, 0.0]),
    (SamplingParams(repetition_penalty=0.5), [4.0, -1.0, 1.0, 3.0, -0.25, 0.0]),
    (SamplingParams(frequency_penalty=0.5), [2.0, -1.0, -0.5, 3.0, -1.0, 0.0]),
    (SamplingParams(frequency_penalty=-1.0), [2.0, -1.0, 2.5, 3.0, 0.5, 0.0]),
    (SamplingParams(presence_penalty=0.25), [2.0, -1.0, 0.25, 3.0, -0.75, 0.0]),
    (SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
     [1.0, -1.0, -1.0, 3.0, -1.75, 0.0]),
    (SamplingParams(logit_bias=((1, 5.0), (3, -100.0))), [2.0, 4.0, 0.5, -97.0, -0.5, 0.0]),
    # the bias comes first: token 0's (2 - 1) / 2; penalizing first would give 2 / 2 - 1 = 0
    (SamplingParams(logit_bias=((0, -1.0),), repetition_penalty=2.0), [0.5, -1.0, 0.25, 3.0, -1.0, 0.0]),
])
def test_each_control_against_hand_computed_values(params, want):
    assert _adjust(LOGITS, PROMPT, OUTPUT, params).tolist() == want
    assert reference(LOGITS, PROMPT, OUTPUT, presence=params.presence_penalty, frequency=params.frequency_penalty,
                     repetition=params.repetition_penalty, logit_bias=params.logit_bias).tolist() == want


def test_min_tokens_masks_the_stop_ids_until_then():
    """Stop ids 3 and 5 are -inf while fewer than min_tokens = 4 tokens were generated (3 so far), and untouched
    from the 4th on; a row without stop ids masks nothing."""
    masked = _adjust(LOGITS, PROMPT, OUTPUT, SamplingParams(), min_tokens=4, stop_ids={3, 5})
    assert masked.tolist() == [2.0, -1.0, 0.5, -np.inf, -0.5, -np.inf]
    assert _adjust(LOGITS, PROMPT, OUTPUT, SamplingParams(), min_tokens=3, stop_ids={3, 5}).tolist() == LOGITS
    assert RowSampling.of([SamplingParams()], min_tokens=[4], stop_ids=[()]).used == frozenset()


def test_rows_of_a_batch_each_get_their_own_controls():
    """5 rows of 300 random logits, each its own prompt, output and controls (one row none): each row equals the
    reference to fp32 rounding, and a row without controls keeps its logits bit for bit."""
    rng = np.random.default_rng(0)
    vocab = 300
    logits = rng.normal(0, 3, (5, vocab)).astype(np.float32)
    prompts = [rng.integers(0, vocab, n).tolist() for n in (40, 1, 90, 7, 20)]
    outputs = [rng.integers(0, 40, n).tolist() for n in (30, 0, 12, 5, 9)]  # repeats among 40 tokens
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.7, presence_penalty=-0.4),
              SamplingParams(logit_bias=((5, 7.5), (299, -30.0))),
              SamplingParams(),
              SamplingParams(repetition_penalty=0.8, logit_bias=tuple((t, 1.25) for t in range(0, 60, 3))),
              SamplingParams(frequency_penalty=-2.0, presence_penalty=2.0)]
    stops, min_tokens = [{1, 2}, {7}, set(), {3}, {9, 11}], [31, 0, 0, 6, 9]
    rows = RowSampling.of(params, vocab_size=vocab, min_tokens=min_tokens, stop_ids=stops)
    assert rows.used == {"penalties", "logit_bias", "min_tokens"}
    width = max(map(len, prompts))
    ids = np.zeros((5, width), np.int32)
    mask = np.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, :len(p)], mask[r, :len(p)] = p, 1
    history = TokenHistory.of_prompts(jnp.asarray(ids), jnp.asarray(mask), vocab)
    for r, out in enumerate(outputs):
        for t in out:
            history = history.add(jnp.asarray([t]), rows=jnp.asarray([r]))
    produced = jnp.asarray([len(o) for o in outputs])
    got = np.asarray(jax.jit(adjust_logits)(jnp.asarray(logits), rows, history, produced))
    for r in range(5):
        p = params[r]
        want = reference(logits[r], prompts[r], outputs[r], presence=p.presence_penalty,
                         frequency=p.frequency_penalty, repetition=p.repetition_penalty, logit_bias=p.logit_bias,
                         min_tokens=min_tokens[r], stop_ids=stops[r])
        np.testing.assert_allclose(got[r], want, rtol=0, atol=FP32_TERMS, err_msg=f"row {r}")
        assert (np.isinf(got[r]) == np.isinf(want)).all()
    np.testing.assert_array_equal(got[2], logits[2])


def test_verified_positions_count_the_drafts_before_them():
    """A verify pass's J = 4 positions at once: position j's logits equal, bit for bit, those of one position
    whose history holds the row's output followed by drafts[:j] (what plain decoding would score there), and the
    reference to fp32 rounding (drafts repeating each other and the prompt; min_tokens reached at position 2)."""
    rng = np.random.default_rng(1)
    vocab, j = 50, 4
    logits = rng.normal(0, 2, (2, j, vocab)).astype(np.float32)
    prompts, outputs = [[3, 4, 5], [9]], [[7, 7, 8], []]
    drafts = np.array([[7, 3, 7], [9, 9, 2]], np.int32)
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=0.3, presence_penalty=0.2),
              SamplingParams(repetition_penalty=0.9, frequency_penalty=-0.6, logit_bias=((9, 0.75),))]
    stops, min_tokens = [{2, 7}, {2}], [5, 2]
    rows = RowSampling.of(params, vocab_size=vocab, min_tokens=min_tokens, stop_ids=stops)
    ids = np.array([[3, 4, 5], [9, 0, 0]], np.int32)
    history = TokenHistory.of_prompts(jnp.asarray(ids), jnp.asarray(ids > 0), vocab)
    history = history.add(jnp.asarray([[7, 7, 8]]), rows=jnp.asarray([0]))
    produced = jnp.asarray([3, 0])
    got = np.asarray(jax.jit(adjust_logits)(jnp.asarray(logits), rows, history, produced, jnp.asarray(drafts)))
    one_position = jax.jit(adjust_logits)
    for pos in range(j):
        plain = np.asarray(one_position(jnp.asarray(logits[:, pos]), rows, history, produced + pos))
        np.testing.assert_array_equal(got[:, pos], plain, err_msg=f"position {pos}")
        history = history.add(jnp.asarray(drafts[:, min(pos, j - 2)]), jnp.asarray([pos < j - 1] * 2))
        for r in range(2):
            p = params[r]
            want = reference(logits[r, pos], prompts[r], outputs[r] + drafts[r, :pos].tolist(),
                             presence=p.presence_penalty, frequency=p.frequency_penalty,
                             repetition=p.repetition_penalty, logit_bias=p.logit_bias, min_tokens=min_tokens[r],
                             stop_ids=stops[r])
            np.testing.assert_allclose(got[r, pos], want, rtol=0, atol=FP32_TERMS, err_msg=f"row {r}, {pos}")


def test_unused_controls_compile_away():
    """A batch without controls samples with exactly the program it had before they existed (greedy: the
    argmax); the seeded sampler's program likewise gains nothing."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 64)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 4)
    greedy = RowSampling.of([SamplingParams()] * 4)
    assert str(jax.make_jaxpr(lambda v: sample_rows(v, keys, greedy))(x)) == str(jax.make_jaxpr(argmax)(x))
    sampled = RowSampling.of([SamplingParams(temperature=0.7, top_k=5)] * 4)
    text = str(jax.make_jaxpr(lambda v: sample_rows(v, keys, sampled, None, 3))(x))
    assert "scatter" not in text


def test_settings_are_checked_naming_the_field():
    cases = [(dict(presence_penalty=2.5), "presence_penalty=2.5: must be in"),
             (dict(frequency_penalty=-2.01), "frequency_penalty=-2.01: must be in"),
             (dict(repetition_penalty=0.0), "repetition_penalty=0.0: must be > 0"),
             (dict(repetition_penalty=float("nan")), "repetition_penalty"),
             (dict(logit_bias=[(5, 101.0)]), r"logit_bias\[0\]: the bias 101.0 of token 5"),
             (dict(logit_bias=[(1, 1.0), (5, 1.0), (1, 2.0)]), r"logit_bias\[2\]: token 1 is biased twice"),
             (dict(logit_bias=[(-1, 1.0)]), r"logit_bias\[0\]: token id -1"),
             (dict(logit_bias=[(1.5, 1.0)]), "logit_bias"),
             (dict(logit_bias=[(t, 1.0) for t in range(301)]), "301 entries: at most 300")]
    for kw, match in cases:
        with pytest.raises(InputError, match=match):
            SamplingParams(**kw)
    assert SamplingParams(logit_bias=[[5, 1]]).logit_bias == ((5, 1.0),)  # JSON lists become pairs
    with pytest.raises(InputError, match=r"logit_bias\[1\]: token id 4096 is not a token id \(vocab_size=4096\)"):
        SamplingParams(logit_bias=[(1, 1.0), (4096, 1.0)]).check_vocab(4096)


def test_any_top_k_is_safe_and_past_the_vocabulary_is_off():
    rows = RowSampling.of([SamplingParams(temperature=1.0, top_k=k) for k in (2 ** 31, 2 ** 80, 7)], vocab_size=100)
    assert rows.top_k.tolist() == [0, 0, 7] and rows.top_k.dtype == np.int32
    assert "top_k" not in RowSampling.of([SamplingParams(temperature=1.0, top_k=100)], vocab_size=100).used


# ---- generate on the bundled model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return qwenjax.from_pretrained(DEFAULT_MODEL_DIR, dtype="float32")


CONTROLS = dict(repetition_penalty=1.4, frequency_penalty=0.6, presence_penalty=0.3, logit_bias=[(16, 3.0)])


def test_generate_with_controls_equals_a_step_by_step_oracle(model):
    """Greedy `generate` with every penalty and a logit bias: each token is the argmax of the numpy reference
    applied to a full forward pass over the prompt and the tokens so far; the controls change the output."""
    rng = np.random.default_rng(3)
    prompt = rng.integers(5, 300, 30).tolist()  # a small range: the prompt repeats tokens the model may write
    got = qwenjax.generate(model, [prompt], max_new_tokens=12, eos_token_ids=(), **CONTROLS)[0]
    forward = jax.jit(lambda ids: model.module(ids))
    out: list[int] = []
    for _ in range(12):  # one shape: causal attention, the padding after the last token changes nothing before it
        seq = prompt + out
        logits = np.asarray(forward(jnp.asarray([seq + [0] * (48 - len(seq))])))[0, len(seq) - 1]
        out.append(int(np.argmax(reference(logits, prompt, out, presence=0.3, frequency=0.6, repetition=1.4,
                                           logit_bias=[(16, 3.0)]))))
    assert got == out
    assert got != qwenjax.generate(model, [prompt], max_new_tokens=12, eos_token_ids=())[0]


def test_speculative_greedy_with_controls_equals_plain_greedy(model):
    """The bundled model's MTP head drafts 2 tokens a pass: with penalties, a bias, min_tokens, in a batch with a
    row without them, the output is plain greedy decoding's with the same controls."""
    tok = Tokenizer(DEFAULT_MODEL_DIR)
    prompts = [tok.encode("Return the sum of"), tok.encode("os.path.join"), list(range(100, 140))]
    for kw in (CONTROLS, dict(min_tokens=24), dict(repetition_penalty=0.7, logit_bias=[(290, -5.0)])):
        plain = qwenjax.generate(model, prompts, max_new_tokens=28, **kw)
        assert qwenjax.generate(model, prompts, max_new_tokens=28, num_speculative_tokens=2, **kw) == plain, kw


def test_min_tokens_ignore_eos_and_a_forcing_bias(model):
    """"Return an iterator" ends at eos before 25 tokens: with min_tokens = 25 no eos comes before token 26, and
    the tokens before its eos are unchanged; with ignore_eos it runs to its length; a +100 bias writes its token
    only."""
    tok = Tokenizer(DEFAULT_MODEL_DIR)
    eos = {0, 2}
    prompt = tok.encode("Return an iterator")
    free = qwenjax.generate(model, [prompt], max_new_tokens=40)[0]
    assert len(free) < 25 and free[-1] in eos
    held = qwenjax.generate(model, [prompt], max_new_tokens=40, min_tokens=25)[0]
    assert held[:len(free) - 1] == free[:-1] and not eos & set(held[:25]) and len(held) > 25
    assert len(qwenjax.generate(model, [prompt], max_new_tokens=40, ignore_eos=True)[0]) == 40
    assert qwenjax.generate(model, [prompt], max_new_tokens=6, logit_bias=[(77, 100.0)]) == [[77] * 6]
    assert qwenjax.generate(model, [prompt], max_new_tokens=6, temperature=1.0, seed=4,
                            logit_bias=[(77, 100.0)]) == [[77] * 6]
    with pytest.raises(InputError, match="min_tokens"):
        qwenjax.generate(model, [prompt], max_new_tokens=4, min_tokens=5)
    with pytest.raises(InputError, match=r"logit_bias\[0\]: token id 4096"):
        qwenjax.generate(model, [prompt], max_new_tokens=4, logit_bias=[(4096, 1.0)])


# ---- stop strings ------------------------------------------------------------------------------------------------
def test_stop_strings_match_across_tokens_and_respect_min_tokens():
    tok = Tokenizer(DEFAULT_MODEL_DIR)
    text = "The result is the same as for the current working directory. The result is final."
    ids = tok.encode(text)
    stop = "the current working directory"

    def first_hit(stops, min_tokens=0):
        checker = StopStrings(tok, stops)
        return next((i + 1 for i, t in enumerate(ids) if checker.add(t, check=i + 1 > min_tokens)), None)

    # the earliest token count whose text holds the stop string, by decoding every prefix
    want = next(n for n in range(1, len(ids) + 1) if stop in tok.decode(ids[:n], skip_special_tokens=False))
    assert first_hit([stop]) == want and want > 3  # spans several tokens
    assert first_hit(["The result"]) == next(n for n in range(1, len(ids) + 1)
                                             if "The result" in tok.decode(ids[:n]))
    # vLLM: a match must end after the first min_tokens tokens; the next occurrence then stops it
    assert first_hit(["The result"], min_tokens=want) == len(tok.encode(text[:text.rindex("The result")] +
                                                                         "The result"))
    assert first_hit(["not in the text"]) is None


def test_a_long_stop_string_costs_each_token_time_linear_in_it():
    """A 100,000-character stop string over 3,000 tokens: each token holds back 100k characters and searches
    only where a new match can end (measured 0.15 ms a token; a check quadratic in the stop string's length would
    take hours), and it is still found when the text ends with it."""
    tok = Tokenizer(DEFAULT_MODEL_DIR)
    piece = tok.encode(" the module")
    long_stop = ("x" * 99_990) + "the module"
    checker = StopStrings(tok, [long_stop, "never"])
    start = time.perf_counter()
    hits = [checker.add(t) for t in piece * 1500]
    elapsed = time.perf_counter() - start
    assert not any(hits) and elapsed < 3.0, f"{elapsed:.2f} s"
    text = "x" * 99_990 + "the module"
    checker = StopStrings(tok, [long_stop])
    ids = tok.encode("abc " + text)
    assert [checker.add(t) for t in ids].index(True) == len(ids) - 1
