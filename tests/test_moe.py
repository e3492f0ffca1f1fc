"""Qwen3.5-MoE against transformers' `Qwen3_5MoeForCausalLM`: gradients, the auxiliary loss, both expert
checkpoint layouts on load and export; the dropless dispatch against a dense reference; expert parallelism on 8
fake CPU devices against one device."""

import json
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import qwenjax
from qwenjax import _compat
from qwenjax.checkpoint.hf import CheckpointError, hf_key
from qwenjax.config import ConfigError
from qwenjax.model.moe import RouterStats
from qwenjax.ops.moe import combine_tokens, gather_tokens, moe_experts, route, sort_by_expert
from qwenjax.pretrained import forward
from qwenjax.sharding import activation_sharding
from qwenjax.train.loss import load_balancing_loss, next_token_loss, router_z_loss
from qwenjax.train.step import TrainConfig, accumulated_gradients, init_state, jit_train_step

torch = pytest.importorskip("torch")
from qwenjax.testing import gradient_errors, hf_logits, make_hf_checkpoint  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

TOL = 1e-4  # max abs on logits of magnitude ~5, as the parity tests (tests/test_parity_hf.py holds the MoE cases)


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    """16 experts top-4 over 8 layers, and a batch with padding (rows of 90, 61 and 7 tokens)."""
    path = tmp_path_factory.mktemp("moe-e16-top4")
    hf = make_hf_checkpoint(path, seed=3, num_experts=16, num_experts_per_tok=4, num_hidden_layers=8)
    lengths = np.array([90, 61, 7])
    ids = np.random.default_rng(1).integers(0, 256, (len(lengths), lengths.max()))
    mask = (np.arange(lengths.max())[None] < lengths[:, None]).astype(np.int64)
    return path, hf, ids, mask


def _hf_router_logits(hf, ids, mask):
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_router_logits=True)
    return out.router_logits


def test_aux_loss_matches_transformers_formula(moe_checkpoint):
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import load_balancing_loss_func

    path, hf, ids, mask = moe_checkpoint
    cfg = qwenjax.load_config(path)
    router_logits = _hf_router_logits(hf, ids, mask)
    assert len(router_logits) == cfg.num_hidden_layers
    for attention_mask in (None, mask):
        want = float(load_balancing_loss_func(router_logits, cfg.num_experts, cfg.num_experts_per_tok,
                                              None if attention_mask is None else torch.as_tensor(attention_mask)))
        stats = None
        for layer_logits in router_logits:  # the same router logits, through our stats
            logits = jnp.asarray(layer_logits.numpy())
            experts = jax.lax.top_k(jax.nn.softmax(logits), cfg.num_experts_per_tok)[1]
            valid = None if attention_mask is None else jnp.asarray(attention_mask.reshape(-1))
            layer = RouterStats.of(logits, experts, valid)
            stats = layer if stats is None else stats + layer
        got = float(load_balancing_loss(stats))
        assert abs(got - want) < 1e-6 * want, (got, want)
        assert got > 1.0  # E · Σ f·P >= k-ish for random routing: the loss is not trivially zero

    # the model's own stats (its own router logits) give the same loss
    m = qwenjax.from_pretrained(path, dtype="float32")
    _, stats = jax.jit(lambda p: forward(m.graphdef, p, jnp.asarray(ids), jnp.asarray(mask), router_stats=True))(
        m.params)
    want = float(load_balancing_loss_func(router_logits, cfg.num_experts, cfg.num_experts_per_tok,
                                          torch.as_tensor(mask)))
    assert abs(float(load_balancing_loss(stats)) - want) < 1e-5 * want
    z = np.mean([np.mean(torch.logsumexp(r, -1).numpy()[mask.reshape(-1).astype(bool)] ** 2)
                 for r in router_logits])
    assert abs(float(router_z_loss(stats)) - z) < 1e-5 * z


def test_gradients_match_transformers_autograd(tmp_path):
    hf = make_hf_checkpoint(tmp_path, seed=7, num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.05)
    m = qwenjax.from_pretrained(tmp_path, dtype="float32")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, m.config.vocab_size, (2, 80))

    def loss(params):  # what the train step minimises for one batch
        logits, stats = forward(m.graphdef, params, jnp.asarray(ids), router_stats=True)
        total, count = next_token_loss(logits, jnp.asarray(ids))
        return total / count + m.config.router_aux_loss_coef * load_balancing_loss(stats)

    value, grads = jax.jit(jax.value_and_grad(loss))(m.params)

    hf.train()
    hf.zero_grad()
    out = hf(input_ids=torch.as_tensor(ids), labels=torch.as_tensor(ids), output_router_logits=True)
    out.loss.backward()  # cross-entropy + router_aux_loss_coef · aux, as transformers trains
    ref = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    assert abs(float(value) - out.loss.item()) < 1e-5 * out.loss.item()
    worst = {}
    for path, g in _compat.variable_items(grads):
        key = hf_key(path, "model.")
        got = np.asarray(_compat.variable_value(g))
        assert got.shape == ref[key].shape, key
        worst[key] = np.linalg.norm(got - ref[key]) / np.linalg.norm(ref[key])
    assert set(worst) == set(ref), set(worst) ^ set(ref)
    for kind in ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.shared_expert_gate",
                 "mlp.shared_expert.up_proj", "linear_attn.in_proj_qkv", "self_attn.q_proj"):
        assert any(kind in k for k in worst), kind
    bad = {k: v for k, v in worst.items() if not v < 1e-4}
    assert not bad, bad


