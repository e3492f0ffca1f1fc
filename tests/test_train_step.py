"""The train step: it learns, accumulation equals one big batch, fp32 state and master weights, config errors."""

import logging

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

import qwenjax
from qwenjax import _compat
from qwenjax.config import resolve_config
from qwenjax.sharding import activation_sharding
from qwenjax.train.step import TrainConfig, accumulated_gradients, init_state, jit_train_step, shard_batch


def _model(dtype="float32", seed=0):
    return qwenjax.from_config(qwenjax.load_config(resolve_config("tiny")), dtype=dtype, seed=seed)


def _batch(vocab, rows=4, length=48, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, length)).astype(np.int32)
    loss_mask = np.ones_like(ids)
    loss_mask[:, :8] = 0  # a "prompt" that is not learned
    return {"input_ids": ids, "loss_mask": loss_mask}


def _stack(batch, accum):
    return {k: jnp.asarray(v.reshape(accum, -1, *v.shape[1:])) for k, v in batch.items()}


def test_a_tiny_model_overfits_a_small_batch(caplog):
    m = _model()
    cfg = TrainConfig(learning_rate=1e-2, warmup_steps=5, total_steps=80, weight_decay=0.0)
    state, step = init_state(m.params, cfg), jit_train_step(m.graphdef, cfg)
    batch = _stack(_batch(m.config.vocab_size), 1)
    losses = []
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for _ in range(cfg.total_steps):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    # The step compiles once: its output state is an input jit has seen (same shardings, committed).
    assert sum("Finished XLA compilation of jit(train_step_on_mesh)" in r.getMessage() for r in caplog.records) == 1
    assert losses[0] > 5.0  # ~ln(vocab): the random model knows nothing
    assert losses[-1] < 0.5, losses[::10]  # random tokens memorised
    assert int(state.step) == cfg.total_steps
    assert float(metrics["tokens"]) == 4 * (48 - 8)


def test_accumulation_equals_one_batch():
    m = _model()
    batch = _batch(256)
    batch["loss_mask"][1, 20:] = 0  # micro-batches count different numbers of tokens: the mean is over tokens
    results = []
    for accum in (1, 2):
        cfg = TrainConfig(grad_accum=accum)
        results.append(jax.jit(lambda p, b, cfg=cfg: accumulated_gradients(m.graphdef, cfg, p, b))(
            m.params, _stack(batch, accum)))
    (g1, total1, count1, _), (g2, total2, count2, _) = results
    assert float(count1) == float(count2) == 2 * 40 + 12 + 40
    np.testing.assert_allclose(float(total1), float(total2), rtol=1e-6)
    # Batch 4 in one pass and 2 x 2 sum in different orders. A few gradients (A_log) are sums of terms that
    # nearly cancel, so their error is judged on the scale of the whole gradient, not on their own tiny norm;
    # a weighting bug (a mean per micro-batch, a lost micro-batch) moves every tensor by percents.
    scale = float(optax.tree.norm(g1))
    for (path, a), (_, b) in zip(_compat.variable_items(g1), _compat.variable_items(g2)):
        a, b = np.asarray(_compat.variable_value(a)), np.asarray(_compat.variable_value(b))
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(a) + 1e-6 * scale, path


@pytest.mark.parametrize("master", [False, True])
def test_bf16_training_keeps_fp32_optimizer_state(master):
    m = _model("bfloat16")
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10, master_fp32=master)
    state = init_state(m.params, cfg)
    state, metrics = jit_train_step(m.graphdef, cfg)(state, _stack(_batch(256), 1))
    assert np.isfinite(float(metrics["loss"]))
    dtypes = lambda tree: {str(x.dtype) for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and x.ndim > 0}
    assert dtypes(state.opt_state) == {"float32"}
    assert "bfloat16" in dtypes(state.params)
    if master:
        assert dtypes(state.master) == {"float32"}
        for (_, p), (_, w) in zip(_compat.variable_items(state.params), _compat.variable_items(state.master)):
            p, w = _compat.variable_value(p), _compat.variable_value(w)
            assert np.array_equal(np.asarray(p), np.asarray(w.astype(p.dtype)))  # params are the master, rounded
    else:
        assert state.master is None


def test_sharded_training_equals_single_device():
    spec = "data=2,fsdp=2,tensor=2"  # every axis the rules use for dense weights and batches
    cfg = TrainConfig(learning_rate=3e-3, warmup_steps=0, total_steps=3, grad_accum=2)
    batch = _batch(256, rows=8)
    batch["segment_ids"] = np.where(np.arange(48) < 20, 1, 2)[None].repeat(8, 0).astype(np.int32)  # packed rows
    batch = _stack(batch, cfg.grad_accum)
    runs = []
    for mesh in (None, spec):
        m = qwenjax.from_config(qwenjax.load_config(resolve_config("tiny")), dtype="float32", seed=0, mesh=mesh)
        with activation_sharding(m.mesh, m.rules):
            grads = jax.jit(lambda p, b: accumulated_gradients(m.graphdef, cfg, p, b)[0])(
                m.params, shard_batch(batch, m.mesh, m.rules))
        state, step = init_state(m.params, cfg), jit_train_step(m.graphdef, cfg, m.mesh, m.rules)
        curve = []
        for _ in range(cfg.total_steps):
            state, metrics = step(state, batch)
            curve.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        runs.append((grads, state, curve))
    (g1, _, curve1), (g8, sharded, curve8) = runs
    # the gradients agree tensor by tensor, judged on the scale of the whole gradient (as accumulation's test)
    scale = float(optax.tree.norm(g1))
    for (path, a), (_, b) in zip(_compat.variable_items(g1), _compat.variable_items(g8)):
        a, b = np.asarray(_compat.variable_value(a)), np.asarray(_compat.variable_value(b))
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a) + 1e-6 * scale, path
    # and so do the losses and gradient norms of three steps. (Weights after Adam steps are not compared
    # elementwise: Adam's update is ~lr * sign(g), so a gradient entry near 0 turns ulp noise into lr.)
    np.testing.assert_allclose(curve8, curve1, rtol=1e-5)
    assert curve1[-1][0] < curve1[0][0]  # it trained
    # weights and their Adam moments stay spread over the 8 devices, split the same way
    w = sharded.params["layers"][0]["mlp"]["gate_proj"]["weight"][...]
    mu = sharded.opt_state[1][0].mu["layers"][0]["mlp"]["gate_proj"]["weight"][...]
    assert len(w.sharding.device_set) == 8 and w.sharding.spec == mu.sharding.spec != P()
    assert sharded.step.sharding.mesh.size == 8


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="grad_accum=0"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="remat='everything'"):
        TrainConfig(remat="everything")
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(warmup_steps=20, total_steps=10)
    m = _model()
    cfg = TrainConfig(grad_accum=2)
    with pytest.raises(ValueError, match="grad_accum 2"):
        jit_train_step(m.graphdef, cfg)(init_state(m.params, cfg), _stack(_batch(256), 1))
