"""The multi-token-prediction head (`mtp.*`): its logits against a reference assembled from transformers' own
Qwen3.5 modules, the round trip of its tensors, and the error for a model without one."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwenjax
from qwenjax import _compat
from qwenjax.checkpoint.hf import hf_key
from qwenjax.checkpoint.safetensors_io import SafetensorsFile
from qwenjax.cli import main
from qwenjax.demo import byte_tokenizer, write_tokenizer
from qwenjax.train.lora import LoRAConfig, add_lora
from qwenjax.train.step import TrainConfig, accumulated_gradients, split_trainable
from qwenjax.testing import TINY_MOE, add_mtp_tensors_, hf_mtp_head, make_hf_checkpoint, set_mtp_layers_


def reference_mtp_logits(hf, head, ids: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """vLLM's formula with transformers' modules: row p reads token p+1's embedding and the main model's final
    hidden state (after its norm) at p, at rotary position p, causally over the rows of real tokens. Differentiable
    in the head's parameters."""
    ids_t, mask_t = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask)
    with torch.no_grad():
        hidden = hf.model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
        embeds = hf.model.embed_tokens(ids_t[:, 1:])
    e = head.pre_fc_norm_embedding(embeds)
    u = head.fc(torch.cat([e, head.pre_fc_norm_hidden(hidden[:, :-1])], dim=-1))
    b, t = u.shape[:2]
    positions = torch.arange(t)[None].expand(b, t)
    cos_sin = hf.model.rotary_emb(u, positions)
    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool))[None] & mask_t[:, None, 1:].bool()
    additive = torch.zeros(b, 1, t, t).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    x = head.layers[0](u, position_embeddings=cos_sin, attention_mask=additive, position_ids=positions)
    with torch.no_grad():
        lm_head = hf.lm_head.weight.clone()
    return head.norm(x) @ lm_head.T


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (2, 19))
    mask = np.ones_like(ids)
    mask[1, 11:] = 0  # a shorter row, right padded
    return ids, mask


@pytest.fixture(scope="module", params=["dense", "moe"])
def mtp_checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"mtp-{request.param}")
    overrides = {"num_experts": TINY_MOE["num_experts"]} if request.param == "moe" else {}
    hf = make_hf_checkpoint(path, seed=3, **overrides)
    head = hf_mtp_head(hf.config, seed=4)
    add_mtp_tensors_(path, head)
    return path, hf, head


def test_mtp_logits_match_transformers_modules(mtp_checkpoint):
    path, hf, head = mtp_checkpoint
    m = qwenjax.from_pretrained(path, dtype="float32")
    ids, mask = _batch()
    ours = np.asarray(qwenjax.mtp_logits(m, ids, mask))
    with torch.no_grad():
        want = reference_mtp_logits(hf, head, ids, mask).numpy()
    assert ours.shape == (2, 18, 256)
    real = mask[:, 1:].astype(bool)  # row p is real when token p+1 is
    err = np.abs(ours - want)[real].max()
    assert err <= 1e-4, f"max abs error {err:.2e} against the reference"
    assert np.abs(want[real]).max() > 1.0  # logits of a size where errors would show


def test_mtp_tensors_export_byte_identical(mtp_checkpoint, tmp_path):
    path, _, _ = mtp_checkpoint
    m = qwenjax.from_pretrained(path, dtype="float32")
    assert not m.aside  # modelled, not kept aside
    out = qwenjax.export_hf(m, tmp_path / "out")
    src, dst = SafetensorsFile(os.path.join(path, "model.safetensors")), SafetensorsFile(
        os.path.join(out, "model.safetensors"))
    names = [k for k in src.keys() if k.startswith("mtp.")]
    assert names and set(names) <= set(dst.keys())
    for k in names:
        assert src.get(k).tobytes() == dst.get(k).tobytes(), k


