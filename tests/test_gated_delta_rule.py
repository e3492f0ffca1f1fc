"""Tests for the pure-JAX gated delta rule oracles (pallas_kernels.gated_delta_rule).

Everything runs in fp32 on CPU unless stated (x64 stays off). XLA compilation
dominates the runtime, so each case jits everything it compares into one
program, and the default chunked-vs-recurrent grid is a covering subset of the
full cartesian product; set GDR_FULL_GRID=1 to run all 72 combinations
(GVA ratio x T x initial_state, each with chunk sizes 64 and 16).
"""

import functools
import inspect
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta_rule import (gated_delta_rule_chunked, gated_delta_rule_recurrent,
                                             gated_delta_rule_step)

ATOL_FWD = 1e-5  # chunked vs recurrent vs HF, fp32, max abs on o and final_state
RTOL_GRAD = ATOL_GRAD = 1e-4  # chunked vs recurrent gradients
K_DIM = V_DIM = 16
HK = 2
BATCH = 2


def make_inputs(seed, *, batch=BATCH, t=64, hk=HK, ratio=1, dk=K_DIM, dv=V_DIM, g_value=None,
                with_state=False):
    """Random inputs with realistic gates: g = log_sigmoid(N(2, 1.5^2)), beta = sigmoid(N(0, 1))."""
    rng = np.random.default_rng(seed)
    hv = hk * ratio
    q = rng.standard_normal((batch, t, hk, dk), np.float32)
    k = rng.standard_normal((batch, t, hk, dk), np.float32)
    v = rng.standard_normal((batch, t, hv, dv), np.float32)
    if g_value is None:
        logits = 2.0 + 1.5 * rng.standard_normal((batch, t, hv))
        g = -np.logaddexp(0.0, -logits).astype(np.float32)  # log_sigmoid
    else:
        g = np.full((batch, t, hv), g_value, np.float32)
    beta = (1.0 / (1.0 + np.exp(-rng.standard_normal((batch, t, hv))))).astype(np.float32)
    state = rng.standard_normal((batch, hv, dk, dv), np.float32) if with_state else None
    return q, k, v, g, beta, state


@functools.partial(jax.jit, static_argnames=("chunk_sizes", "use_qk_l2norm"))
def run_all(q, k, v, g, beta, initial_state=None, segment_ids=None, *, chunk_sizes=(64, 16),
            scale=None, use_qk_l2norm=True):
    """(recurrent, chunked[c] for c in chunk_sizes), each an (o, final_state) pair."""
    kw = dict(initial_state=initial_state, segment_ids=segment_ids, scale=scale,
              use_qk_l2norm=use_qk_l2norm)
    rec = gated_delta_rule_recurrent(q, k, v, g, beta, **kw)
    return (rec,) + tuple(
        gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=c, **kw) for c in chunk_sizes)


def assert_close(actual, expected, atol, rtol=0.0, what=""):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    err = np.max(np.abs(actual - expected), initial=0.0)
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol,
                               err_msg=f"{what}: max abs err {err:.3g}")


# ---------------------------------------------------------------------------
# 1. chunked == recurrent
# ---------------------------------------------------------------------------

SEQ_LENS = (1, 63, 64, 65, 130, 200)
RATIOS = (1, 2, 3)
CHUNK_SIZES = (64, 16)


def _covering_grid():
    # Every T with both chunk sizes (one program, so one recurrent compile);
    # GVA ratio and initial_state rotate so each ratio meets both settings.
    return [(RATIOS[j % 3], t, j % 2 == 1) for j, t in enumerate(SEQ_LENS)]


FULL_GRID = os.environ.get("GDR_FULL_GRID", "") not in ("", "0")
GRID = (list(itertools.product(RATIOS, SEQ_LENS, (False, True))) if FULL_GRID
        else _covering_grid())


