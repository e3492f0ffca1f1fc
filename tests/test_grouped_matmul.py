"""The grouped matmul beyond the kernel-vs-oracle battery (tests/test_kernels.py): the kernels compiled for a TPU
(libtpu, compile-only), and a full MoE model with the kernels equal to the XLA path."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import qwenjax
from pallas_kernels.grouped_matmul.tpu import grouped_matmul_tpu
from qwenjax import Kernels
from qwenjax.pretrained import forward
from compile_targets import tpu_devices
from qwenjax.testing import gradient_errors
from qwenjax.train.loss import next_token_loss

def test_implementation_choice():
    assert Kernels().resolve("tpu").grouped_matmul == "pallas_tpu"
    assert Kernels().resolve("cpu").grouped_matmul == "ragged_dot"
    assert Kernels().resolve("gpu_sm90").grouped_matmul == "pallas_gpu"  # NVIDIA Hopper (qwenjax.ops.platform)
    assert Kernels().resolve("gpu").grouped_matmul == "ragged_dot"
    with pytest.raises(ValueError, match="grouped matmul implementation must be one of"):
        Kernels(grouped_matmul="megablox")


def test_moe_model_with_kernels_equals_xla_path():
    cfg = qwenjax.load_config("configs/tiny-moe.json")
    base = qwenjax.from_config(cfg, dtype="float32", seed=6)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40)))

    def run(impl):
        m = base.replace(kernels=base.kernels.replace(grouped_matmul=impl))

        def loss(params):
            total, count = next_token_loss(forward(m.graphdef, params, ids), ids)
            return total / count

        return jax.jit(forward, static_argnums=0)(m.graphdef, m.params, ids), jax.jit(jax.grad(loss))(m.params)

    (la, ga), (lb, gb) = run("ragged_dot"), run("pallas_tpu_interpret")
    np.testing.assert_allclose(np.asarray(lb), np.asarray(la), atol=1e-5, rtol=0)
    per, overall = gradient_errors(gb, ga)
    # The GDN gates' gradients (A_log, dt_bias: a few numbers summed over every token with heavy cancellation)
    # move by ~3e-4 relative with any change of summation order upstream; they count in the overall error.
    assert overall < 1e-5, overall
    bad = {k: v for k, v in per.items() if "mlp" in k and not v < 1e-5}
    assert not bad, bad


def _tpu_device(topology="v5e:2x2"):
    return tpu_devices(topology)[0]


def test_kernels_compile_for_tpu_at_the_35b_a3b_expert_shape():
    device = _tpu_device()
    sharding = jax.sharding.SingleDeviceSharding(device)
    rows, hidden, inter, experts = 4096 * 8, 2048, 512, 256  # 4096 tokens, top-8; gate|up fused rows: 2 x 512
    x = jax.ShapeDtypeStruct((rows, hidden), jnp.bfloat16, sharding=sharding)
    w = jax.ShapeDtypeStruct((experts, 2 * inter, hidden), jnp.bfloat16, sharding=sharding)
    gs = jax.ShapeDtypeStruct((experts,), jnp.int32, sharding=sharding)
    fwd = lambda x, w, gs: grouped_matmul_tpu(x, w, gs)
    grad = jax.value_and_grad(lambda x, w, gs: jnp.sum(grouped_matmul_tpu(x, w, gs)), argnums=(0, 1))
    for fn in (fwd, grad):
        lowered = jax.jit(fn).lower(x, w, gs)
        assert lowered.as_text().count("tpu_custom_call") == (1 if fn is fwd else 3)
        assert lowered.compile().memory_analysis().argument_size_in_bytes > 0


@pytest.mark.parametrize("ep", ["ragged_all_to_all", "allgather"])
def test_moe_model_forward_backward_compiles_for_tpu_with_expert_parallelism(ep):
    from qwenjax import aot

    _tpu_device("v5e:2x2")
    cfg = qwenjax.load_config("configs/tiny-moe.json")
    compiled = aot.compile_forward_backward(cfg, "v5e:2x2", mesh="expert=4", batch=4, seq=256,
                                            kernels=Kernels(expert_parallel=ep))
    text = compiled.as_text()
    assert "tpu_custom_call" in text  # the grouped matmul and GDR kernels, inside shard_map
    # With the expert axis alone no parameter is split by fsdp: these collectives are the MoE's token exchange
    # (and their transposes in the backward).
    if ep == "ragged_all_to_all":
        assert "ragged-all-to-all" in text
    else:
        assert "all-gather" in text and "reduce-scatter" in text and "ragged-all-to-all" not in text
    assert aot.summary(compiled)["temp_bytes"] > 0
