"""Sharded forwards (8 fake CPU devices) equal the single-device forward; the rules table refuses collisions."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import qwenjax
from qwenjax.config import load_config
from qwenjax.sharding import ShardingRules, make_mesh, parse_mesh_spec


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/tiny-gva3-8layers.json")


@pytest.mark.parametrize("spec", ["fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2", "tensor=8"])
def test_sharded_forward_equals_single_device(cfg, spec):
    single = qwenjax.from_config(cfg, dtype="float32", seed=3)
    sharded = qwenjax.from_config(cfg, dtype="float32", seed=3, mesh=spec)
    # the parameters really are spread over the mesh
    w = sharded.params["layers"][0]["mlp"]["gate_proj"]["weight"][...]
    assert len(w.sharding.device_set) == 8
    assert w.sharding.spec == P("tensor", "fsdp") if "fsdp=4" in spec else True
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (4, 70))
    mask = np.ones_like(ids)
    mask[3, 40:] = 0
    a = np.asarray(single(ids, mask))
    b = sharded(ids, mask)
    assert len(b.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(b), a, atol=2e-5, rtol=0)


def test_rules_refuse_two_logical_axes_on_one_mesh_axis():
    rules = ShardingRules({"a": "tensor", "b": "tensor"})
    with pytest.raises(ValueError, match="same mesh axis 'tensor'"):
        rules.spec(("a", "b"))


def test_rules_unknown_axis_and_indivisible_dims():
    rules = ShardingRules()
    with pytest.raises(KeyError, match="no sharding rule"):
        rules.spec(("nonexistent",))
    if len(jax.devices()) >= 8:
        mesh = make_mesh("fsdp=4,tensor=2")
        assert rules.spec(("vocab", "embed"), (256, 64), mesh) == P("tensor", "fsdp")
        assert rules.spec(("vocab", "embed"), (255, 64), mesh) == P(None, "fsdp")  # 255 % 2: replicated


def test_mesh_spec_parsing():
    assert parse_mesh_spec("data=1,fsdp=4,tensor=2") == {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}
    with pytest.raises(ValueError, match="unknown axis 'pipeline'"):
        parse_mesh_spec("pipeline=2")
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh("fsdp=16", jax.devices()[:1])
