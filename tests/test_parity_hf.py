"""Logit parity with the reference implementation (transformers' Qwen3.5) on small random checkpoints.

Each checkpoint is written by transformers' own `save_pretrained` (the real layout) and loaded by qwenjax from disk.
Batches use right padding with an attention mask; every valid position must match within 1e-4 (fp32).
"""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import qwenjax  # noqa: E402
from qwenjax.testing import TINY_TEXT, hf_logits, make_hf_checkpoint  # noqa: E402

TOL = 1e-4  # max abs on logits of magnitude ~5-10; measured error ~2e-5 (the reference's own fp32 noise)

CASES = {
    # GDN value heads = key heads, untied, text-only layout (`model.*`), T=300 (causal attention in blocks)
    "gva1-untied-text": dict(multimodal=False, linear_num_key_heads=2, linear_num_value_heads=2, seq=300),
    # GVA 2x, tied embeddings, multimodal layout (`model.language_model.*`, visual tensors present), T=130
    "gva2-tied-multimodal": dict(multimodal=True, tie_word_embeddings=True, seq=130),
    # GVA 3x, untied, two scanned blocks (8 layers), T=97
    "gva3-untied-8layers": dict(linear_num_key_heads=2, linear_num_value_heads=6, num_hidden_layers=8, seq=97),
    # A different block pattern (linear, linear, full) x 2, MQA, wider heads, tied, T=65
    "pattern3-mqa-tied": dict(multimodal=True, num_hidden_layers=6, num_key_value_heads=1, head_dim=64,
                              hidden_size=96, tie_word_embeddings=True, seq=65,
                              layer_types=["linear_attention", "linear_attention", "full_attention"] * 2),
    # Qwen3.5-MoE (routed + gated shared experts in every layer): 8 experts top-2, GVA 2, experts stored one tensor
    # each (save_pretrained's layout), T=70
    "moe-e8-top2-gva2": dict(num_experts=8, seq=70),
    # 16 experts top-4, GVA 3, 8 layers, experts stacked (`mlp.experts.gate_up_proj`), T=97
    "moe-e16-top4-gva3-fused": dict(num_experts=16, num_experts_per_tok=4, linear_num_key_heads=2,
                                    linear_num_value_heads=6, num_hidden_layers=8, fused_experts=True, seq=97),
    # 8 experts top-4, GVA 1, tied embeddings, multimodal layout, T=130
    "moe-e8-top4-gva1-tied-multimodal": dict(num_experts=8, num_experts_per_tok=4, linear_num_key_heads=2,
                                             linear_num_value_heads=2, tie_word_embeddings=True, multimodal=True,
                                             seq=130),
    # YaRN (factor 4 over an original length of 64) on partial interleaved mRoPE, prompts well past 64; T=200
    "yarn-factor4-orig64": dict(rope_parameters={**TINY_TEXT["rope_parameters"], "rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 64},
                                max_position_embeddings=256, seq=200),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    spec = dict(CASES[request.param])
    seq = spec.pop("seq")
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_checkpoint(path, seed=len(request.param), **spec)
    return request.param, path, hf, seq


def _batch(seq, vocab, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (3, seq))
    mask = np.ones((3, seq), np.int64)
    mask[1, seq - 20:] = 0   # right padding
    mask[2, 5:] = 0          # a very short row
    return ids, mask


def test_logits_match_transformers(case):
    name, path, hf, seq = case
    m = qwenjax.from_pretrained(path, dtype="float32")
    ids, mask = _batch(seq, m.config.vocab_size, seed=seq)
    ours = np.asarray(m(ids, attention_mask=mask))
    ref = hf_logits(hf, ids, mask)
    assert ours.shape == ref.shape == (3, seq, m.config.vocab_size)
    valid = mask.astype(bool)
    err = np.abs(ours - ref)[valid].max()
    assert np.abs(ref).max() > 1.0, "degenerate checkpoint: logits too small to test anything"
    assert err < TOL, f"{name}: max abs logit error {err:.3g} >= {TOL}"


def test_no_mask_equals_all_ones_mask(case):
    _, path, hf, seq = case
    m = qwenjax.from_pretrained(path, dtype="float32")
    ids, _ = _batch(seq, m.config.vocab_size, seed=1)
    a = np.asarray(m(ids))
    b = np.asarray(m(ids, attention_mask=np.ones_like(ids)))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - hf_logits(hf, ids)).max() < TOL
