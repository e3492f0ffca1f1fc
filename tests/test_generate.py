"""Generation: greedy parity with transformers' `generate`, cache consistency, sampling, stopping, errors."""

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import qwenjax
from qwenjax.inference.generate import generate
from qwenjax.inference.sampling import SamplingParams, filter_logits, sample
from qwenjax.model.cache import AttentionCache, init_cache

torch = pytest.importorskip("torch")
from qwenjax.testing import make_hf_checkpoint  # noqa: E402

CASES = {  # GVA ratio (value heads / key heads) 1, 2, 3; prompts crossing the 64-token chunk
    "gva1": dict(linear_num_key_heads=2, linear_num_value_heads=2),
    "gva2-tied": dict(tie_word_embeddings=True, multimodal=True),
    "gva3-8layers": dict(linear_num_key_heads=2, linear_num_value_heads=6, num_hidden_layers=8),
    "moe-e8-top2": dict(num_experts=8),  # Qwen3.5-MoE: routed + shared experts in every layer
}
PROMPT_LENGTHS = (70, 5, 131, 1)


@pytest.fixture(scope="module", params=sorted(CASES))
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_checkpoint(path, seed=7 + len(request.param), **CASES[request.param])
    return path, hf


@pytest.fixture(scope="module")
def one_ckpt(tmp_path_factory):
    """One checkpoint for the tests whose subject is not the architecture (stopping, sampling, errors)."""
    path = tmp_path_factory.mktemp("gva2-one")
    make_hf_checkpoint(path, seed=11)
    return path


def _prompts(vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENGTHS]


def test_greedy_equals_transformers_generate(ckpt):
    path, hf = ckpt
    m = qwenjax.from_pretrained(path, dtype="float32")
    prompts = _prompts(m.config.vocab_size)
    ours = generate(m, prompts, max_new_tokens=16)  # one batch, rows of different lengths
    for r, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert ours[r] == ref[0, len(p):].tolist(), f"row {r} (prompt length {len(p)}) differs"


def test_prefill_and_decode_equal_full_forward(ckpt):
    path, _ = ckpt
    m = qwenjax.from_pretrained(path, dtype="float32")
    mod, cfg = m.module, m.config
    b, t = 3, 100
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (b, t))
    full = np.asarray(jax.jit(mod)(jnp.asarray(ids)))  # jitted: eager, one op at a time, took most of a minute
    lens = np.array([70, 3, 64])
    mask = (np.arange(72)[None] < lens[:, None]).astype(np.int32)
    cache = init_cache(cfg, b, 128, jnp.float32)
    logits, cache = jax.jit(lambda i, c, mk: mod.extend(i, c, attention_mask=mk, fresh=True))(
        jnp.asarray(ids[:, :72]), cache, jnp.asarray(mask))
    errs = [np.abs(np.asarray(logits)[r] - full[r, lens[r] - 1]).max() for r in range(b)]
    step = jax.jit(lambda i, c: mod.extend(i, c), donate_argnums=1)
    for s in range(20):
        logits, cache = step(jnp.asarray(ids[np.arange(b), lens + s][:, None]), cache)
        errs += [np.abs(np.asarray(logits)[r] - full[r, lens[r] + s]).max() for r in range(b)]
    assert np.asarray(cache.lengths).tolist() == (lens + 20).tolist()
    assert max(errs) < 1e-4
    # a multi-token continuation of a non-empty cache (the next chat turn) matches too
    cache = init_cache(cfg, b, 128, jnp.float32)
    _, cache = jax.jit(lambda i, c: mod.extend(i, c, fresh=True))(jnp.asarray(ids[:, :40]), cache)
    logits, cache = jax.jit(lambda i, c: mod.extend(i, c))(jnp.asarray(ids[:, 40:99]), cache)
    assert np.abs(np.asarray(logits) - full[:, 98]).max() < 1e-4


def test_attention_buffers_write_only_the_new_slots(one_ckpt):
    """A 16-bit float attention buffer is held as its bits: written at given slots (past the end dropped), read
    back exactly; and a bf16 decode step or verify pass never writes into an fp32 copy of a buffer (XLA:CPU scatters
    into a bf16 buffer by converting all of it, which made each step's cost grow with the cache)."""
    c = AttentionCache.zeros((2, 2, 8, 4), jnp.bfloat16)  # [rows, KV heads, slots, head_dim]
    assert c.k.dtype == jnp.uint16 and c.dtype == jnp.bfloat16
    new = jax.random.normal(jax.random.key(0), (2, 3, 2, 4))  # [rows, tokens, KV heads, head_dim]
    k, v = c.write(jnp.array([[0, 1, 2], [6, 7, 8]]), new, -new).read()  # row 1's third slot is past the end
    assert k.dtype == v.dtype == jnp.bfloat16
    want = np.zeros((2, 2, 8, 4), np.float32)
    rounded = np.asarray(new.astype(jnp.bfloat16), np.float32).swapaxes(1, 2)
    want[0, :, :3], want[1, :, 6:] = rounded[0], rounded[1, :, :2]
    np.testing.assert_array_equal(np.asarray(k, np.float32), want)
    np.testing.assert_array_equal(np.asarray(v, np.float32), -want)
    assert AttentionCache.zeros((1, 1, 2, 4), jnp.float32).k.dtype == jnp.float32

    from qwenjax.inference import generate as gen
    m = qwenjax.from_pretrained(one_ckpt, dtype="bfloat16")
    cfg, params = m.config, jax.tree.leaves(m.params)
    model, _ = gen.flat_params_model(m)
    cache = gen.new_cache(m, 2, 512, mtp=True)
    buffer = f"f32[2,{cfg.num_key_value_heads},512,{cfg.head_dim}]"
    step = gen._compiled(m, "step", SamplingParams())
    hlo = step.lower(params, cache, jnp.zeros((2,), jnp.int32), jax.random.key(0), np.int32(1)).compile().as_text()
    assert re.search(r"%\S+ = " + re.escape(buffer.replace("f32", "u16")) + r"\S* [\w-]+\(", hlo)  # the regex sees it
    assert not _writes_in_f32(hlo, buffer)
    verify = jax.jit(lambda leaves, c: model(leaves).verify(jnp.zeros((2, 3), jnp.int32), c))
    assert buffer not in verify.lower(params, cache).compile().as_text()


