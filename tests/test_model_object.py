"""The model object: kernel choices as a resolved, hashable setting on the model (argument, else environment, else
"auto"), `replace` and the per-model compile cache."""

import dataclasses
import re

import jax
import numpy as np
import pytest

import qwenjax
from qwenjax import Kernels
from qwenjax.config import load_config
from qwenjax.ops import gated_delta_rule


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/tiny.json")


@pytest.fixture
def traced(monkeypatch):
    """The gated delta rule implementations traced from now on, as (name, "sequence" or "token")."""
    calls = []
    for name, pair in list(gated_delta_rule.IMPLEMENTATIONS.items()):
        def spy(fn, name, kind):
            return lambda *a, **kw: calls.append((name, kind)) or fn(*a, **kw)
        monkeypatch.setitem(gated_delta_rule.IMPLEMENTATIONS, name,
                            (spy(pair[0], name, "sequence"), spy(pair[1], name, "token")))
    return calls


def test_two_models_with_different_kernels_each_run_their_own(cfg, traced, monkeypatch):
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    xla = qwenjax.from_config(cfg, seed=0, kernels=Kernels(gated_delta_rule="xla"))
    recurrent = xla.replace(kernels=xla.kernels.replace(gated_delta_rule="recurrent"))
    assert (xla.kernels.gated_delta_rule, recurrent.kernels.gated_delta_rule) == ("xla", "recurrent")
    assert xla.graphdef != recurrent.graphdef  # so every jit keyed on the graph definition compiles anew

    a = np.asarray(xla(ids))
    assert set(traced) == {("xla", "sequence")}
    traced.clear()
    b = np.asarray(recurrent(ids))
    assert set(traced) == {("recurrent", "sequence")}
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)

    traced.clear()
    np.testing.assert_array_equal(np.asarray(xla(ids)), a)  # its own compiled program, not retraced
    assert traced == []
    # Generation compiles through the same per-model cache: prefill and decode step of its own kind.
    qwenjax.generate(recurrent, [[1, 2, 3]], max_new_tokens=2)
    assert set(traced) == {("recurrent", "sequence"), ("recurrent", "token")}

    # The environment is read when a model is built, never while tracing: a later change leaves models alone.
    monkeypatch.setenv("QWENJAX_GATED_DELTA_RULE", "recurrent")
    traced.clear()
    xla(ids[:1])  # a new shape: traced now, with the model's own choice
    assert set(traced) == {("xla", "sequence")}
    assert qwenjax.from_config(cfg, seed=0).kernels.gated_delta_rule == "recurrent"


def test_kernels_resolve_argument_then_environment_then_auto(monkeypatch):
    for name in ("QWENJAX_GATED_DELTA_RULE", "QWENJAX_GROUPED_MATMUL", "QWENJAX_EXPERT_PARALLEL"):
        monkeypatch.delenv(name, raising=False)
    assert Kernels().resolve("tpu") == Kernels("pallas_tpu", "pallas_tpu", "ragged_all_to_all", "xla")
    assert Kernels().resolve("gpu").expert_parallel == "ragged_all_to_all"
    cpu = Kernels().resolve("cpu")
    assert (cpu.gated_delta_rule, cpu.grouped_matmul, cpu.expert_parallel) == ("xla", "ragged_dot", "allgather")
    assert cpu.resolved and not Kernels().resolved and hash(cpu) == hash(Kernels().resolve("cpu"))
    monkeypatch.setenv("QWENJAX_GATED_DELTA_RULE", "recurrent")
    assert Kernels().resolve("tpu").gated_delta_rule == "recurrent"
    assert Kernels(gated_delta_rule="auto").resolve("tpu").gated_delta_rule == "pallas_tpu"  # the argument wins
    monkeypatch.setenv("QWENJAX_GATED_DELTA_RULE", "fast")
    with pytest.raises(ValueError, match=r"\$QWENJAX_GATED_DELTA_RULE='fast'.*one of"):
        Kernels().resolve("cpu")
    with pytest.raises(ValueError, match=r"Kernels\(expert_parallel='alltoall'\).*one of"):
        Kernels(expert_parallel="alltoall")
    with pytest.raises(ValueError, match=r"unknown op\(s\) \['attention'\]"):
        qwenjax.from_config(load_config("configs/tiny.json"), kernels={"attention": "xla"})


def test_model_is_an_immutable_value_with_its_own_compile_cache(cfg):
    m = qwenjax.from_config(cfg, seed=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.params = None
    built = []
    first = m.compiled("key", lambda: built.append(1) or jax.jit(lambda x: x + 1))
    assert m.compiled("key", lambda: built.append(2) or jax.jit(lambda x: x)) is first and built == [1]
    doubled = jax.tree.map(lambda x: x * 2, m.params)
    m2 = m.replace(params=doubled)
    assert m2.params is doubled and m.params is not doubled and m2.graphdef is m.graphdef
    assert m2.compiled("key", lambda: jax.jit(lambda x: x - 1)) is not first  # a new value, a new cache
    ids = np.arange(10)
    assert not np.allclose(np.asarray(m2(ids)), np.asarray(m(ids)))  # each runs on its own parameters


def test_profiles_read_as_the_model():
    """Named scopes in the compiled program's op names: a profile shows the model's parts."""
    from qwenjax.train.loss import next_token_loss

    m = qwenjax.from_config(load_config("configs/tiny-moe.json"), seed=0)
    ids = np.arange(16)[None]

    def loss(params):
        total, count = next_token_loss(qwenjax.forward(m.graphdef, params, ids), ids)
        return total / count

    hlo = jax.jit(loss).lower(m.params).as_text(debug_info=True)  # op locations carry the scopes
    scopes = {part for name in re.findall(r'loc\("([^"]+)"', hlo) for part in name.split("/")[:-1]}
    want = {"embedding", "gated_deltanet", "gated_delta_rule", "attention", "dot_product_attention", "moe",
            "moe_dispatch", "lm_head", "loss"}
    assert want <= scopes, sorted(want - scopes)