def test_a_checkpoint_without_mtp_tensors_loads_and_mtp_logits_says_why(tmp_path):
    make_hf_checkpoint(tmp_path, seed=1)  # save_pretrained writes no mtp.* tensors
    set_mtp_layers_(tmp_path, 1)  # while the config counts one MTP layer, as a released config does
    m = qwenjax.from_pretrained(tmp_path, dtype="float32")
    assert m.config.mtp_num_hidden_layers == 0 and "mtp" not in m.params
    with pytest.raises(ValueError, match=r"no MTP head.*mtp\.\* tensors"):
        qwenjax.mtp_logits(m, [[1, 2, 3]])


def test_with_mtp_head_adds_a_head_and_replaces_one_only_when_asked(tmp_path):
    from qwenjax.pretrained import with_mtp_head

    make_hf_checkpoint(tmp_path, seed=1)
    m = with_mtp_head(qwenjax.from_pretrained(tmp_path, dtype="float32"), seed=0)
    assert m.config.mtp_num_hidden_layers == 1
    assert qwenjax.mtp_logits(m, [[1, 2, 3]]).shape == (1, 2, m.config.vocab_size)
    with pytest.raises(ValueError, match="already has an MTP head"):
        with_mtp_head(m, seed=1)
    fresh = with_mtp_head(m, seed=1, replace=True)
    old, new = (jax.tree.leaves(x.params["mtp"]) for x in (m, fresh))
    assert [a.shape for a in old] == [b.shape for b in new]
    assert not np.allclose(m.params["mtp"]["fc"]["weight"][...], fresh.params["mtp"]["fc"]["weight"][...])
    np.testing.assert_array_equal(m.params["norm"]["weight"][...], fresh.params["norm"]["weight"][...])


def _mtp_gradients(m, batch, cfg):
    params, frozen = split_trainable(m.params, cfg)
    run = jax.jit(lambda p, f, b: accumulated_gradients(m.graphdef, cfg, p, b, f))
    grads, _, _, mtp_loss = run(params, frozen, {k: jnp.asarray(v)[None] for k, v in batch.items()})
    return {hf_key(path, "").removeprefix("mtp."): np.asarray(_compat.variable_value(g))
            for path, g in _compat.variable_items(grads)}, float(mtp_loss)


def test_mtp_loss_gradient_matches_torch_autograd(mtp_checkpoint):
    """The MTP loss (cross-entropy of token t+2, mean over the counted tokens) and its gradient in every MTP
    parameter against torch autograd through the reference head; `mtp_only` trains nothing else."""
    path, hf, head = mtp_checkpoint
    m = qwenjax.from_pretrained(path, dtype="float32")
    ids, mask = _batch()
    loss_mask = np.ones_like(ids)
    loss_mask[0, :6] = 0  # a prompt: its tokens are no targets
    grads, mtp_loss = _mtp_gradients(m, dict(input_ids=ids, attention_mask=mask, loss_mask=loss_mask),
                                     TrainConfig(mtp_weight=1.0, mtp_only=True))

    head.zero_grad()
    logits = reference_mtp_logits(hf, head, ids, mask)[:, :-1]  # row p predicts token p+2
    weight = torch.as_tensor((mask * loss_mask)[:, 2:], dtype=torch.float32)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.as_tensor(ids[:, 2:]), reduction="none")
    want_loss = (nll * weight).sum() / weight.sum()
    want_loss.backward()
    assert mtp_loss == pytest.approx(float(want_loss.detach()), rel=1e-5)
    want = {name: p.grad.numpy() for name, p in head.named_parameters()}
    assert set(grads) == set(want)  # every MTP parameter, and nothing of the main model
    for name, g in grads.items():
        assert g.shape == want[name].shape, name
        rel = np.abs(g - want[name]).max() / np.abs(want[name]).max()
        assert rel <= 1e-4, f"{name}: relative gradient error {rel:.2e}"


