"""Batch invariance in the default dtype (bf16): a request's numbers do not depend on the rows beside it.

Two things make it on the CPU: the C++ matmul kernel for every product (one summation order whatever the number of
rows), and programs compiled with `qwenjax.ops.kernels.compiler_options` (no YNNPACK library fusions, whose sums
depend on the shape).
- Every product x · Wᵀ: a row's outputs are the same bits alone, among 2-16 decode rows, or among the padded
  tokens of a prefill.
- The bundled model: a prompt's hidden states and cache after a prefill are the same alone and beside 1-15 other
  prompts, padded to 16, 64 or 256 tokens; a decode step's logits and cache are the same alone (over the whole
  cache, as `qwenjax.generate` steps) and beside 1-15 other rows over the engine's 64- and 256-slot horizons.
- The serving engine: 16 concurrent requests (greedy and seeded sampling; prompts of 1-300 tokens, some sharing a
  prefix, one prefilled alone) each get the tokens `qwenjax.generate` gives them alone.
"""

from __future__ import annotations

import functools
import queue

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenjax
from pallas_kernels.matmul import cpu
from qwenjax.demo import DEFAULT_MODEL_DIR
from qwenjax.model import cache as cache_lib
from qwenjax.ops.kernels import compiler_options, program_options
from qwenjax.ops.matmul import matmul_wt

pytestmark = pytest.mark.skipif(cpu.compiler() is None,
                                reason="no C++ compiler ($CXX, g++, c++, clang++): products take XLA's dot")

# (out, in) of the bundled model's products (q, k/v, o, gate/up, down, GDN qkv / z / a, b, LM head) and a shape
# with a partial last block and a partial tile
SHAPES = [(512, 256), (128, 256), (256, 256), (768, 256), (256, 768), (384, 256), (8, 256), (4096, 256), (37, 1001)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_products_do_not_depend_on_the_rows_beside_them(dtype, out_features, in_features):
    """Row r of a product of M rows equals the product of row r alone, for M = 1 .. 16 (decode batches) and the
    token counts of prefills (16 · 4^i tokens, several prompts, padding)."""
    kx, kw = jax.random.split(jax.random.key(out_features + in_features))
    x = jax.random.normal(kx, (1024, in_features), dtype)
    w = jax.random.normal(kw, (out_features, in_features), dtype)
    product = jax.jit(functools.partial(matmul_wt, implementation="kernel"))
    alone = np.concatenate([np.asarray(product(x[r:r + 1], w)) for r in range(17)])
    for m in [*range(2, 18), 64, 256, 1024]:
        np.testing.assert_array_equal(np.asarray(product(x[:m], w))[:17], alone[:m], err_msg=f"{m} rows")
    # a prefill's [rows, tokens, in]: 4 prompts of 64 tokens, row 0 holding rows 0 .. 16 of x
    batch = np.asarray(product(x[:256].reshape(4, 64, in_features), w))
    np.testing.assert_array_equal(batch[0, :17], alone)


def test_compiler_options_make_row_sums_independent_of_the_rows():
    """The options turn off XLA:CPU's library fusions: a sum over 256 columns (an RMSNorm of this model) gives row 0
    the same bits for 1 to 4096 rows, and a max over bf16 values rounded from a product is the max of those
    values (the library fusion took the fp32 ones)."""
    options = compiler_options("cpu")
    assert options == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert compiler_options("tpu") == compiler_options("gpu") == {}
    x = jax.random.normal(jax.random.key(0), (4096, 256), jnp.float32)
    row_sums = jax.jit(lambda x: jnp.sum(x * x, axis=-1), compiler_options=options)
    alone = np.asarray(row_sums(x[:1]))
    for rows in (2, 16, 64, 4096):
        np.testing.assert_array_equal(np.asarray(row_sums(x[:rows]))[:1], alone, err_msg=f"{rows} rows")
    w = jax.random.normal(jax.random.key(1), (4096, 256), jnp.bfloat16)
    logits = lambda h: cpu.matmul_kernel(h, w).astype(jnp.bfloat16)
    shifted = lambda l: l.astype(jnp.float32) - l.astype(jnp.float32).max(axis=-1, keepdims=True)
    h = x[:1].astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda h: shifted(logits(h)), compiler_options=options)(h)),
                                  np.asarray(shifted(jax.jit(logits)(h))))


