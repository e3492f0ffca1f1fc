"""The training loss: gradients against transformers' autograd, and packed rows against documents run alone."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import qwenjax
from qwenjax import _compat
from qwenjax.checkpoint.hf import hf_key
from qwenjax.pretrained import forward
from qwenjax.train.loss import next_token_loss, token_losses

torch = pytest.importorskip("torch")
from qwenjax.testing import make_hf_checkpoint  # noqa: E402


def _mean_loss(graphdef, ids, **masks):
    def loss(params):
        logits = forward(graphdef, params, ids, masks.get("attention_mask"), segment_ids=masks.get("segment_ids"))
        total, count = next_token_loss(logits, ids, **masks)
        return total / count
    return loss


@pytest.mark.parametrize("tied", [False, True])
def test_gradients_match_transformers_autograd(tmp_path, tied):
    hf = make_hf_checkpoint(tmp_path, seed=5, tie_word_embeddings=tied)
    m = qwenjax.from_pretrained(tmp_path, dtype="float32")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, m.config.vocab_size, (2, 80))  # crosses the 64-token chunk
    loss_mask = (rng.random((2, 80)) < 0.7).astype(np.int32)  # e.g. assistant tokens only

    value, grads = jax.jit(jax.value_and_grad(_mean_loss(m.graphdef, jnp.asarray(ids),
                                                         loss_mask=jnp.asarray(loss_mask))))(m.params)

    hf.train()
    hf.zero_grad()
    logits = hf(input_ids=torch.as_tensor(ids)).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            torch.as_tensor(ids[:, 1:]).reshape(-1), reduction="none")
    w = torch.as_tensor(loss_mask[:, 1:], dtype=torch.float32).reshape(-1)
    ref_loss = (nll * w).sum() / w.sum()
    ref_loss.backward()
    ref = {name: p.grad.numpy() for name, p in hf.named_parameters()}

    assert abs(float(value) - ref_loss.item()) < 1e-5 * abs(ref_loss.item())
    worst, seen = {}, set()
    for path, g in _compat.variable_items(grads):
        key = hf_key(path, "model.")
        got, want = np.asarray(_compat.variable_value(g)), ref[key]
        assert got.shape == want.shape, key
        worst[key] = np.linalg.norm(got - want) / np.linalg.norm(want)
        seen.add(key)
    assert seen == set(ref), set(ref) ^ seen
    kinds = {"linear_attn.in_proj_qkv", "linear_attn.in_proj_a", "linear_attn.A_log", "linear_attn.conv1d",
             "linear_attn.norm", "self_attn.q_proj", "self_attn.k_norm", "mlp.down_proj", "embed_tokens"}
    for kind in kinds:  # GDN and attention parameters alike are in the comparison
        assert any(kind in k for k in worst), kind
    bad = {k: v for k, v in worst.items() if not v < 1e-4}
    assert not bad, bad


DOCS = (37, 64, 1, 50)  # a document ends inside a chunk, one fills a chunk, one has a single token
PACK_LEN = 160


def _packed_case(vocab, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, n) for n in DOCS]
    ids = np.zeros((1, PACK_LEN), np.int64)
    seg = np.zeros((1, PACK_LEN), np.int32)  # padding after the documents: id 0, masked out
    mask = np.zeros((1, PACK_LEN), np.int32)
    seg_id = (5, 3, 5, 7)  # a reused id (5) still starts a new document: documents follow id *changes*
    at = 0
    for d, s in zip(docs, seg_id):
        ids[0, at:at + len(d)], seg[0, at:at + len(d)], mask[0, at:at + len(d)] = d, s, 1
        at += len(d)
    return docs, ids, seg, mask


def test_packed_row_equals_documents_alone(tmp_path):
    make_hf_checkpoint(tmp_path, seed=9)
    m = qwenjax.from_pretrained(tmp_path, dtype="float32")
    docs, ids, seg, mask = _packed_case(m.config.vocab_size)

    @jax.jit
    def losses_and_grads(params, ids, mask, seg):
        def total(params):
            logits = forward(m.graphdef, params, ids, mask, segment_ids=seg)
            nll, weight = token_losses(logits, ids, attention_mask=mask, segment_ids=seg)
            return jnp.sum(nll * weight), (nll, weight)
        return jax.grad(total, has_aux=True)(params)

    packed_grads, (nll, weight) = losses_and_grads(m.params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(seg))
    nll, weight = np.asarray(nll)[0], np.asarray(weight)[0]

    # The documents alone: one per row, right-padded (padding is masked out and never a target).
    width = max(DOCS)
    alone_ids = np.zeros((len(docs), width), np.int64)
    alone_mask = np.zeros((len(docs), width), np.int32)
    for r, d in enumerate(docs):
        alone_ids[r, :len(d)], alone_mask[r, :len(d)] = d, 1
    alone_grads, (nll_alone, w_alone) = losses_and_grads(m.params, jnp.asarray(alone_ids), jnp.asarray(alone_mask),
                                                          None)
    at = 0
    for r, d in enumerate(docs):
        n = len(d) - 1  # predictions inside the document; the one from its last token to the next is not counted
        np.testing.assert_allclose(nll[at:at + n], np.asarray(nll_alone)[r, :n], rtol=0, atol=2e-5)
        assert weight[at:at + n].tolist() == np.asarray(w_alone)[r, :n].tolist() == [1.0] * n
        if at + n < len(weight):
            assert weight[at + n] == 0  # across the boundary (or into padding)
        at += len(d)
    assert weight[at - 1:].sum() == 0

    for (path, a), (_, b) in zip(_compat.variable_items(packed_grads), _compat.variable_items(alone_grads)):
        a, b = np.asarray(_compat.variable_value(a)), np.asarray(_compat.variable_value(b))
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b), path  # fp32 relative, as for the HF gradients


def test_documents_and_positions():
    from qwenjax.model.qwen35 import documents_and_positions

    seg = jnp.asarray([[5, 5, 3, 3, 3, 5, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    docs, pos = documents_and_positions(seg)
    assert np.asarray(docs).tolist() == [[1, 1, 2, 2, 2, 3, 4, 4], [1] * 8]
    assert np.asarray(pos).tolist() == [[0, 1, 0, 1, 2, 0, 0, 1], list(range(8))]
