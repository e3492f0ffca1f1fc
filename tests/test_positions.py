"""`multimodal_positions` against transformers' `Qwen3_5Model.get_rope_index` (the oracle) on a tiny model.

Prompts are built as transformers' processors build them: an image is vision_start, t·h·w/m² image pads,
vision_end; a video of t temporal patches is, per frame, the timestamp text `<{s:.1f} seconds>` (here spelled with
a toy character tokenizer) then vision_start, h·w/m² video pads, vision_end (`Qwen3VLProcessor.replace_video_token`).
`mm_token_type_ids` is what `ProcessorMixin.create_mm_token_type_ids` makes: 1 on image pads, 2 on video pads.
Positions (padding included) and deltas must be equal exactly.
"""

import numpy as np
import pytest

from qwenjax.model.positions import multimodal_positions

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import Qwen3_5Config  # noqa: E402
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Model  # noqa: E402

# Only the config's merge size and token ids matter to `get_rope_index`; the model is tiny so building it is cheap.
TEXT = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16}
VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
          "patch_size": 4, "num_position_embeddings": 16, "temporal_patch_size": 2, "spatial_merge_size": 2}
IMAGE, VIDEO, START, END, PAD = 250, 251, 252, 253, 0  # inside the vocab of 256
M = VISION["spatial_merge_size"]
IDS = {"spatial_merge_size": M, "image_token_id": IMAGE, "video_token_id": VIDEO, "vision_start_token_id": START}