@pytest.mark.parametrize("fused", [False, True])
def test_export_writes_the_source_layout_bit_for_bit(tmp_path, fused):
    src = tmp_path / "src"
    make_hf_checkpoint(src, seed=3, num_experts=8, fused_experts=fused, dtype="bfloat16")
    m = qwenjax.from_pretrained(src, dtype="float32")
    out = qwenjax.export_hf(m, tmp_path / "out")
    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert sorted(a) == sorted(b)
    assert any(k.endswith("experts.gate_up_proj") for k in b) == fused
    assert any(k.endswith("experts.7.up_proj.weight") for k in b) != fused
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def test_from_config_export_is_read_by_transformers(tmp_path):
    from transformers import Qwen3_5MoeForCausalLM

    cfg = qwenjax.load_config("configs/tiny-moe.json")
    m = qwenjax.from_config(cfg, dtype="float32", seed=2)
    out = qwenjax.export_hf(m, tmp_path / "out")
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == ["Qwen3_5MoeForCausalLM"]
    hf = Qwen3_5MoeForCausalLM.from_pretrained(out).eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
    assert np.abs(np.asarray(m(ids)) - hf_logits(hf, ids)).max() < TOL


def test_bad_expert_tensors_are_named(tmp_path):
    make_hf_checkpoint(tmp_path, seed=0, num_experts=8)
    file = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    down = "model.layers.2.mlp.experts.3.down_proj.weight"
    tensors[down] = tensors[down][:, :40]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        qwenjax.from_pretrained(tmp_path, dtype="float32")
    assert "model.layers.1.mlp.experts.5.up_proj.weight" in str(e.value)
    assert "'model.layers.2.mlp.experts.3.down_proj.weight' has shape [64, 40], expected [64, 48]" in str(e.value)


def test_config_needs_a_shared_expert():
    cfg = qwenjax.load_config("configs/tiny-moe.json")
    with pytest.raises(ConfigError, match="shared_expert_intermediate_size"):
        cfg.replace(shared_expert_intermediate_size=0)
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        cfg.replace(num_experts_per_tok=cfg.num_experts + 1)


# ---- the dispatch ------------------------------------------------------------------------------------------------
def _dense_reference(x, routing, gate_up, down):
    """Every expert on every token, weighted by the (mostly zero) routing weights: no sorting at all."""
    e, two_i, _ = gate_up.shape
    h = jnp.einsum("nh,eoh->neo", x, gate_up, precision="highest")
    a = jax.nn.silu(h[..., :two_i // 2]) * h[..., two_i // 2:]
    y = jnp.einsum("nei,ehi->neh", a, down, precision="highest")
    w = jnp.sum(jax.nn.one_hot(routing.experts, e) * routing.weights[..., None], axis=1)  # [N, E]
    return jnp.einsum("neh,ne->nh", y, w, precision="highest")


def _dispatch_case(n=37, h=16, i=12, e=6, k=2, skew=True, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (n, h))
    router = jax.random.normal(keys[1], (e, h))
    if skew:  # experts 1 and 4 never chosen: empty groups
        router = router.at[jnp.array([1, 4])].set(-10 * jnp.abs(router[jnp.array([1, 4])]))
        x = jnp.abs(x)
    gate_up = jax.random.normal(keys[2], (e, 2 * i, h)) / h ** 0.5
    down = jax.random.normal(keys[3], (e, h, i)) / i ** 0.5
    return x, router, gate_up, down, k


def test_dispatch_equals_dense_reference_forward_and_backward():
    x, router, gate_up, down, k = _dispatch_case()
    routing = route(x, router, k)
    counts = np.bincount(np.asarray(routing.experts).ravel(), minlength=router.shape[0])
    assert counts[1] == counts[4] == 0 and (counts % 8 != 0).any()  # empty groups, sizes off any tile

    def ours(x, gate_up, down, router):
        r = route(x, router, k)
        return moe_experts(x, r, gate_up, down)

    def ref(x, gate_up, down, router):
        return _dense_reference(x, route(x, router, k), gate_up, down)

    np.testing.assert_allclose(ours(x, gate_up, down, router), ref(x, gate_up, down, router), atol=2e-6, rtol=0)
    ct = jax.random.normal(jax.random.key(9), x.shape)
    g1 = jax.grad(lambda *a: jnp.sum(ours(*a) * ct), argnums=(0, 1, 2, 3))(x, gate_up, down, router)
    g2 = jax.grad(lambda *a: jnp.sum(ref(*a) * ct), argnums=(0, 1, 2, 3))(x, gate_up, down, router)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()), rtol=0)