@pytest.mark.parametrize("ratio,t,with_state", GRID)
def test_chunked_matches_recurrent(ratio, t, with_state):
    q, k, v, g, beta, s0 = make_inputs(t * 10 + ratio, t=t, ratio=ratio, with_state=with_state)
    (o_r, s_r), *chunked = run_all(q, k, v, g, beta, s0, chunk_sizes=CHUNK_SIZES)
    assert o_r.shape == (BATCH, t, HK * ratio, V_DIM) and o_r.dtype == jnp.float32
    assert s_r.shape == (BATCH, HK * ratio, K_DIM, V_DIM) and s_r.dtype == jnp.float32
    for c, (o_c, s_c) in zip(CHUNK_SIZES, chunked):
        assert_close(o_c, o_r, ATOL_FWD, what=f"o, chunk {c}")
        assert_close(s_c, s_r, ATOL_FWD, what=f"final_state, chunk {c}")


def test_gva_is_repeat_interleave():
    """Value head h reads q/k head h // (HV // HK): same as explicitly repeated q/k."""
    q, k, v, g, beta, s0 = make_inputs(7, t=20, hk=2, ratio=3, with_state=True)
    q_rep, k_rep = np.repeat(q, 3, axis=2), np.repeat(k, 3, axis=2)
    # The chunked form shares _prepare's GVA expansion and is checked against
    # the recurrent one with ratios 2 and 3 above.
    (o_gva, s_gva), = run_all(q, k, v, g, beta, s0, chunk_sizes=())
    (o_rep, s_rep), = run_all(q_rep, k_rep, v, g, beta, s0, chunk_sizes=())
    assert_close(o_gva, o_rep, 1e-6, what="o")
    assert_close(s_gva, s_rep, 1e-6, what="final_state")


def test_scale_and_no_l2norm():
    """use_qk_l2norm=False on pre-normalised q, k, and a custom scale (o is linear in it).

    Recurrent form only: both forms share the q/k preparation, and the chunked
    one is checked against the recurrent one everywhere else.
    """
    q, k, v, g, beta, s0 = make_inputs(9, t=40, ratio=2, with_state=True)
    unit = lambda x: x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
    (o, s), = run_all(unit(q), unit(k), v, g, beta, s0, chunk_sizes=(), scale=0.3,
                      use_qk_l2norm=False)
    (o_def, s_def), = run_all(q, k, v, g, beta, s0, chunk_sizes=())
    assert_close(o, o_def * (0.3 * K_DIM ** 0.5), ATOL_FWD, what="o")
    assert_close(s, s_def, ATOL_FWD, what="final_state")


# ---------------------------------------------------------------------------
# 2. gradients
# ---------------------------------------------------------------------------


def random_cotangents(seed, o_shape, s_shape):
    """Weights of the random linear functional <r_o, o> + <r_s, final_state>."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(o_shape, np.float32), rng.standard_normal(s_shape, np.float32))


def _outputs_and_grads(fn, args, cotangents):
    """fn(q, k, v, g, beta, s0) = (o, final_state) and d<cotangents, outputs>/d(all 6 args)."""
    outputs, pullback = jax.vjp(fn, *args)
    return outputs, pullback(cotangents)


@functools.partial(jax.jit, static_argnames=("chunk_sizes",))
def grads_all(args, cotangents, segment_ids=None, *, chunk_sizes=(64, 16)):
    """[(outputs, grads)] for the recurrent form, then chunked[c] for c in chunk_sizes."""
    fns = [gated_delta_rule_recurrent] + [
        functools.partial(gated_delta_rule_chunked, chunk_size=c) for c in chunk_sizes]
    return [
        _outputs_and_grads(
            lambda q, k, v, g, beta, s0, fn=fn: fn(q, k, v, g, beta, initial_state=s0,
                                                   segment_ids=segment_ids),
            args, cotangents)
        for fn in fns]


GRAD_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def assert_grads_close(actual, expected, what):
    for name, ga, ge in zip(GRAD_NAMES, actual, expected):
        assert np.all(np.isfinite(ge)), f"{what}: reference d{name} not finite"
        assert_close(ga, ge, ATOL_GRAD, RTOL_GRAD, what=f"d{name} ({what})")


@pytest.mark.parametrize("ratio", [1, 3])
def test_decode_step_matches_recurrent(ratio):
    """The two-pass decode step (a S^T k and a S^T q from one read) is the recurrence's one token, with grads."""
    q, k, v, g, beta, s0 = make_inputs(7 + ratio, t=1, ratio=ratio, with_state=True)
    beta[0, 0, 0] = 0.0  # a padded row: no write, pure decay
    cot = random_cotangents(ratio, v.shape, s0.shape)
    step = lambda q, k, v, g, beta, s0: gated_delta_rule_step(q, k, v, g, beta, initial_state=s0)
    rec = lambda q, k, v, g, beta, s0: gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=s0)
    (o, state), grads = jax.jit(lambda *a: _outputs_and_grads(step, a, cot))(q, k, v, g, beta, s0)
    (o_r, state_r), grads_r = jax.jit(lambda *a: _outputs_and_grads(rec, a, cot))(q, k, v, g, beta, s0)
    assert_close(o, o_r, ATOL_FWD, what="o")
    assert_close(state, state_r, ATOL_FWD, what="final state")
    assert_grads_close(grads, grads_r, what="step vs recurrent")
    with pytest.raises(ValueError, match="one token"):
        gated_delta_rule_step(*make_inputs(0, t=2)[:5])