def test_mtp_loss_packed_equals_unpacked(mtp_checkpoint):
    """Two documents packed in one row give the MTP loss and gradient of the two as separate rows: no row of
    the head reads across the boundary, and no target straddles it."""
    path, _, _ = mtp_checkpoint
    m = qwenjax.from_pretrained(path, dtype="float32")
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 256, 13), rng.integers(0, 256, 9)
    rows = np.zeros((2, 13), np.int64)
    rows[0], rows[1, :9] = a, b
    mask = (np.arange(13) < np.array([[13], [9]])).astype(np.int64)
    packed = dict(input_ids=np.concatenate([a, b])[None], segment_ids=np.repeat([1, 2], [13, 9])[None])
    cfg = TrainConfig(mtp_weight=1.0, mtp_only=True)
    g_rows, loss_rows = _mtp_gradients(m, dict(input_ids=rows, attention_mask=mask), cfg)
    g_packed, loss_packed = _mtp_gradients(m, packed, cfg)
    assert loss_packed == pytest.approx(loss_rows, rel=1e-5)
    for name in g_rows:
        np.testing.assert_allclose(g_packed[name], g_rows[name], atol=1e-5 * np.abs(g_rows[name]).max(), err_msg=name)


def test_mtp_weight_needs_an_mtp_head(tmp_path):
    make_hf_checkpoint(tmp_path, seed=1)
    m = qwenjax.from_pretrained(tmp_path, dtype="float32")
    with pytest.raises(ValueError, match="mtp_weight=0.5: this model has no MTP head"):
        split_trainable(m.params, TrainConfig(mtp_weight=0.5))
    with pytest.raises(ValueError, match="mtp_weight=0.0 must be >= 0, and > 0 with mtp_only"):
        TrainConfig(mtp_only=True)


def test_finetune_cli_train_mtp_trains_the_head_alone(tmp_path):
    """`qwenjax finetune --train mtp`: the MTP loss falls, the export carries a new head and every other tensor
    byte for byte as loaded."""
    tok = byte_tokenizer()
    model = tmp_path / "model"
    hf = make_hf_checkpoint(model, seed=3, vocab_size=-(-tok.get_vocab_size() // 64) * 64)
    add_mtp_tensors_(model, hf_mtp_head(hf.config, seed=4))
    write_tokenizer(model, tok)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": "abcabc abcabc abcabc " * 3}) + "\n" for _ in range(16)))
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--train", "mtp",
                 "--steps", "8", "--lr", "1e-2", "--warmup", "1", "--pack-len", "64", "--rows", "2",
                 "--dtype", "float32"]) == 0
    with open(out / "metrics.jsonl") as f:
        mtp_losses = [json.loads(line)["mtp_loss"] for line in f]
    assert len(mtp_losses) == 8 and mtp_losses[-1] < 0.7 * mtp_losses[0], mtp_losses
    src = SafetensorsFile(os.path.join(model, "model.safetensors"))
    dst = SafetensorsFile(os.path.join(out, "export", "model.safetensors"))
    assert set(src.keys()) == set(dst.keys())
    for k in src.keys():
        same = src.get(k).tobytes() == dst.get(k).tobytes()
        assert same != k.startswith("mtp."), f"{k}: {'unchanged' if same else 'changed'}"


def test_lora_adapters_on_the_mtp_head_learn_from_its_loss(mtp_checkpoint):
    path, _, _ = mtp_checkpoint
    m = add_lora(qwenjax.from_pretrained(path, dtype="float32"), LoRAConfig(rank=2, targets=("fc", "q_proj")))
    ids, mask = _batch()
    grads, _ = _mtp_gradients(m, dict(input_ids=ids, attention_mask=mask), TrainConfig(mtp_weight=1.0))
    assert np.abs(grads["fc.lora.b"]).max() > 0 and np.abs(grads["layers.0.self_attn.q_proj.lora.b"]).max() > 0
    assert np.abs(grads["layers.3.self_attn.q_proj.lora.b"]).max() > 0  # the main model's (layer 3) learn too