def test_permutation_gradients_are_gathers_and_exact():
    x, router, _, _, k = _dispatch_case(n=23, seed=2)
    r = route(x, router, k)
    order, inverse, _ = sort_by_expert(r.experts, router.shape[0])
    plain_gather = lambda x: jnp.take(x, order // k, axis=0)
    ys = jax.random.normal(jax.random.key(3), (order.shape[0], x.shape[1]))
    plain_combine = lambda ys, w: jnp.einsum("nkh,nk->nh", ys[inverse].reshape(*w.shape, -1), w)
    ct = jax.random.normal(jax.random.key(4), x.shape)
    cs = jax.random.normal(jax.random.key(5), ys.shape)
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(gather_tokens(x, order, inverse) * cs))(x),
                               jax.grad(lambda x: jnp.sum(plain_gather(x) * cs))(x), atol=1e-6)
    ga = jax.grad(lambda ys, w: jnp.sum(combine_tokens(ys, w, order, inverse) * ct), argnums=(0, 1))(ys, r.weights)
    gb = jax.grad(lambda ys, w: jnp.sum(plain_combine(ys, w) * ct), argnums=(0, 1))(ys, r.weights)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # the backward pass holds no scatter: the custom VJPs gather
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, ys, w: jnp.sum(gather_tokens(x, order, inverse) * cs)
                                    + jnp.sum(combine_tokens(ys, w, order, inverse) * ct), argnums=(0, 1, 2)))(
        x, ys, r.weights)
    assert "scatter" not in str(jaxpr)


# ---- expert parallelism ------------------------------------------------------------------------------------------
EP_SPECS = ["expert=8", "fsdp=2,expert=4", "data=2,tensor=2,expert=2"]


@pytest.mark.parametrize("method", ["allgather", "ragged_all_to_all_emulated"])
@pytest.mark.parametrize("spec", EP_SPECS)
def test_expert_parallel_forward_equals_single_device(spec, method):
    cfg = qwenjax.load_config("configs/tiny-moe.json")
    single = qwenjax.from_config(cfg, dtype="float32", seed=4)
    sharded = qwenjax.from_config(cfg, dtype="float32", seed=4, mesh=spec,
                                  kernels=qwenjax.Kernels(expert_parallel=method))
    w = sharded.params["layers"][0]["mlp"]["experts"]["gate_up_proj"][...]
    expert = dict(p.split("=") for p in spec.split(","))["expert"]
    assert w.addressable_shards[0].data.shape[0] == cfg.num_experts // int(expert)  # experts really split
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (8, 40))
    mask = np.ones_like(ids)
    mask[3, 25:] = 0
    np.testing.assert_allclose(np.asarray(sharded(ids, mask)), np.asarray(single(ids, mask)), atol=2e-5, rtol=0)
    with activation_sharding(sharded.mesh):
        jaxpr = str(jax.make_jaxpr(lambda p: forward(sharded.graphdef, p, jnp.asarray(ids)))(sharded.params))
    assert ("all_to_all" in jaxpr) == (method != "allgather")  # the method asked for is the one that ran


@pytest.mark.parametrize("method", ["allgather", "ragged_all_to_all_emulated"])
def test_expert_parallel_train_step_equals_single_device(method):
    cfg = qwenjax.load_config("configs/tiny-moe.json")
    train = TrainConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10, router_z_loss_coef=1e-3)
    rng = np.random.default_rng(1)
    batch = {"input_ids": jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 8, 48)), jnp.int32)}
    results = []
    for spec in (None, "fsdp=2,expert=4"):
        m = qwenjax.from_config(cfg, dtype="float32", seed=5, mesh=spec,
                                kernels=qwenjax.Kernels(expert_parallel=method))
        mesh = None if spec is None else m.mesh

        def grads(params):
            with activation_sharding(mesh):
                return accumulated_gradients(m.graphdef, train, params, batch)[0]

        g = jax.device_get(jax.jit(grads)(m.params))
        state = init_state(m.params, train)
        step = jit_train_step(m.graphdef, train, mesh=mesh)
        losses = []
        for _ in range(3):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        results.append((g, losses))
    (g1, l1), (g2, l2) = results
    # Gradients, not updated weights: Adam divides tiny gradients by their own size, which turns summation-order
    # noise into full-size update differences on a few elements.
    # The GDN gates' gradients (A_log, dt_bias: 4 numbers summed over every token, with heavy cancellation) move
    # by up to 3e-4 relative with any change of batch split, dense fsdp=8 included: they count in the total only.
    per, overall = gradient_errors(g2, g1)
    assert overall < 1e-5, overall
    bad = {k: v for k, v in per.items() if "mlp" in k and not v < 1e-5}
    assert not bad, bad
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    assert l1[2] < l1[0]  # it learns
