"""LoRA: adapters on every linear layer (GDN projections included), zero B changes nothing, only adapters train,
and a merged export loaded by transformers gives the adapted model's logits."""

import numpy as np
import pytest

import chex
import jax
import jax.numpy as jnp

import qwenjax
from qwenjax import _compat
from qwenjax.model.layers import LoRAParam
from qwenjax.train.lora import ALL_TARGETS, LoRAConfig, add_lora, merge_lora
from qwenjax.train.step import TrainConfig, accumulated_gradients, init_state, jit_train_step

torch = pytest.importorskip("torch")
from qwenjax.testing import hf_logits, make_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora-src")
    make_hf_checkpoint(path, seed=21)
    return path


def _ids(rows=2, length=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (rows, length)).astype(np.int32)


def test_adapters_cover_every_linear_and_zero_b_changes_nothing(ckpt):
    m = qwenjax.from_pretrained(ckpt, dtype="float32")
    ml = add_lora(m, LoRAConfig(rank=4, alpha=8, dropout=0.1))
    adapted = {path[-3] for path, v in _compat.variable_items(ml.params) if isinstance(v, LoRAParam)}
    assert adapted == set(ALL_TARGETS)  # the GDN projections in_proj_qkv/z/a/b and out_proj too
    ids = _ids()
    assert np.array_equal(np.asarray(ml(ids)), np.asarray(m(ids)))  # B = 0 (and no dropout at inference)
    assert not any(isinstance(v, LoRAParam) for _, v in _compat.variable_items(m.params))  # m itself untouched


def test_only_adapters_train_and_merged_export_matches_in_transformers(ckpt, tmp_path):
    from transformers import Qwen3_5ForCausalLM

    m = qwenjax.from_pretrained(ckpt, dtype="float32")
    ml = add_lora(m, LoRAConfig(rank=4, alpha=8))
    cfg = TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=5)
    state = init_state(ml.params, cfg)
    n_adapters = sum(isinstance(v, LoRAParam) for _, v in _compat.variable_items(ml.params))
    assert len(list(_compat.variable_items(state.params))) == n_adapters
    assert all(isinstance(v, LoRAParam) for _, v in _compat.variable_items(state.params))
    optimizer_arrays = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert len(optimizer_arrays) == 2 * n_adapters  # Adam's two moments, of the adapters only
    frozen_before = jax.device_get(state.frozen)  # host copies: the step donates the state

    step = jit_train_step(ml.graphdef, cfg)
    batch = {"input_ids": jnp.asarray(_ids(4, 40)[None])}
    for _ in range(cfg.total_steps):
        state, metrics = step(state, batch)
    chex.assert_trees_all_equal(jax.device_get(state.frozen), frozen_before)

    trained = ml.replace(params=state.all_params())
    ids = _ids(seed=3)
    adapted = np.asarray(trained(ids))
    assert not np.allclose(adapted, np.asarray(m(ids)), atol=1e-3)  # the adapters learned something
    merged = merge_lora(trained)
    np.testing.assert_allclose(np.asarray(merged(ids)), adapted, rtol=0, atol=1e-4)
    out = qwenjax.export_hf(m, tmp_path / "merged", params=merged.params)
    hf = Qwen3_5ForCausalLM.from_pretrained(out, dtype=torch.float32)
    np.testing.assert_allclose(hf_logits(hf, ids), adapted, rtol=0, atol=1e-4)


def test_dropout_acts_in_training_only(ckpt):
    m = qwenjax.from_pretrained(ckpt, dtype="float32")
    batch = {"input_ids": jnp.asarray(_ids(2, 32)[None])}
    grads = {}
    for rate in (0.0, 0.5):
        ml = add_lora(m, LoRAConfig(rank=4, dropout=rate))
        st = init_state(ml.params, TrainConfig())
        g, *_ = jax.jit(lambda p, f: accumulated_gradients(ml.graphdef, TrainConfig(), p, batch, f))(
            st.params, st.frozen)
        grads[rate] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
        assert np.array_equal(np.asarray(ml(_ids())), np.asarray(m(_ids())))  # inference: no dropout
    assert not np.allclose(grads[0.0], grads[0.5])


def test_config_errors_name_the_culprit():
    with pytest.raises(ValueError, match="in_proj_qkvz"):
        LoRAConfig(targets=("q_proj", "in_proj_qkvz"))
    with pytest.raises(ValueError, match="rank=0"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="dropout=1.0"):
        LoRAConfig(dropout=1.0)