@pytest.mark.parametrize("t", [3, 8, 9])
def test_model_entry_point_short_sequences_and_every_state(t):
    """`qwenjax.ops.gated_delta_rule.gated_delta_rule`: up to STEPWISE_MAX_TOKENS tokens go one at a time through
    the decode step, more through the chunked form; either way the recurrence's o and final state, with grads.
    `every_state` gives the state after each token: the recurrence's final state over each prefix."""
    from qwenjax.ops import gated_delta_rule as ops

    assert (t <= ops.STEPWISE_MAX_TOKENS) == (t < 9)
    q, k, v, g, beta, s0 = make_inputs(40 + t, t=t, ratio=2, with_state=True)
    cot = random_cotangents(2, v.shape, s0.shape)
    model = lambda q, k, v, g, beta, s0: ops.gated_delta_rule(q, k, v, g, beta, initial_state=s0,
                                                                implementation="xla")
    rec = lambda q, k, v, g, beta, s0: gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=s0)
    (o, state), grads = jax.jit(lambda *a: _outputs_and_grads(model, a, cot))(q, k, v, g, beta, s0)
    (o_r, state_r), grads_r = jax.jit(lambda *a: _outputs_and_grads(rec, a, cot))(q, k, v, g, beta, s0)
    assert_close(o, o_r, ATOL_FWD, what="o")
    assert_close(state, state_r, ATOL_FWD, what="final state")
    assert_grads_close(grads, grads_r, what="model entry point vs recurrent")

    o_e, states = ops.gated_delta_rule(q, k, v, g, beta, initial_state=s0, implementation="xla", every_state=True)
    assert states.shape == (q.shape[0], t, *s0.shape[1:])
    assert_close(o_e, o_r, ATOL_FWD, what="o with every state")
    for i in range(t):
        _, prefix = gated_delta_rule_recurrent(q[:, :i + 1], k[:, :i + 1], v[:, :i + 1], g[:, :i + 1],
                                               beta[:, :i + 1], initial_state=s0)
        assert_close(states[:, i], prefix, ATOL_FWD, what=f"state after token {i}")


# ---------------------------------------------------------------------------
# 3. Hugging Face transformers reference
# ---------------------------------------------------------------------------