@pytest.fixture(scope="module")
def model():
    return qwenjax.from_pretrained(DEFAULT_MODEL_DIR, dtype="bfloat16")


def test_programs_compile_without_library_fusions_unless_products_are_xla(model):
    """`program_options` (what generate's and the engine's programs compile with): the CPU options for a model
    whose products are the kernel's (the default); none with Kernels(cpu_matvec="xla"), invariance off."""
    assert model.kernels.cpu_matvec == "kernel"
    assert program_options(model) == compiler_options("cpu")
    assert program_options(model.replace(kernels=qwenjax.Kernels(cpu_matvec="xla"))) == {}


def test_prefill_does_not_depend_on_the_batch_or_padding(model):
    """A prompt prefilled alone, padded to 64 tokens (`generate`'s prefill), against the engine's calls: padded to
    16 or 256 tokens, and as row 0 of 4 or 16 prompts: the same hidden states for its tokens and the same cache
    row (GDN states, conv windows, keys and values), bit for bit."""
    mod, cfg = model.module, model.config

    @functools.partial(jax.jit, compiler_options=compiler_options("cpu"))
    def prefill(ids, mask):
        cache = cache_lib.init_cache(cfg, ids.shape[0], 256, model.dtype)
        _, cache, hidden, _ = mod.extend(ids, cache, attention_mask=mask, fresh=True, return_hidden=True)
        return hidden, cache

    rng = np.random.default_rng(1)
    for n in (5, 12, 40):
        prompts = [rng.integers(5, 4000, n)] + [rng.integers(5, 4000, rng.integers(1, 17)) for _ in range(15)]

        def run(rows, width):
            ids, mask = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
            for r, p in enumerate(prompts[:rows]):
                ids[r, :len(p)], mask[r, :len(p)] = p, 1
            hidden, cache = prefill(ids, mask)
            # the row's state: GDN conv windows and states, and its keys and values up to its length (the slots
            # after it hold the padding's, which nothing reads)
            held = []
            for c in cache.layers:
                held += ([x[0, :, :n] for x in c.read()] if isinstance(c, cache_lib.AttentionCache)
                         else [c.conv[0], c.state[0]])
            return np.asarray(hidden[0, :n], np.float32), [np.asarray(x, np.float32) for x in held]

        want_hidden, want_cache = run(1, 64)
        for rows, width in [(1, 16), (1, 256), (4, 64), (16, 64), (16, 16)]:
            if width >= max(len(p) for p in prompts[:rows]):
                hidden, cache = run(rows, width)
                np.testing.assert_array_equal(hidden, want_hidden, err_msg=f"{n} tokens, {rows} rows of {width}")
                for got, want in zip(cache, want_cache):
                    np.testing.assert_array_equal(got, want, err_msg=f"cache, {n} tokens, {rows} rows of {width}")


