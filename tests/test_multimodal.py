"""Images and videos in prompts: logits of a multimodal checkpoint equal transformers'
`Qwen3_5(Moe)ForConditionalGeneration` (fp32, 1e-4), on checkpoints its `save_pretrained` writes."""

import io

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import qwenjax  # noqa: E402
from qwenjax import _compat  # noqa: E402
from qwenjax.testing import TINY_VISION, make_hf_checkpoint, make_vision_checkpoint  # noqa: E402

TOL = 1e-4
TOKENS = dict(image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)
TEXT_VOCAB = 250  # text ids below the vision tokens
MERGE = TINY_VISION["spatial_merge_size"]
PATCH_DIM = 3 * TINY_VISION["temporal_patch_size"] * TINY_VISION["patch_size"] ** 2


def _text(rng, n):
    return rng.integers(0, TEXT_VOCAB, n).tolist()


def _image(grid):
    t, h, w = grid
    return [TOKENS["vision_start_token_id"]] + [TOKENS["image_token_id"]] * (t * h * w // MERGE ** 2) + \
        [TOKENS["vision_end_token_id"]]


def _video(rng, grid):
    """As transformers' processor lays out a video: per temporal patch, timestamp text then its pad block."""
    t, h, w = grid
    out = []
    for _ in range(t):
        out += _text(rng, 3) + [TOKENS["vision_start_token_id"]] + [TOKENS["video_token_id"]] * (h * w // MERGE ** 2) \
            + [TOKENS["vision_end_token_id"]]
    return out


def _pixels(rng, grids):
    n = int(sum(np.prod(g) for g in grids))
    return rng.standard_normal((n, PATCH_DIM)).astype(np.float32)


def _pad(rows):
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = row, 1
    return ids, mask


def _hf_logits(hf, ids, mask, **vision):
    kw = {k: torch.from_numpy(np.asarray(v)) for k, v in vision.items() if v is not None}
    # what transformers' processor returns beside input_ids: 1 on image pads, 2 on video pads
    kw["mm_token_type_ids"] = torch.from_numpy((ids == TOKENS["image_token_id"])
                                               + 2 * (ids == TOKENS["video_token_id"]))
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kw)
    return out.logits.float().numpy()


@pytest.fixture(scope="module", params=["dense", "moe"])
def models(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"mm-{request.param}")
    extra = dict(num_experts=8) if request.param == "moe" else {}
    hf = make_hf_checkpoint(path, multimodal=True, vision_token_ids=TOKENS, seed=3, **extra)
    return hf, qwenjax.from_pretrained(path, dtype="float32")


def _check(hf, m, ids, mask, **vision):
    ours = np.asarray(m(ids, mask, **vision))
    ref = _hf_logits(hf, ids, mask, **vision)
    valid = mask.astype(bool)
    assert np.abs(ref).max() > 1.0
    err = np.abs(ours - ref)[valid].max()
    assert err < TOL, f"max abs logit error {err:.3g}"


def test_images_of_different_grids_in_a_padded_batch(models):
    hf, m = models
    rng = np.random.default_rng(0)
    grids = [(1, 4, 6), (1, 2, 4), (1, 6, 4)]
    rows = [_text(rng, 5) + _image(grids[0]) + _text(rng, 4) + _image(grids[1]) + _text(rng, 3),
            _text(rng, 3) + _image(grids[2]) + _text(rng, 10)]
    ids, mask = _pad(rows)
    _check(hf, m, ids, mask, pixel_values=_pixels(rng, grids), image_grid_thw=np.array(grids))


def test_a_video_and_an_image_in_one_prompt(models):
    hf, m = models
    rng = np.random.default_rng(1)
    video, image = (2, 4, 4), (1, 4, 2)
    rows = [_text(rng, 4) + _video(rng, video) + _text(rng, 2) + _image(image) + _text(rng, 5)]
    ids, mask = _pad(rows)
    _check(hf, m, ids, mask, pixel_values=_pixels(rng, [image]), image_grid_thw=np.array([image]),
           pixel_values_videos=_pixels(rng, [video]), video_grid_thw=np.array([video]))


def test_vision_inputs_that_do_not_fit_are_named(models):
    _, m = models
    rng = np.random.default_rng(2)
    ids, mask = _pad([_text(rng, 3) + _image((1, 4, 4)) + _text(rng, 2)])
    with pytest.raises(ValueError, match=r"holds 4 pad token\(s\) of id 250 but image_grid_thw gives 6 feature"):
        m(ids, mask, pixel_values=_pixels(rng, [(1, 4, 6)]), image_grid_thw=np.array([(1, 4, 6)]))
    with pytest.raises(ValueError, match=r"image_grid_thw row 0 = \(1, 3, 4\): .* multiples of spatial_merge_size=2"):
        m(ids, mask, pixel_values=_pixels(rng, [(1, 3, 4)]), image_grid_thw=np.array([(1, 3, 4)]))
    with pytest.raises(ValueError, match="no pixel_values were given"):
        m(ids, mask)
    text_only = qwenjax.from_config(m.config.replace(vision=None))
    with pytest.raises(ValueError, match="text-only model"):
        text_only(ids, mask, pixel_values=_pixels(rng, [(1, 4, 4)]), image_grid_thw=np.array([(1, 4, 4)]))


def test_greedy_generation_from_image_prompts_equals_transformers(models):
    hf, m = models
    rng = np.random.default_rng(3)
    grids = [(1, 4, 6), (1, 2, 2)]
    prompts = [_text(rng, 4) + _image(grids[0]) + _text(rng, 3), _text(rng, 9) + _image(grids[1]) + _text(rng, 2)]
    pixels = [_pixels(rng, [g]) for g in grids]
    ours = qwenjax.generate(m, prompts, max_new_tokens=8, pixel_values=np.concatenate(pixels),
                            image_grid_thw=np.array(grids))
    for prompt, pix, grid, got in zip(prompts, pixels, grids, ours):  # transformers one prompt at a time
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.from_numpy(pix),
                              image_grid_thw=torch.tensor([grid]),
                              mm_token_type_ids=(ids == TOKENS["image_token_id"]).long(), max_new_tokens=8,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist()


def test_an_export_loads_in_transformers_with_the_same_logits_on_images(models, tmp_path):
    import transformers

    hf, m = models
    key = jax.random.key(1)  # a trained tower: the export must write its values, not the source's
    params = _compat.replace_values(m.params, lambda path, v: _compat.variable_value(v) + (
        0.05 * jax.random.normal(jax.random.fold_in(key, len(path)), _compat.variable_value(v).shape)
        if path[0] == "visual" else 0))
    trained = m.replace(params=params)
    out = qwenjax.export_hf(trained, tmp_path / "export")
    kind = "Qwen3_5MoeForConditionalGeneration" if m.config.is_moe else "Qwen3_5ForConditionalGeneration"
    reloaded = getattr(transformers, kind).from_pretrained(out, dtype=torch.float32).eval()
    rng = np.random.default_rng(4)
    grids = [(1, 4, 4)]
    ids, mask = _pad([_text(rng, 3) + _image(grids[0]) + _text(rng, 5)])
    vision = dict(pixel_values=_pixels(rng, grids), image_grid_thw=np.array(grids))
    _check(reloaded, trained, ids, mask, **vision)
    assert np.abs(np.asarray(trained(ids, mask, **vision)) - _hf_logits(hf, ids, mask, **vision)).max() > 1e-3


@pytest.fixture(scope="module")
def vision_checkpoint(tmp_path_factory):
    """A multimodal checkpoint with a byte-level tokenizer that knows the vision tokens, small-patch processor
    configs, and an image file."""
    from PIL import Image

    path = tmp_path_factory.mktemp("mm-cli")
    make_vision_checkpoint(path)
    image = path / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(image)
    return path, image


def _prompt_tokens(err: str) -> list[int]:
    return [int(line.split()[0][1:]) for line in err.splitlines() if "prompt tokens" in line]


def test_cli_generates_from_an_image(vision_checkpoint, capsys):
    from qwenjax.cli import main

    path, image = vision_checkpoint
    argv = ["generate", "--model", str(path), "--image", str(image), "--prompt", "What is it?", "--max-new-tokens",
            "3", "--no-thinking", "--temperature", "0", "--dtype", "float32"]
    assert main(argv) == 0
    batch = qwenjax.load_processor(path)([{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                                       {"type": "text", "text": "What is it?"}]}],
                                         enable_thinking=False)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 8]]  # 20 x 28 pixels → 16 x 32 (rounded to multiples of 8)
    assert _prompt_tokens(capsys.readouterr().err) == [batch["input_ids"].shape[1]]
    assert main(argv[:3] + ["--image", str(path / "missing.png")] + argv[5:]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_cli_chat_attaches_images_to_a_turn_and_keeps_them(vision_checkpoint, monkeypatch, capsys):
    from qwenjax.cli import main

    path, image = vision_checkpoint
    monkeypatch.setattr("sys.stdin",
                        io.StringIO(f"/image {image}\nWhat is it?\n/image /no/such.png\nAnd now?\n/exit\n"))
    assert main(["chat", "--model", str(path), "--max-new-tokens", "2", "--no-thinking", "--temperature", "0",
                 "--dtype", "float32"]) == 0
    err = capsys.readouterr().err
    assert f"[{image} goes with your next message]" in err and "/no/such.png': no such file" in err
    first, second = _prompt_tokens(err)
    assert first > 6 + len("What is it?") and second > first + 6  # the second turn carries the image's 8 pads
