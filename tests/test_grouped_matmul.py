"""The grouped matmul: the Mosaic kernels (TPU interpreter on CPU) and `ragged_dot` against the pure-JAX oracle,
forward and backward; the kernels compiled for a TPU (libtpu, compile-only); a full MoE model with the kernels
equal to the XLA path."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import qwenjax
from pallas_kernels.grouped_matmul import grouped_matmul_reference
from pallas_kernels.grouped_matmul.tpu import Tiling, grouped_matmul_tpu
from qwenjax.ops import grouped_matmul as gmm_op
from qwenjax.pretrained import forward
from qwenjax.testing import gradient_errors
from qwenjax.train.loss import next_token_loss

# fp32: operands at HIGHEST, the only difference is summation order; bf16: gradients are rounded to bf16
# (2^-8 relative) where the oracle keeps fp32 until its last cast.
TOL = {"float32": 1e-5, "bfloat16": 2e-2}

CASES = [  # group sizes (rows past their sum belong to no group), tiling (tm, tk, tn)
    ((5, 0, 13, 2, 0, 7), Tiling(8, 16, 16)),   # empty groups, sizes off the row tile, K and N padded
    ((0, 0, 30, 1), Tiling(16, 8, 8)),          # leading empty groups, one group over several tiles
    ((3, 4), Tiling(512, 512, 512)),            # one tile holds everything
    ((0, 0, 0), Tiling(8, 8, 8)),               # no rows routed at all
    ((1, 0, 2, 0, 0, 0, 1, 0, 0, 0), Tiling(8, 8, 8)),  # fewer rows than groups (decode): the XLA path gathers
]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sizes,tiling", CASES)
@pytest.mark.parametrize("impl", ["pallas_tpu_interpret", "ragged_dot"])
def test_grouped_matmul_equals_oracle_forward_and_backward(impl, sizes, tiling, dtype):
    gs = jnp.array(sizes, jnp.int32)
    m, k, n = sum(sizes) + 3, 24, 40
    keys = jax.random.split(jax.random.key(len(sizes)), 3)
    x = jax.random.normal(keys[0], (m, k)).astype(dtype)
    w = jax.random.normal(keys[1], (len(sizes), n, k)).astype(dtype)
    ct = jax.random.normal(keys[2], (m, n))
    if impl == "pallas_tpu_interpret":
        f = lambda x, w: grouped_matmul_tpu(x, w, gs, tiling=tiling, interpret=True)
    else:
        f = lambda x, w: gmm_op.grouped_matmul(x, w, gs, implementation=impl)
    y, ref = f(x, w), grouped_matmul_reference(x, w, gs)
    assert y.dtype == jnp.float32 and y.shape == (m, n)
    assert _rel(y, ref) < TOL["float32"]  # the forward accumulates in fp32 either way
    assert not np.asarray(y)[sum(sizes):].any()  # rows of no group are zero
    got = jax.grad(lambda x, w: jnp.sum(f(x, w) * ct), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(grouped_matmul_reference(x, w, gs) * ct), argnums=(0, 1))(x, w)
    for name, a, b in zip(("d lhs", "d rhs"), got, want):
        assert a.dtype == b.dtype
        if np.abs(np.asarray(b, np.float32)).max() == 0:
            assert not np.asarray(a, np.float32).any(), name
        else:
            assert _rel(a, b) < TOL[dtype], (name, _rel(a, b))
    dw = np.asarray(got[1], np.float32)
    for g, s in enumerate(sizes):
        if s == 0:
            assert not dw[g].any()  # an empty group's weight gradient is written, as zeros


def test_implementation_choice():
    assert gmm_op.resolve("auto") == ("pallas_tpu" if jax.default_backend() == "tpu" else "ragged_dot")
    with pytest.raises(ValueError, match="grouped matmul implementation 'megablox'"):
        gmm_op.resolve("megablox")


def test_moe_model_with_kernels_equals_xla_path(monkeypatch):
    cfg = qwenjax.load_config("configs/tiny-moe.json")
    m = qwenjax.from_config(cfg, dtype="float32", seed=6)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40)))

    def run(impl):
        monkeypatch.setenv(gmm_op.ENV, impl)  # read while tracing

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
    from qwenjax import aot

    try:
        return aot.topology_devices(topology)[0]
    except RuntimeError as e:
        pytest.skip(str(e))


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
    compiled = aot.compile_forward_backward(cfg, "v5e:2x2", mesh="expert=4", batch=4, seq=256, ep=ep)
    text = compiled.as_text()
    assert "tpu_custom_call" in text  # the grouped matmul and GDR kernels, inside shard_map
    # With the expert axis alone no parameter is split by fsdp: these collectives are the MoE's token exchange
    # (and their transposes in the backward).
    if ep == "ragged_all_to_all":
        assert "ragged-all-to-all" in text
    else:
        assert "all-gather" in text and "reduce-scatter" in text and "ragged-all-to-all" not in text
    assert aot.summary(compiled)["temp_bytes"] > 0