def _writes_in_f32(hlo: str, buffer: str) -> list[str]:
    """The instructions of `hlo` that write into an fp32 copy of the buffer (a scatter or dynamic-update-slice of
    type `buffer`). generate's step compiles batch-invariant (`program_options`: no XLA:CPU library fusions), and
    there XLA's attention dots read the bf16 buffer converted to fp32 (a read, as the dot's own; the writes stay
    16-bit scatters), so the step is checked for the writes only."""
    found = re.findall(r"%(\S+) = " + re.escape(buffer) + r"\S* ([\w-]+)\(", hlo)
    return [f"{name} {op}" for name, op in found if any(w in name + op for w in ("scatter", "dynamic-update-slice"))]


def test_eos_stops_only_its_row(one_ckpt):
    m = qwenjax.from_pretrained(one_ckpt, dtype="float32")
    prompts = _prompts(m.config.vocab_size, seed=2)[:2]
    free = generate(m, prompts, max_new_tokens=10)
    eos = free[0][3]
    stopped = generate(m, prompts, max_new_tokens=10, eos_token_ids=[eos])
    assert stopped[0] == free[0][:free[0].index(eos) + 1]
    assert stopped[1] == (free[1][:free[1].index(eos) + 1] if eos in free[1] else free[1])
    m = m.replace(generation_config={"eos_token_id": [999, eos]})  # the default: generation_config.json's list
    assert generate(m, prompts, max_new_tokens=10) == stopped


def test_sampling_is_seeded_and_reproducible(one_ckpt):
    m = qwenjax.from_pretrained(one_ckpt, dtype="float32")
    prompts = _prompts(m.config.vocab_size)[:2]
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, min_p=0.01)
    a = generate(m, prompts, seed=5, **kw)
    assert a == generate(m, prompts, seed=5, **kw)
    assert a != generate(m, prompts, seed=6, **kw)
    assert generate(m, prompts, max_new_tokens=8, temperature=1.0, top_k=1, seed=3) == \
        generate(m, prompts, max_new_tokens=8)


def test_bad_requests_fail_clearly(one_ckpt):
    m = qwenjax.from_pretrained(one_ckpt, dtype="float32")
    with pytest.raises(ValueError, match=r"prompt row 1 has 131 tokens.*needs 141 cache slots.*holds 128"):
        generate(m, [[1, 2], [3] * 131], max_new_tokens=10, max_cache_len=128)
    with pytest.raises(ValueError, match="prompt row 1 is empty"):
        generate(m, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt row 0 is empty"):
        generate(m, np.zeros((1, 3), int), attention_mask=np.zeros((1, 3), int))
    with pytest.raises(ValueError, match=r"input_ids\[0, 2\] = 999 is outside the vocabulary"):
        generate(m, [[1, 2, 999]])
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"top_p=.*must be in \(0, 1\]"):
            generate(m, [[1, 2]], top_p=bad, temperature=1.0)


def test_filters_keep_what_they_should():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda **kw: np.isfinite(np.asarray(filter_logits(logits, SamplingParams(temperature=1.0, **kw))))[0]
    assert kept(top_k=2).tolist() == [True, True, False, False, False]
    assert kept(top_p=0.7).tolist() == [True, True, False, False, False]    # 0.5 + 0.2 reaches 0.7
    assert kept(top_p=0.71).tolist() == [True, True, True, False, False]
    assert kept(top_p=0.1).tolist() == [True, False, False, False, False]   # the top token always stays
    assert kept(min_p=0.25).tolist() == [True, True, True, False, False]    # p >= 0.25 * 0.5
    # sampled frequencies follow the filtered, renormalised distribution
    draws = sample(jnp.broadcast_to(logits, (20000, 5)), jax.random.key(0), SamplingParams(1.0, top_k=3))
    freq = np.bincount(np.asarray(draws), minlength=5) / 20000
    np.testing.assert_allclose(freq, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=0.015)


def test_sharded_generation_equals_single_device(one_ckpt):
    path = one_ckpt
    prompts = _prompts(256)
    single = generate(qwenjax.from_pretrained(path, dtype="float32"), prompts, max_new_tokens=8)
    sharded = generate(qwenjax.from_pretrained(path, dtype="float32", mesh="data=2,fsdp=2,tensor=2"), prompts,
                       max_new_tokens=8)
    assert sharded == single


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_argmax_is_jnp_argmax_first_among_ties(dtype):
    from qwenjax.inference.sampling import argmax

    x = jax.random.normal(jax.random.key(0), (64, 1000)).astype(dtype)
    x = x.at[:, 7].set(x.max()).at[:, 900].set(x.max())  # ties: the first one wins
    x = x.at[3].set(-jnp.inf).at[4].set(0.0)  # rows all equal
    assert (np.asarray(argmax(x)) == np.asarray(jnp.argmax(x, axis=-1))).all()
    assert int(argmax(jnp.full((1, 5), jnp.nan))[0]) < 5  # a NaN row still yields a token id