def test_matches_transformers():
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    # The hub decorators may swap in an FLA kernel when installed; the spec is
    # the pure-torch function underneath (functools.wraps keeps __wrapped__).
    hf_chunk = inspect.unwrap(hf.torch_chunk_gated_delta_rule)
    hf_recurrent = inspect.unwrap(hf.torch_recurrent_gated_delta_rule)

    q, k, v, g, beta, s0 = make_inputs(3, t=100, ratio=2, dk=16, dv=32, with_state=True)
    (o_r, s_r), (o_c, s_c) = run_all(q, k, v, g, beta, s0, chunk_sizes=(64,))
    as_torch = lambda x: torch.from_numpy(np.ascontiguousarray(x))
    # Value head h reads key head h // ratio. HF's model repeats q and k to the value heads before this call
    # (transformers 5.17 requires it; 5.23 also accepts fewer key heads), so the spec gets them repeated.
    ratio = v.shape[2] // q.shape[2]
    q_rep, k_rep = (np.repeat(np.asarray(x), ratio, axis=2) for x in (q, k))
    args = [as_torch(x) for x in (q_rep, k_rep, v, g, beta)]
    kw = dict(initial_state=as_torch(s0), output_final_state=True, use_qk_l2norm_in_kernel=True)
    with torch.no_grad():
        refs = {"hf_chunk": hf_chunk(*args, chunk_size=64, **kw),
                "hf_recurrent": hf_recurrent(*args, **kw)}
    for ref_name, (o_hf, s_hf) in refs.items():
        for name, o, s in (("recurrent", o_r, s_r), ("chunked", o_c, s_c)):
            assert_close(o, o_hf.numpy(), ATOL_FWD, what=f"o {name} vs {ref_name}")
            assert_close(s, s_hf.numpy(), ATOL_FWD, what=f"state {name} vs {ref_name}")


# ---------------------------------------------------------------------------
# 4. packed sequences (segment_ids)
# ---------------------------------------------------------------------------

# Two rows, three documents each. Row 0 has boundaries inside chunks (37, 101);
# row 1 starts documents exactly at a chunk start (64) and right after it (65,
# a one-token document), and reuses segment id 5 to check that resets follow id
# *changes*, not id equality.
DOC_LENS = ((37, 64, 50), (64, 1, 86))
DOC_IDS = ((0, 1, 2), (5, 3, 5))


def _separate_docs(q, k, v, g, beta, s0):
    """Runs every document alone: one document per batch row, then scatters back.

    Rows are right-padded with exact no-op steps (q = k = v = 0, g = 0, beta = 0:
    S <- 1 * S + k * 0), so each row's final state is its document's. s0 seeds
    only the first document of each packed row; the others start from zero.
    """
    docs = [(b, start, n) for b, lens in enumerate(DOC_LENS)
            for start, n in zip(np.cumsum((0,) + lens[:-1]), lens)]
    width = max(n for _, _, n in docs)
    src_row = np.array([b for b, _, _ in docs])[:, None]
    src_pos = np.array([[start + min(j, n - 1) for j in range(width)] for _, start, n in docs])
    valid = np.array([[j < n for j in range(width)] for _, _, n in docs])

    def gather(x):  # [B, T, ...] -> [docs, width, ...], zero on padding
        mask = valid.reshape(valid.shape + (1,) * (x.ndim - 2))
        return jnp.where(mask, x[src_row, src_pos], 0)

    init = jnp.stack([s0[b] if start == 0 else jnp.zeros_like(s0[b]) for b, start, _ in docs])
    o, s = gated_delta_rule_recurrent(*(gather(x) for x in (q, k, v, g, beta)), initial_state=init)
    # Packed position (b, t) <- (its document's row, offset in the document).
    row_of = np.zeros(q.shape[:2], np.int64)
    pos_of = np.zeros(q.shape[:2], np.int64)
    for r, (b, start, n) in enumerate(docs):
        row_of[b, start:start + n] = r
        pos_of[b, start:start + n] = np.arange(n)
    last_doc = [max(r for r, d in enumerate(docs) if d[0] == b) for b in range(len(DOC_LENS))]
    return o[row_of, pos_of], s[np.array(last_doc)]