def test_decode_step_does_not_depend_on_the_batch_or_horizon(model):
    """One decode step of a row after its prefill: alone over its whole 256-slot cache (`generate`'s step), and as
    row 0 of 2, 4 and 16 rows (the others holding other prompts and tokens) over 64 and 256 slots (the engine's
    horizons, `cache.window`): the same logits and the same cache row, bit for bit."""
    mod, cfg = model.module, model.config

    @functools.partial(jax.jit, compiler_options=compiler_options("cpu"))
    def prefill(ids, mask):
        cache = cache_lib.init_cache(cfg, ids.shape[0], 256, model.dtype)
        return mod.extend(ids, cache, attention_mask=mask, fresh=True)

    @functools.partial(jax.jit, static_argnames=("rows", "horizon"), compiler_options=compiler_options("cpu"))
    def step(tokens, cache, rows, horizon):
        sub = cache_lib.window(cache, rows, horizon)
        logits, sub = mod.extend(tokens[:, None], sub)
        return logits, cache_lib.put_window(cache, sub)

    def row_of(cache, r):
        return [np.asarray(x[r]) for x in jax.tree.leaves(cache)]

    rng = np.random.default_rng(0)
    lengths = [12, 40, 5, 33, 20, 60, 7, 50, 1, 30, 44, 9, 18, 27, 55, 3]
    ids = np.zeros((16, 64), np.int32)
    for r, n in enumerate(lengths):
        ids[r, :n] = rng.integers(5, 4000, n)
    mask = (np.arange(64)[None] < np.array(lengths)[:, None]).astype(np.int32)
    # each row's cache from its own one-row prefill, so that only the step is compared
    caches = [prefill(ids[r:r + 1], mask[r:r + 1]) for r in range(16)]
    tokens = jnp.asarray([int(jnp.argmax(logits[0])) for logits, _ in caches], jnp.int32)
    stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[c for _, c in caches])
    want_logits, want_cache = step(tokens[:1], caches[0][1], rows=1, horizon=256)
    for rows in (1, 2, 4, 16):
        for horizon in (64, 256):
            logits, cache = step(tokens[:rows], stacked, rows=rows, horizon=horizon)
            np.testing.assert_array_equal(np.asarray(logits[0], np.float32), np.asarray(want_logits[0], np.float32),
                                          err_msg=f"{rows} rows, {horizon} slots")
            for got, want in zip(row_of(cache, 0), row_of(want_cache, 0)):
                np.testing.assert_array_equal(got, want, err_msg=f"cache, {rows} rows, {horizon} slots")


def _served_and_alone(model) -> list[tuple[int, list[int], list[int]]]:
    """16 concurrent requests through an engine, 12 greedy and 4 sampled with seeds; each as (prompt length, the
    engine's tokens, `generate`'s tokens for it alone)."""
    from qwenjax.inference.sampling import SamplingParams
    from qwenjax.inference.tokenizer import Tokenizer
    from qwenjax.serve.engine import Engine, Finished, Request

    tok = Tokenizer(DEFAULT_MODEL_DIR)
    rng = np.random.default_rng(3)
    shared = tok.encode("The json module provides functions to encode and decode JSON documents. ")
    texts = [f"Section {i}. The {t} module" for i, t in enumerate(["os", "json", "re", "sys", "math", "time"])]
    prompts = ([tok.encode(t) for t in texts] + [shared + tok.encode(t) for t in texts[:4]]
               + [rng.integers(5, 4000, n).tolist() for n in (1, 70, 131, 300, 17, 256)])
    sampled = {3: 7, 8: 11, 12: 5, 15: 2}  # request: seed
    settings = dict(temperature=0.8, top_k=50, top_p=0.9)
    engine = Engine(model, max_batch=16, max_len=4096, prefill_chunk=256, tokenizer=tok).start(warmup=False)
    try:
        queues, events = [], [[] for _ in prompts]
        for r, p in enumerate(prompts):
            queues.append(queue.Queue())
            sampling = SamplingParams(**settings) if r in sampled else SamplingParams()
            engine.submit(Request(prompt=p, on_event=queues[r].put, max_tokens=24, sampling=sampling,
                                  seed=sampled.get(r, 0), stop_token_ids=frozenset()))
            if r == 0:  # prefilled alone (a 16-token call); the others then join its decode batch
                events[0].append(queues[0].get(timeout=600))
        for q, got in zip(queues, events):
            while not got or not isinstance(got[-1], Finished):
                got.append(q.get(timeout=600))
    finally:
        engine.stop()
    out = []
    for r, (p, got) in enumerate(zip(prompts, events)):
        kw = dict(settings, seed=sampled[r]) if r in sampled else {}
        alone = qwenjax.generate(model, [p], max_new_tokens=24, eos_token_ids=(), **kw)[0]
        out.append((len(p), [t for e in got[:-1] for t in e.ids], alone))
    return out


def test_engine_gives_each_request_what_generate_gives_it_alone(model):
    """16 concurrent requests through the engine (decode batches of 1-16 rows, prompts prefilled alone, together
    and in 256-token chunks, 64-4096-slot horizons), 12 greedy and 4 with seeded sampling: each gets the tokens
    `qwenjax.generate` gives it alone."""
    for r, (n, served, alone) in enumerate(_served_and_alone(model)):
        assert served == alone, f"request {r} (prompt of {n} tokens)"
