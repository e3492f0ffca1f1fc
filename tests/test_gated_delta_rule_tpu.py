"""The Pallas TPU (Mosaic) gated delta rule kernels (pallas_kernels/gated_delta_rule/tpu.py), beyond the
kernel-vs-oracle battery they run in tests/test_kernels.py: saved vs recomputed states, bad input, the model
with the kernels chosen through its `Kernels` setting, and the kernels compiled for real TPU topologies (libtpu
compile-only devices), alone and inside a full model's forward + backward.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compile_targets import tpu_devices  # skipped only where libtpu is not installed; a broken one fails
from kernel_test_base import with_lasting_decays
from pallas_kernels.gated_delta_rule import gated_delta_rule_step
from pallas_kernels.gated_delta_rule.tpu import gated_delta_rule_chunked_tpu, gated_delta_rule_step_tpu
from test_gated_delta_rule import make_inputs
from test_kernels import _segments


def _loss(fn):
    def loss(q, k, v, g, beta, state, segment_ids=None):
        o, final = fn(q, k, v, g, beta, initial_state=state, segment_ids=segment_ids)
        o = o.astype(jnp.float32)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(final * jnp.sin(final))
    return loss


def test_saved_states_give_the_same_gradients_as_recomputed():
    args = make_inputs(5, t=130, ratio=2, with_state=True)
    grads = {save: jax.jit(jax.grad(_loss(functools.partial(gated_delta_rule_chunked_tpu, interpret=True,
                                                             save_states=save)), argnums=tuple(range(6))))(*args)
             for save in (False, True)}
    chex.assert_trees_all_equal(grads[False], grads[True])


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


def test_model_with_kernels_equals_xla_path():
    """fp32, decays that last (`with_lasting_decays`: every gate's gradient is signal, not rounding noise). The
    kernel's products are the XLA path's at HIGHEST precision, in another order. Measured (seeds 1-3): logits
    7e-7 apart, every parameter's gradient within 4.2e-6 of max |grad| (A_log and dt_bias the largest; the
    token-by-token oracle is as far from either). Bounds, fixed: 1e-5 on the logits, 2e-5 per parameter."""
    import qwenjax

    cfg = qwenjax.load_config("configs/tiny-gva3-8layers.json")  # GVA ratio 3
    m = with_lasting_decays(qwenjax.from_config(cfg, dtype="float32", seed=1))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 100)), jnp.int32)
    segment_ids = jnp.asarray(_segments(2, 100))
    results = {name: _model_loss_and_grads(m.replace(kernels=m.kernels.replace(gated_delta_rule=name)), ids,
                                           segment_ids)
               for name in ("xla", "pallas_tpu_interpret")}
    (loss_x, logits_x, grads_x), (loss_k, logits_k, grads_k) = results["xla"], results["pallas_tpu_interpret"]
    np.testing.assert_allclose(np.asarray(logits_k), np.asarray(logits_x), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(loss_k), float(loss_x), rtol=1e-6)
    for (path, gx), gk in zip(jax.tree_util.tree_leaves_with_path(grads_x), jax.tree.leaves(grads_k)):
        scale = max(float(np.max(np.abs(np.asarray(gx)))), 1e-12)
        err = float(np.max(np.abs(np.asarray(gk) - np.asarray(gx)))) / scale
        assert err < 2e-5, f"{jax.tree_util.keystr(path)}: max error / max |grad| = {err:.3g}"


# ---------------------------------------------------------------------------------------------------------
# Compiled for real TPUs (libtpu compile-only devices; no TPU needed)
# ---------------------------------------------------------------------------------------------------------


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


# Two chips and both dtypes: v5e in fp32, v6e (the newest Mosaic target here) in bf16. v5e bf16 and v5p bf16 added
# ~70 s of CI for lowering paths these two already take.
@pytest.mark.parametrize("topology,dtype", [("v5e:2x2", "float32"), ("v6e:2x2", "bfloat16")])
def test_kernels_compile_for_tpu(topology, dtype):
    device = tpu_devices(topology)[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    for name, fn, shapes in _kernel_programs(jnp.dtype(dtype)):
        args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
        lowered = jax.jit(fn).lower(*args)
        assert "tpu_custom_call" in lowered.as_text(), f"{name}: no Mosaic kernel in the program"
        compiled = lowered.compile()  # runs Mosaic and XLA:TPU for this chip
        assert compiled.memory_analysis().argument_size_in_bytes > 0, name


def test_model_forward_backward_compiles_for_tpu_with_kernels():
    from qwenjax import Kernels, aot
    from qwenjax.config import load_config

    tpu_devices("v5e:2x2")
    cfg = load_config("configs/tiny-gva3-8layers.json")
    compiled = aot.compile_forward_backward(cfg, "v5e:2x2", mesh="fsdp=2,tensor=2", batch=4, seq=256,
                                            kernels=Kernels(gated_delta_rule="pallas_tpu"))
    assert "tpu_custom_call" in compiled.as_text()  # the kernels, inside shard_map over batch and heads
    report = aot.summary(compiled)
    assert report["temp_bytes"] > 0 and report["flops"] > 0