@functools.lru_cache(maxsize=None)
def _packed_results():
    """(separate-docs (outputs, grads), [packed (outputs, grads) for rec, chunk 64, chunk 16]).

    Grads are of <r_o, o> + <r_s, final_state>; for the separate documents that
    is the sum of the per-document losses, scattered back to packed positions.
    """
    t = sum(DOC_LENS[0])
    q, k, v, g, beta, s0 = make_inputs(11, t=t, ratio=2, with_state=True)
    seg = np.stack([np.repeat(ids, lens) for ids, lens in zip(DOC_IDS, DOC_LENS)]).astype(np.int32)
    args = (q, k, v, g, beta, s0)
    cot = random_cotangents(12, v.shape, s0.shape)
    separate = jax.jit(functools.partial(_outputs_and_grads, _separate_docs))(args, cot)
    packed = grads_all(args, cot, seg, chunk_sizes=(64, 16))
    return separate, packed


PACKED_NAMES = ("recurrent", "chunked64", "chunked16")


def test_segment_ids_match_separate_documents():
    ((o_ref, s_ref), _), packed = _packed_results()
    for name, ((o, s), _) in zip(PACKED_NAMES, packed):
        assert_close(o, o_ref, ATOL_FWD, what=f"o {name}")
        assert_close(s, s_ref, ATOL_FWD, what=f"final_state {name}")


def test_segment_ids_gradients_match_separate_documents():
    (_, grads_ref), packed = _packed_results()
    for name, (_, grads) in zip(PACKED_NAMES, packed):
        assert_grads_close(grads, grads_ref, what=f"packed {name} vs separate docs")


# ---------------------------------------------------------------------------
# 5. bf16 inputs
# ---------------------------------------------------------------------------


def test_bf16_inputs():
    q, k, v, g, beta, s0 = make_inputs(5, t=100, ratio=2, with_state=True)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, g, beta)]
    upcast = [x.astype(jnp.float32) for x in bf16]
    results_bf16 = run_all(*bf16, s0, chunk_sizes=(64,))
    results_f32_same = run_all(*upcast, s0, chunk_sizes=(64,))  # same values, fp32 dtype
    results_f32 = run_all(q, k, v, g, beta, s0, chunk_sizes=(64,))  # unrounded inputs
    for name, (o, s), (o_same, s_same), (o32, s32) in zip(
            ("recurrent", "chunked"), results_bf16, results_f32_same, results_f32):
        assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
        # Internal math is fp32, so only the output cast differs (<= 1/2 bf16 ulp)...
        assert_close(s, s_same, ATOL_FWD, what=f"state {name} vs fp32 on bf16 values")
        assert_close(o, o_same, 1e-6, rtol=2.0 ** -8, what=f"o {name} vs fp32 on bf16 values")
        # ...and the end-to-end error from rounding the inputs to bf16 stays small.
        assert_close(o, o32, 2e-2, what=f"o {name} vs fp32 inputs")
        assert_close(s, s32, 2e-2, what=f"state {name} vs fp32 inputs")


# ---------------------------------------------------------------------------
# 6. bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [gated_delta_rule_recurrent, gated_delta_rule_chunked])
def test_heads_not_divisible_raises(fn):
    q, k, _, _, _, _ = make_inputs(0, t=8, hk=2)
    v = np.zeros((BATCH, 8, 3, V_DIM), np.float32)
    g = beta = np.zeros((BATCH, 8, 3), np.float32)
    with pytest.raises(ValueError, match=r"HV=3.*HK=2"):
        fn(q, k, v, g, beta)


def test_fp32_products_are_highest_precision_when_lowered_for_tpu_or_gpu_on_a_cpu_host():
    """The XLA form's fp32 products: HIGHEST wherever the default would round operands (TPU bf16 passes, GPU tf32),
    also in a program lowered on this CPU host for those platforms (qwenjax.aot); plain on CPU, where it is exact."""
    from pallas_kernels.gated_delta_rule.xla import gated_delta_rule_chunked

    q, k, v, g, beta, _ = make_inputs(0, t=64)
    fn = jax.jit(lambda *a: gated_delta_rule_chunked(*a)[0])
    lowered = {p: fn.trace(q, k, v, g, beta).lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda", "tpu")}
    assert "HIGHEST" not in lowered["cpu"]
    assert "HIGHEST" in lowered["cuda"] and "HIGHEST" in lowered["tpu"]