@pytest.fixture(scope="module")
def hf():
    cfg = Qwen3_5Config(text_config=TEXT, vision_config=VISION, image_token_id=IMAGE,
                        video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    return Qwen3_5Model(cfg).eval()


# Prompt pieces: lists of ids, plus the grids they consume.
def text(n, seed=0):
    return list(np.random.default_rng(seed).integers(10, 200, n)), [], []


def image(t, h, w):
    return [START] + [IMAGE] * (t * h * w // M ** 2) + [END], [(t, h, w)], []


def video(t, h, w, fps_step=0.5):
    ids = []
    for f in range(t):
        ids += [10 + ord(ch) % 90 for ch in f"<{f * fps_step + 0.25:.1f} seconds>"]
        ids += [START] + [VIDEO] * (h * w // M ** 2) + [END]
    return ids, [], [(t, h, w)]


def row(*pieces):
    return [[x for p in pieces for x in p[i]] for i in range(3)]


def batch(*rows, left=False):
    """input_ids, attention_mask [B, T] padded with PAD, image and video grids (None when empty)."""
    T = max(len(r[0]) for r in rows)
    ids = np.full((len(rows), T), PAD, np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    for b, (r, _, _) in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    images = [g for r in rows for g in r[1]]
    videos = [g for r in rows for g in r[2]]
    return (ids, mask, np.array(images, np.int64) if images else None,
            np.array(videos, np.int64) if videos else None)


def oracle(hf, ids, mask, images, videos, use_mask=True):
    types = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
    t = lambda a: None if a is None else torch.tensor(a)
    pos, delta = hf.get_rope_index(torch.tensor(ids), torch.tensor(types), image_grid_thw=t(images),
                                   video_grid_thw=t(videos), attention_mask=t(mask) if use_mask else None)
    return pos.numpy(), delta.numpy().reshape(-1)


def check(hf, ids, mask, images, videos, use_mask=True):
    want_pos, want_delta = oracle(hf, ids, mask, images, videos, use_mask)
    pos, delta = multimodal_positions(ids, mask if use_mask else None, image_grid_thw=images,
                                      video_grid_thw=videos, **IDS)
    assert pos.dtype == np.int32 and delta.dtype == np.int32
    assert pos.shape == (3, *ids.shape) and delta.shape == (ids.shape[0],)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_array_equal(delta, want_delta)
    return pos, delta


CASES = {
    "one-image": [row(text(3), image(1, 4, 6), text(5, 1))],
    "image-grid-t3": [row(text(2), image(3, 2, 4), text(3))],  # not what the processor makes; t does not advance
    "two-images": [row(text(2), image(1, 4, 6), text(3, 1), image(1, 8, 2), text(4, 2))],
    "adjacent-images": [row(text(2), image(1, 2, 2), image(1, 6, 4), text(1))],
    "image-at-end": [row(text(2), image(1, 6, 2))],
    "video-t2": [row(text(3), video(2, 4, 6), text(4, 1))],
    "video-t3": [row(text(3), video(3, 6, 4), text(4, 1))],
    "image-and-video": [row(text(2), image(1, 4, 4), text(3, 1), video(2, 2, 6), text(2, 2))],
    "video-then-image": [row(text(2), video(3, 4, 2), text(1, 1), image(1, 2, 8), text(2, 2))],
    "two-rows-padded": [row(text(3), image(1, 4, 6), text(5, 1)), row(text(2), image(1, 2, 8), text(1, 2))],
    "text-row-and-image-row": [row(text(7)), row(text(2), image(1, 6, 6), text(2, 1))],
    "mixed-batch": [row(text(2), video(2, 4, 4), text(3)), row(text(4), image(1, 2, 4), image(1, 4, 2), text(1)),
                    row(text(1), image(1, 8, 4), video(3, 2, 2), text(2, 5))],
}


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
@pytest.mark.parametrize("case", CASES)
def test_matches_transformers(hf, case, left):
    check(hf, *batch(*CASES[case], left=left))


def test_without_mask_matches_transformers(hf):
    r1 = row(text(1), video(2, 2, 4))
    r0 = row(text(2), image(1, 4, 6), text(len(r1[0]) - 10))  # as long as r1: no padding
    ids, _, images, videos = batch(r0, r1)
    assert (ids != PAD).all()
    check(hf, ids, None, images, videos, use_mask=False)


def test_one_image_positions_by_hand():
    ids, mask, images, _ = batch(row(text(2), image(1, 4, 6), text(2)), row(text(3)))
    pos, delta = multimodal_positions(ids, mask, image_grid_thw=images, **IDS)
    # text 0, 1, vision_start 2; the 2 x 3 merged grid at s = 3; vision_end at 3 + max(2, 3) = 6, then 7, 8.
    t = [0, 1, 2] + [3] * 6 + [6, 7, 8]
    h = [0, 1, 2] + [3, 3, 3, 4, 4, 4] + [6, 7, 8]
    w = [0, 1, 2] + [3, 4, 5, 3, 4, 5] + [6, 7, 8]
    np.testing.assert_array_equal(pos[:, 0], [t, h, w])
    np.testing.assert_array_equal(pos[:, 1], [[0, 1, 2] + [0] * 9] * 3)  # padding gets 0
    np.testing.assert_array_equal(delta, [9 - 12, 0])


def test_text_only(hf):
    ids, mask, _, _ = batch(row(text(6)), row(text(3, 1)))
    pos, delta = check(hf, ids, mask, None, None)
    np.testing.assert_array_equal(pos[:, 0], np.broadcast_to(np.arange(6), (3, 6)))
    np.testing.assert_array_equal(pos[:, 1], np.broadcast_to([0, 1, 2, 0, 0, 0], (3, 6)))
    np.testing.assert_array_equal(delta, [0, 0])
    pos, delta = multimodal_positions(ids, None, **IDS)
    np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(6), (3, 2, 6)))
    np.testing.assert_array_equal(delta, [0, 0])


def test_fully_masked_row():  # transformers fails on it (torch.cat of nothing)
    ids, mask, images, _ = batch(row(text(2), image(1, 2, 2)), row(text(3)))
    mask[1] = 0
    pos, delta = multimodal_positions(ids, mask, image_grid_thw=images, **IDS)
    assert (pos[:, 1] == 0).all() and delta[1] == 0


def test_random_prompts_match_transformers(hf):
    rng = np.random.default_rng(0)
    for trial in range(12):
        rows = []
        for _ in range(rng.integers(1, 4)):
            pieces = [text(int(rng.integers(1, 5)), trial)]
            for _ in range(rng.integers(0, 4)):
                t, h, w = int(rng.integers(1, 4)), M * int(rng.integers(1, 5)), M * int(rng.integers(1, 5))
                pieces.append(image(1, h, w) if rng.random() < 0.5 else video(t, h, w))
                pieces.append(text(int(rng.integers(0, 4)), trial))
            rows.append(row(*pieces))
        check(hf, *batch(*rows, left=bool(rng.random() < 0.5)))


# ---- bad inputs -------------------------------------------------------------------------------------------------

def _call(ids, mask, images, videos):
    return multimodal_positions(ids, mask, image_grid_thw=images, video_grid_thw=videos, **IDS)


def test_too_few_image_grids():
    ids, mask, images, videos = batch(row(text(2), image(1, 2, 2), image(1, 4, 2)), row(image(1, 2, 4)))
    with pytest.raises(ValueError, match=r"input_ids hold 3 image blocks .* image_grid_thw has 2 rows"):
        _call(ids, mask, images[:2], videos)
    with pytest.raises(ValueError, match=r"input_ids hold 3 image blocks .* image_grid_thw has 0 rows"):
        _call(ids, mask, None, videos)


def test_too_many_image_grids():
    ids, mask, images, _ = batch(row(text(2), image(1, 2, 2)))
    with pytest.raises(ValueError, match=r"input_ids hold 1 image blocks .* image_grid_thw has 2 rows"):
        _call(ids, mask, np.concatenate([images, images]), None)


def test_video_frames_mismatch():
    ids, mask, _, _ = batch(row(text(2), video(3, 2, 2)))
    with pytest.raises(ValueError, match=r"input_ids hold 3 video blocks .* video_grid_thw has 2 frames \(sum of t\) "
                                         r"over 1 rows"):
        _call(ids, mask, None, np.array([[2, 2, 2]]))
    with pytest.raises(ValueError, match=r"input_ids hold 3 video blocks .* video_grid_thw has 4 frames"):
        _call(ids, mask, None, np.array([[2, 2, 2], [2, 2, 2]]))


def test_grid_not_divisible_by_merge():
    ids, mask, _, _ = batch(row(text(2), image(1, 2, 2), image(1, 2, 4)))
    with pytest.raises(ValueError, match=r"image_grid_thw row 1 = \(1, 3, 4\).*multiples of spatial_merge_size=2"):
        _call(ids, mask, np.array([[1, 2, 2], [1, 3, 4]]), None)
    with pytest.raises(ValueError, match=r"video_grid_thw row 0 = \(2, 2, 5\)"):
        _call(ids, mask, None, np.array([[2, 2, 5]]))
    with pytest.raises(ValueError, match=r"image_grid_thw row 0 = \(0, 2, 2\): t, h, w must be positive"):
        _call(ids, mask, np.array([[0, 2, 2], [1, 2, 4]]), None)


def test_wrong_pad_count():
    ids, mask, _, _ = batch(row(text(3)), row(text(2), image(1, 2, 2), text(1), image(1, 4, 4)))
    # row 1: text 0-1, vision_start 2, pad 3, vision_end 4, text 5, vision_start 6, pads 7-10, ...
    with pytest.raises(ValueError, match=r"row 1: 4 image tokens after the vision_start at position 6 \(pad tokens "
                                         r"from position 7\), but image_grid_thw row 1 \(1, 4, 2\) needs .* = 2"):
        _call(ids, mask, np.array([[1, 2, 2], [1, 4, 2]]), None)
    ids, mask, _, _ = batch(row(text(2), video(2, 2, 4)))
    with pytest.raises(ValueError, match=r"row 0: 2 video tokens .* but video_grid_thw row 0 frame 0 \(1, 4, 4\) "
                                         r"needs .* = 4"):
        _call(ids, mask, None, np.array([[2, 4, 4]]))


def test_pads_without_vision_start():
    ids, mask, images, _ = batch(([1, 2, IMAGE, 3], [(1, 2, 2)], []))
    with pytest.raises(ValueError, match=r"row 0: the image tokens at position 2 do not follow a vision_start"):
        _call(ids, mask, images, None)


def test_bad_shapes():
    ids, mask, images, _ = batch(row(text(2), image(1, 2, 2)))
    with pytest.raises(ValueError, match="input_ids must be integers of shape"):
        _call(ids[0], None, images, None)
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        _call(ids, mask[:, 1:], images, None)
    with pytest.raises(ValueError, match=r"image_grid_thw must be integers of shape \[n, 3\]"):
        _call(ids, mask, images[0], None)
