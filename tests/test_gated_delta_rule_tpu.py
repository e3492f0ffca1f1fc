"""The Pallas TPU (Mosaic) gated delta rule kernels (pallas_kernels/gated_delta_rule/tpu.py).

On CPU they run in Pallas' TPU interpreter and are compared with the token-by-token oracle
(`gated_delta_rule_recurrent`, fp32 inside) forward and backward; with libtpu installed they are also compiled
for real TPU topologies (compile-only devices), alone and inside a full model's forward + backward.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta_rule import gated_delta_rule_recurrent, gated_delta_rule_step
from pallas_kernels.gated_delta_rule.tpu import gated_delta_rule_chunked_tpu, gated_delta_rule_step_tpu
from test_gated_delta_rule import make_inputs

# Tolerances, as max |error| / max |oracle| per output and gradient:
# - fp32 inputs: fp32 operands at full precision; what is left is summation order (seen: <= 2.5e-6).
# - bf16 inputs: the kernel's matmul operands are bf16 (the chunk quantities and the state rounded to bf16 as
#   an operand, fp32 accumulation), the oracle computes in fp32 from the same bf16 inputs (seen: <= 9.1e-3,
#   about one bf16 ulp).
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}

CASES = [  # dtype, GVA ratio, T, initial state, segment ids: every ratio, dtype and option meets the others
    ("float32", 1, 64, False, False),
    ("float32", 2, 100, True, False),
    ("float32", 3, 130, False, True),
    ("float32", 2, 70, True, True),
    ("bfloat16", 1, 100, True, False),
    ("bfloat16", 3, 130, False, True),
    ("bfloat16", 2, 63, True, True),
]


def _segments(batch, t):
    """Row 0: documents start at 37 (inside chunk 0), 64 (a chunk boundary) and 90; row 1: at 5."""
    seg = np.zeros((batch, t), np.int32)
    for start in (37, 64, 90):
        seg[0, start:] += 1
    seg[1, 5:] = 7
    return seg


def _loss(fn):
    def loss(q, k, v, g, beta, state, segment_ids):
        o, final = fn(q, k, v, g, beta, initial_state=state, segment_ids=segment_ids)
        o = o.astype(jnp.float32)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(final * jnp.sin(final))
    return loss


@functools.partial(jax.jit, static_argnames=("save_states",))
def _kernel_and_oracle(q, k, v, g, beta, state, segment_ids, save_states=False):
    kernel = functools.partial(gated_delta_rule_chunked_tpu, interpret=True, save_states=save_states)
    args = (q, k, v, g, beta, state, segment_ids)
    argnums = (0, 1, 2, 3, 4) + ((5,) if state is not None else ())
    out = []
    for fn in (kernel, gated_delta_rule_recurrent):
        value = fn(q, k, v, g, beta, initial_state=state, segment_ids=segment_ids)
        grads = jax.grad(_loss(fn), argnums=argnums)(*args)
        out.append((value, grads))
    return out


def _assert_relative(actual, expected, tol, what):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, what
    assert np.all(np.isfinite(actual)), f"{what}: non-finite"
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)
    assert err <= tol, f"{what}: max error / max |oracle| = {err:.3g} > {tol}"


@pytest.mark.parametrize("dtype,ratio,t,with_state,segments", CASES)
def test_chunked_kernel_matches_oracle_forward_and_backward(dtype, ratio, t, with_state, segments):
    q, k, v, g, beta, state = make_inputs(ratio * 10 + t, t=t, ratio=ratio, with_state=with_state)
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    segment_ids = _segments(q.shape[0], t) if segments else None
    (ours, our_grads), (oracle, oracle_grads) = _kernel_and_oracle(q, k, v, g, beta, state, segment_ids)
    assert ours[0].dtype == jnp.dtype(dtype) and ours[1].dtype == jnp.float32
    tol = TOLERANCE[dtype]
    _assert_relative(ours[0], oracle[0], tol, "o")
    _assert_relative(ours[1], oracle[1], tol, "final state")
    names = ("dq", "dk", "dv", "dg", "dbeta", "dstate")
    for name, a, b in zip(names, our_grads, oracle_grads):
        assert a.dtype == b.dtype, name
        _assert_relative(a, b, tol, name)


def test_saved_states_give_the_same_gradients_as_recomputed():
    q, k, v, g, beta, state = make_inputs(5, t=130, ratio=2, with_state=True)
    recomputed = _kernel_and_oracle(q, k, v, g, beta, state, None, save_states=False)[0]
    saved = _kernel_and_oracle(q, k, v, g, beta, state, None, save_states=True)[0]
    for a, b in zip(jax.tree.leaves(recomputed), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_step_kernel_matches_oracle(ratio, dtype):
    q, k, v, g, beta, state = make_inputs(ratio, t=1, batch=3, ratio=ratio, with_state=True)
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    step = jax.jit(functools.partial(gated_delta_rule_step_tpu, interpret=True))
    o, new_state = step(q, k, v, g, beta, initial_state=state)
    o_ref, state_ref = gated_delta_rule_step(q, k, v, g, beta, initial_state=state)
    assert o.dtype == jnp.dtype(dtype) and o.shape == o_ref.shape and new_state.dtype == jnp.float32
    # Both compute in fp32 (the kernel on the vector unit); bf16 o is one rounding of nearly equal values.
    np.testing.assert_allclose(np.asarray(new_state), np.asarray(state_ref), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_ref, np.float32), atol=1e-5,
                               rtol=1e-5 if dtype == "float32" else 2 ** -7)


def test_step_kernel_without_state_starts_from_zero():
    q, k, v, g, beta, _ = make_inputs(0, t=1, ratio=2)
    o, s = gated_delta_rule_step_tpu(q, k, v, g, beta, interpret=True)
    o_ref, s_ref = gated_delta_rule_step(q, k, v, g, beta)
    np.testing.assert_allclose(np.asarray(s), np.asarray(s_ref), atol=1e-6)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=1e-6)


def test_step_kernel_rejects_more_than_one_token():
    q, k, v, g, beta, _ = make_inputs(0, t=2)
    with pytest.raises(ValueError, match="one token"):
        gated_delta_rule_step_tpu(q, k, v, g, beta, interpret=True)


# ---------------------------------------------------------------------------------------------------------
# In the model
# ---------------------------------------------------------------------------------------------------------

def _model_loss_and_grads(m, ids, segment_ids):
    import qwenjax
    from qwenjax.train.loss import next_token_loss

    def loss(params):
        logits = qwenjax.forward(m.graphdef, params, ids, segment_ids=segment_ids)
        total, count = next_token_loss(logits, ids, segment_ids=segment_ids)
        return total / count, logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(m.params)
    return value, logits, grads


def test_model_with_kernels_equals_xla_path(monkeypatch):
    import qwenjax

    cfg = qwenjax.load_config("configs/tiny-gva3-8layers.json")  # GVA ratio 3
    m = qwenjax.from_config(cfg, dtype="float32", seed=1)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 100)), jnp.int32)
    segment_ids = jnp.asarray(_segments(2, 100))
    results = {}
    for name in ("xla", "pallas_tpu_interpret"):
        monkeypatch.setenv("QWENJAX_GATED_DELTA_RULE", name)
        results[name] = _model_loss_and_grads(m, ids, segment_ids)
    (loss_x, logits_x, grads_x), (loss_k, logits_k, grads_k) = results["xla"], results["pallas_tpu_interpret"]
    np.testing.assert_allclose(np.asarray(logits_k), np.asarray(logits_x), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(loss_k), float(loss_x), rtol=1e-6)
    flat_x = jax.tree_util.tree_leaves_with_path(grads_x)
    for (path, gx), gk in zip(flat_x, jax.tree.leaves(grads_k)):
        scale = max(float(np.max(np.abs(np.asarray(gx)))), 1e-12)
        err = float(np.max(np.abs(np.asarray(gk) - np.asarray(gx)))) / scale
        assert err < 1e-4, f"{jax.tree_util.keystr(path)}: max error / max |grad| = {err:.3g}"


# ---------------------------------------------------------------------------------------------------------
# Compiled for real TPUs (libtpu compile-only devices; no TPU needed)
# ---------------------------------------------------------------------------------------------------------

def _tpu_devices(topology):
    pytest.importorskip("libtpu", reason="compiling for TPU needs libtpu (the test extra installs it)")
    from qwenjax import aot
    return aot.topology_devices(topology)


def _kernel_programs(dtype):
    """(name, function, args) at a real GDN shape: 9B/35B heads (16 q/k, 32 value heads of 128), 512 tokens."""
    b, t, hk, hv, d = 1, 512, 16, 32, 128
    f32 = jnp.float32
    seq = [((b, t, hk, d), dtype), ((b, t, hk, d), dtype), ((b, t, hv, d), dtype), ((b, t, hv), f32),
           ((b, t, hv), f32), ((b, hv, d, d), f32), ((b, t), jnp.int32)]
    one = [((b, 1, hk, d), dtype), ((b, 1, hk, d), dtype), ((b, 1, hv, d), dtype), ((b, 1, hv), f32),
           ((b, 1, hv), f32), ((b, hv, d, d), f32)]

    def forward(q, k, v, g, beta, state, seg):
        return gated_delta_rule_chunked_tpu(q, k, v, g, beta, initial_state=state, segment_ids=seg)

    grad = jax.grad(_loss(gated_delta_rule_chunked_tpu), argnums=(0, 1, 2, 3, 4, 5))
    step = lambda q, k, v, g, beta, state: gated_delta_rule_step_tpu(q, k, v, g, beta, initial_state=state)
    return [("forward", forward, seq), ("forward+backward", grad, seq), ("decode step", step, one)]


@pytest.mark.parametrize("topology,dtype", [("v5e:2x2", "bfloat16"), ("v5e:2x2", "float32"),
                                            ("v6e:2x2", "bfloat16"), ("v5p:2x2x1", "bfloat16")])
def test_kernels_compile_for_tpu(topology, dtype):
    device = _tpu_devices(topology)[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    for name, fn, shapes in _kernel_programs(jnp.dtype(dtype)):
        args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
        lowered = jax.jit(fn).lower(*args)
        assert "tpu_custom_call" in lowered.as_text(), f"{name}: no Mosaic kernel in the program"
        compiled = lowered.compile()  # runs Mosaic and XLA:TPU for this chip
        assert compiled.memory_analysis().argument_size_in_bytes > 0, name


def test_model_forward_backward_compiles_for_tpu_with_kernels():
    from qwenjax import aot
    from qwenjax.config import load_config

    _tpu_devices("v5e:2x2")
    cfg = load_config("configs/tiny-gva3-8layers.json")
    compiled = aot.compile_forward_backward(cfg, "v5e:2x2", mesh="fsdp=2,tensor=2", batch=4, seq=256,
                                            gdr="pallas_tpu")
    assert "tpu_custom_call" in compiled.as_text()  # the kernels, inside shard_map over batch and heads
    report = aot.summary(compiled)
    assert report["temp_bytes"] > 0 and report["flops"] > 0
