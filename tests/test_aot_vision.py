"""`qwenjax.aot`'s multimodal programs: the image batch it lays out, and the forward with images compiled for a TPU
topology (libtpu's compile-only devices; skipped where libtpu is not installed, failed where it is broken)."""

import json

import numpy as np
import pytest

from compile_targets import require_libtpu
from qwenjax import aot
from qwenjax.config import config_from_dict, load_config
from qwenjax.inputs import vision_inputs, vision_positions
from qwenjax.testing import TINY_VISION


def _tiny_multimodal():
    text = json.load(open("configs/tiny.json"))
    text.pop("architectures")
    cfg = config_from_dict({"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
                            "text_config": text, "vision_config": TINY_VISION, "image_token_id": 250,
                            "video_token_id": 251, "vision_start_token_id": 252, "vision_end_token_id": 253})
    assert cfg.vision.out_hidden_size == cfg.hidden_size
    return cfg


def test_image_batch_is_a_prompt_the_processor_could_give():
    cfg = _tiny_multimodal()
    ids, positions, grid = aot.image_batch(cfg, batch=3, seq=64, image_size=16, images_per_row=2)  # 4x4 patches
    assert ids.shape == (3, 64) and positions.shape == (3, 3, 64) and positions.dtype == np.int32
    assert grid.tolist() == [[1, 4, 4]] * 6
    assert ((ids == cfg.image_token_id).sum(axis=1) == 2 * 4).all()  # 16 patches / merge² per image
    assert ((ids == cfg.vision_start_token_id).sum(axis=1) == 2).all()
    mask = np.ones_like(ids)
    vision = vision_inputs(cfg, ids, mask, np.zeros((96, cfg.vision.patch_dim), np.float32), grid)  # counts agree
    np.testing.assert_array_equal(positions, vision_positions(cfg, ids, mask, vision)[0])


@pytest.mark.parametrize("kw, match", [
    (dict(image_size=12), "multiple of"),                 # patch 4 x merge 2 = 8 pixels
    (dict(image_size=64, seq=32), "at least"),            # 64 pad tokens do not fit 32
])
def test_image_batch_rejects_what_cannot_be_laid_out(kw, match):
    cfg = _tiny_multimodal()
    with pytest.raises(ValueError, match=match):
        aot.image_batch(cfg, **{"batch": 1, "seq": 64, **kw})
    with pytest.raises(ValueError, match="no vision_config"):
        aot.image_batch(load_config("configs/tiny.json"), batch=1, seq=64)


def test_multimodal_forward_compiles_for_tpu():
    require_libtpu()
    cfg = _tiny_multimodal()
    compiled = aot.compile_multimodal_forward(cfg, "v5e:2x2", batch=4, seq=64, image_size=16, logits_to_keep=1)
    assert compiled.out_info.shape == (4, 1, cfg.vocab_size)  # the last position's logits of each row
    pixels = compiled.in_avals[0][-1]  # (params, ids, positions, pixels)
    assert pixels.shape == (4 * 16, cfg.vision.patch_dim)  # four 4x4-patch images, as the processor flattens them
    report = aot.summary(compiled)
    assert report["argument_bytes"] > 0 and report["flops"] > 0
