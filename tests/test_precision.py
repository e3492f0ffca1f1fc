"""bf16 forward against the fp32 forward of the same checkpoint."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import qwenjax  # noqa: E402
from qwenjax.testing import make_hf_checkpoint  # noqa: E402

# bf16 weights and activations (fp32 norms, gates, GDN state, softmax, accumulation): logits of magnitude ~5-10
# stay within this of fp32 (bf16 has an 8-bit mantissa: ~0.4% per rounding, through 8 layers).
BF16_MAX_ABS = 0.25
BF16_MEAN_ABS = 0.03


def test_bf16_forward_close_to_fp32(tmp_path):
    make_hf_checkpoint(tmp_path, num_hidden_layers=8, linear_num_value_heads=6, dtype="bfloat16")
    ids = np.random.default_rng(0).integers(0, 256, (2, 100))
    ref = np.asarray(qwenjax.from_pretrained(tmp_path, dtype="float32")(ids))
    m16 = qwenjax.from_pretrained(tmp_path, dtype="bfloat16")
    assert m16.dtype == np.dtype("bfloat16")
    out = m16(ids)
    assert out.dtype == np.dtype("bfloat16")
    err = np.abs(np.asarray(out, np.float32) - ref)
    assert err.max() < BF16_MAX_ABS, err.max()
    assert err.mean() < BF16_MEAN_ABS, err.mean()
    # and the same argmax almost everywhere
    agree = (np.asarray(out, np.float32).argmax(-1) == ref.argmax(-1)).mean()
    assert agree > 0.95, agree
