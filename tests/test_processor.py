"""Images and videos into model inputs (qwenjax/inference/processor.py) against transformers' own code:
`Qwen2VLImageProcessorPil` (the slow PIL path) for images, `Qwen3VLVideoProcessor`'s sampling, `smart_resize` and
patch layout for videos, `Qwen3VLProcessor` for the placeholder expansion of prompts.

transformers 5 runs videos through torchvision only, which is not installed; its video functions are imported from
their module directly (the package hands out a stub without torchvision), and its resize is reproduced with what
torchvision calls on a CPU: torch's uint8 antialiased bicubic."""

import difflib
import importlib
import json
import os
import re
import shutil
import sys
import tracemalloc
import types

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from transformers.image_utils import load_image as hf_load_image  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize  # noqa: E402
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor  # noqa: E402
from transformers.video_utils import VideoMetadata  # noqa: E402
from transformers.video_utils import load_video as hf_load_video  # noqa: E402

from qwenjax.config import load_config  # noqa: E402
from qwenjax.demo import byte_tokenizer, write_tokenizer  # noqa: E402
from qwenjax.inference.processor import (IMAGE_PLACEHOLDER, VIDEO_PAD, VIDEO_PLACEHOLDER, VISION_END,  # noqa: E402
                                         VISION_START, ImageProcessor, MissingVideoDecoder, Processor,
                                         ProcessorError, Video, VideoProcessor, load_processor, read_video_file,
                                         smart_resize, smart_resize_video)
from qwenjax.inference.media_loading import ReadLimits, load_image  # noqa: E402
from qwenjax.inference.processor import ProcessedPicture  # noqa: E402
from qwenjax.inference.tokenizer import Tokenizer  # noqa: E402
from qwenjax.inputs import vision_inputs  # noqa: E402

hf_video = importlib.import_module("transformers.models.qwen3_vl.video_processing_qwen3_vl")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VISION_TOKENS = [VISION_START, VISION_END, "<|image_pad|>", VIDEO_PAD]
HALF = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)  # Qwen3.5's normalisation
# (patch, merge, temporal, min_pixels, max_pixels): small bounds, so that small images hit them
IMAGE_SETTINGS = [(14, 2, 2, 56 * 56, 28 * 28 * 64), (16, 2, 2, 32 * 32 * 8, 32 * 32 * 40),
                  (4, 2, 2, 8 * 8 * 4, 8 * 8 * 50)]
# One uint8 level after normalising with mean = std = 0.5: Pillow and torch's uint8 bicubic round differently.
VIDEO_TOL = 1 / 127.5 + 1e-6


def _random_image(rng, h, w, channels=3):
    return rng.integers(0, 256, (h, w, channels), dtype=np.uint8)


# ---- smart_resize ------------------------------------------------------------------------------------------------
def test_smart_resize_equals_transformers_over_a_sweep():
    sides = [1, 3, 13, 27, 28, 29, 31, 32, 33, 50, 99, 224, 333, 640, 1000, 2999, 4000]
    bounds = [(28, 56 * 56, 28 * 28 * 1280), (32, 32 * 32 * 64, 32 * 32 * 1024), (32, 65536, 16777216),
              (8, 64, 8 * 8 * 30)]
    compared = 0
    for h in sides:
        for w in sides:
            if max(h, w) / min(h, w) > 200:
                continue
            for factor, lo, hi in bounds:
                assert smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor, lo, hi), (h, w, factor)
                for frames in (2, 3, 8, 31):
                    assert smart_resize_video(frames, h, w, 2, factor, lo, hi) == \
                        hf_video.smart_resize(frames, h, w, 2, factor, lo, hi), (frames, h, w, factor)
                compared += 1
    assert compared > 500


def test_aspect_ratio_above_200_raises_naming_the_size():
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_smart_resize(10, 2010)
    with pytest.raises(ProcessorError, match=r"10 x 2010 pixels \(height x width\).*aspect ratio 201 is above 200"):
        smart_resize(10, 2010)
    rng = np.random.default_rng(0)
    with pytest.raises(ProcessorError, match=r"images\[1\]: an image of 2 x 500 pixels"):
        ImageProcessor()([_random_image(rng, 8, 8), _random_image(rng, 2, 500)])
    assert smart_resize(10, 2000) == hf_smart_resize(10, 2000)  # exactly 200 passes, in both


# ---- images ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch,merge,temporal,min_pixels,max_pixels", IMAGE_SETTINGS)
def test_image_pixels_and_grids_equal_transformers_pil_processor(tmp_path, patch, merge, temporal, min_pixels,
                                                                  max_pixels):
    settings = dict(patch_size=patch, merge_size=merge, temporal_patch_size=temporal, min_pixels=min_pixels,
                    max_pixels=max_pixels, **HALF)
    hf, ours = Qwen2VLImageProcessorPil(**settings), ImageProcessor(**settings)
    rng = np.random.default_rng(patch)
    factor = patch * merge
    images = []
    for h, w in [(50, 70), (300, 200), (3, 5), (37, 400), (4 * factor, 6 * factor), (5, 900), (1000, 17)]:
        images += [_random_image(rng, h, w), Image.fromarray(_random_image(rng, h, w, 4)),  # RGBA: on white
                   Image.fromarray(_random_image(rng, h, w)[..., 0]).convert("L")]
    path = tmp_path / "transparent.png"
    Image.fromarray(_random_image(rng, 45, 61, 4)).save(path)  # from a file, transparency is dropped instead
    worst = 0.0
    for image in images + [str(path)]:
        # channels_last: transformers guesses an array's layout, and takes a 3-row image for channels-first
        expected = hf(hf_load_image(image) if isinstance(image, str) else image, return_tensors="np",
                      input_data_format="channels_last")
        pixels, grid = ours(image)
        np.testing.assert_array_equal(grid, expected["image_grid_thw"])
        assert pixels.dtype == np.float32 and pixels.shape == expected["pixel_values"].shape
        worst = max(worst, float(np.abs(pixels - expected["pixel_values"]).max()))
    pixels, grid = ours(images[:4])  # several at once: concatenated in order
    expected = hf(images[:4], return_tensors="np", input_data_format="channels_last")
    np.testing.assert_array_equal(grid, expected["image_grid_thw"])
    worst = max(worst, float(np.abs(pixels - expected["pixel_values"]).max()))
    assert worst == 0.0, f"max abs difference {worst}"  # the same Pillow resize and float operations: bit for bit


def test_missing_or_unreadable_image_files_are_named(tmp_path):
    processor, rng = ImageProcessor(), np.random.default_rng(0)
    missing = tmp_path / "no-such.png"
    with pytest.raises(ProcessorError, match=re.escape(f"image file '{missing}' does not exist")):
        processor(missing)
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    with pytest.raises(ProcessorError, match=re.escape(f"{bad}: not a readable image")):
        processor([_random_image(rng, 30, 30), str(bad)])
    with pytest.raises(ProcessorError, match=r"images\[0\]: an image array must be .* got \[4, 4, 3\] float32"):
        processor(np.zeros((4, 4, 3), np.float32))
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.fromarray(_random_image(rng, 32, 32)).save(frames / "000.png")
    shutil.copy(bad, frames / "001.png")
    with pytest.raises(ProcessorError, match=re.escape(f"videos[0]: {frames / '001.png'}: not a readable image")):
        VideoProcessor(fps=None)(Video(str(frames)))
    with pytest.raises(ProcessorError, match=re.escape(f"video '{tmp_path / 'clip.mp4'}' does not exist: neither a "
                                                       "video file nor a directory of frame images")):
        VideoProcessor()(str(tmp_path / "clip.mp4"))


# ---- videos ------------------------------------------------------------------------------------------------------
def _hf_sample(settings: dict, total: int, video_fps):
    """transformers' frame indices, and the frame rate its prompt timestamps use."""
    stand_in = types.SimpleNamespace(fps=settings.get("fps", 2), min_frames=settings.get("min_frames", 4),
                                     max_frames=settings.get("max_frames", 768))
    metadata = VideoMetadata(total_num_frames=total, fps=video_fps)
    indices = hf_video.Qwen3VLVideoProcessor.sample_frames(stand_in, metadata, num_frames=settings.get("num_frames"))
    return indices, 24 if metadata.fps is None else metadata.fps


@pytest.mark.parametrize("total,video_fps,settings", [
    (100, 30.0, {}), (7, 24.0, {}), (3, 10.0, {}), (1000, 25.0, dict(max_frames=16)), (50, None, {}),
    (61, 29.97, dict(fps=1.5)), (240, 60.0, dict(fps=0.5, min_frames=2)), (33, 8.0, dict(fps=None, num_frames=5)),
    (9, None, dict(fps=None)), (500, 30.0, dict(fps=4, min_frames=8, max_frames=40))])
def test_video_frame_sampling_and_timestamps_equal_transformers(total, video_fps, settings):
    ours = VideoProcessor(**settings)
    indices, fps_used = _hf_sample(settings, total, video_fps)
    np.testing.assert_array_equal(ours.sample_indices(total, video_fps), indices)
    expected = Qwen3VLProcessor._calculate_timestamps(None, indices, fps_used, 2)
    assert ours.timestamps(indices.tolist(), video_fps) == expected
    np.testing.assert_array_equal(VideoProcessor(do_sample_frames=False).sample_indices(total, video_fps),
                                  np.arange(total))


def _hf_video_pixels(frames, video_fps, settings):
    """transformers' video pipeline, with torchvision's CPU resize (torch's uint8 antialiased bicubic)."""
    indices, _ = _hf_sample(settings, len(frames), video_fps)
    return _hf_sampled_video_pixels(frames[indices], settings)


def _hf_sampled_video_pixels(sampled, settings):
    """transformers' video pipeline after sampling: resize, rescale and normalise, patches."""
    patch, merge, temporal = settings["patch_size"], settings["merge_size"], settings["temporal_patch_size"]
    video = torch.from_numpy(sampled).permute(0, 3, 1, 2)
    size = hf_video.smart_resize(len(sampled), *video.shape[-2:], temporal, patch * merge, settings["min_pixels"],
                                 settings["max_pixels"])
    if tuple(size) != tuple(video.shape[-2:]):
        video = torch.nn.functional.interpolate(video, size=list(size), mode="bicubic", antialias=True,
                                                align_corners=False)
    video = (video.float() - 0.5 * 255) / (0.5 * 255)  # the fused rescale and normalise
    patches, t, h, w = hf_video.Qwen3VLVideoProcessor.patchify(None, video[None], patch, merge, temporal)
    return patches[0].numpy(), [t, h, w]


@pytest.mark.parametrize("shape,video_fps", [((9, 40, 60), 8.0), ((30, 90, 50), 30.0), ((5, 20, 21), None)])
def test_video_pixels_follow_transformers(tmp_path, shape, video_fps):
    settings = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8 * 6, max_pixels=8 * 8 * 60,
                    **HALF)
    frames = _random_image(np.random.default_rng(shape[0]), shape[0] * shape[1], shape[2]).reshape(*shape, 3)
    pixels, grid, timestamps = VideoProcessor(**settings)(Video(frames, video_fps))
    expected, expected_grid = _hf_video_pixels(frames, video_fps, settings)
    assert grid.tolist() == [expected_grid] and len(timestamps[0]) == expected_grid[0]
    diff = np.abs(pixels - expected)
    print(f"video {shape}: max abs difference {diff.max():.4g}, {np.mean(diff > 0):.3%} of values differ")
    assert diff.max() <= VIDEO_TOL and np.mean(diff > 0) < 0.02
    for i, frame in enumerate(frames):  # the same frames as a directory of images: the same inputs
        Image.fromarray(frame).save(tmp_path / f"frame_{i:04d}.png")
    from_files = VideoProcessor(**settings)(Video(str(tmp_path), video_fps))
    np.testing.assert_array_equal(from_files[0], pixels)
    assert from_files[2] == timestamps


# ---- prompts -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The demo byte-level tokenizer with the vision tokens: ours (a checkpoint directory) and transformers'."""
    tok = byte_tokenizer()
    tok.add_special_tokens(VISION_TOKENS)
    path = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(path, tok)
    return Tokenizer(path), PreTrainedTokenizerFast(tokenizer_object=tok)


class _HFVideoStandIn:
    """What Qwen3VLProcessor needs of its video processor, computed with transformers' own functions (sampling,
    smart_resize); the pixels are not looked at."""

    def __init__(self, settings, video_fps):
        self.settings, self.video_fps = settings, video_fps
        self.merge_size, self.temporal_patch_size = settings["merge_size"], settings["temporal_patch_size"]

    def __call__(self, videos, **kwargs):
        s, grids, metadata = self.settings, [], []
        for video in videos:
            indices, fps = _hf_sample(s, len(video), self.video_fps)
            h, w = hf_video.smart_resize(len(indices), *video.shape[1:3], s["temporal_patch_size"],
                                         s["patch_size"] * s["merge_size"], s["min_pixels"], s["max_pixels"])
            grids.append([-(-len(indices) // s["temporal_patch_size"]), h // s["patch_size"], w // s["patch_size"]])
            metadata.append(VideoMetadata(total_num_frames=len(video), fps=fps, frames_indices=indices))
        return {"pixel_values_videos": np.zeros((1, 1), np.float32), "video_grid_thw": np.array(grids),
                "video_metadata": metadata}


def _processors(tokenizers, monkeypatch, video_fps, stand_in=_HFVideoStandIn):
    """(transformers' Qwen3VLProcessor, ours), with the same small settings."""
    ours_tok, hf_tok = tokenizers
    image_settings = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=8 * 8 * 20,
                          **HALF)
    video_settings = dict(image_settings, min_pixels=8 * 8 * 4, max_pixels=8 * 8 * 40)
    # The stand-in is not a BaseVideoProcessor (that needs torchvision): skip transformers' class check.
    monkeypatch.setattr(Qwen3VLProcessor, "check_argument_for_proper_class", lambda self, name, arg: None)
    hf = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil(**image_settings), tokenizer=hf_tok,
                          video_processor=stand_in(video_settings, video_fps))
    return hf, Processor(ours_tok, ImageProcessor(**image_settings), VideoProcessor(**video_settings))


@pytest.mark.parametrize("video_fps", [12.0, None])
def test_prompt_expansion_equals_qwen3vl_processor(tokenizers, monkeypatch, video_fps):
    hf, ours = _processors(tokenizers, monkeypatch, video_fps)
    rng = np.random.default_rng(5)
    image, frames = _random_image(rng, 30, 50), _random_image(rng, 7 * 24, 40).reshape(7, 24, 40, 3)
    bare = f"<|im_start|>user\nSee {IMAGE_PLACEHOLDER} and {VIDEO_PAD}: same?<|im_end|>\n<|im_start|>assistant\n"
    expected = hf(text=bare, images=[image], videos=[frames])
    got = ours(text=bare, images=[image], videos=[Video(frames, video_fps)])
    assert got["input_ids"].tolist() == expected["input_ids"]
    np.testing.assert_array_equal(got["attention_mask"], np.ones_like(got["input_ids"]))
    for key in ("image_grid_thw", "video_grid_thw", "pixel_values"):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    t, h, w = got["video_grid_thw"][0]
    assert t == 2 and (got["input_ids"] == hf.video_token_id).sum() == t * h * w // 4 > 0

    # The chat template's wrapped video placeholder: the Qwen-written processor, and this one, replace it along
    # with the pad; transformers 5.25 does too, while earlier 5.x kept the wrapper around the frame blocks (two
    # tokens, and nothing else, differ then).
    wrapped = bare.replace(VIDEO_PAD, VIDEO_PLACEHOLDER)
    got_wrapped = ours(text=wrapped, images=[image], videos=[Video(frames, video_fps)])["input_ids"][0].tolist()
    assert got_wrapped == got["input_ids"][0].tolist()
    hf_wrapped = hf(text=wrapped, images=[image], videos=[frames])["input_ids"][0]
    edits = [(tag, hf_wrapped[j1:j2]) for tag, _, _, j1, j2 in
             difflib.SequenceMatcher(None, got_wrapped, hf_wrapped, autojunk=False).get_opcodes() if tag != "equal"]
    assert edits in ([], [("insert", [hf.vision_start_token_id]), ("insert", [hf.vision_end_token_id])])


def test_messages_with_picture_parts_render_through_the_template(tokenizers, monkeypatch, tmp_path):
    _, ours = _processors(tokenizers, monkeypatch, None)
    rng = np.random.default_rng(6)
    path = tmp_path / "cat.png"
    Image.fromarray(_random_image(rng, 20, 28)).save(path)
    frames = _random_image(rng, 4 * 16, 16).reshape(4, 16, 16, 3)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "and"},
                                             {"type": "video", "video": Video(frames, 2.0)},
                                             {"type": "text", "text": "?"}]}]
    got = ours(messages, enable_thinking=False)
    rendered = ours.tokenizer.apply_chat_template(
        [messages[0], {"role": "user", "content": f"{IMAGE_PLACEHOLDER}and{VIDEO_PLACEHOLDER}?"}],
        enable_thinking=False)
    expected = ours(text=rendered, images=[str(path)], videos=[Video(frames, 2.0)])
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    text = ours.tokenizer.decode(got["input_ids"][0], skip_special_tokens=False)
    assert "<0.2 seconds><|vision_start|><|video_pad|>" in text and "<1.2 seconds>" in text
    assert text.count(VISION_START) == text.count(VISION_END) == 1 + got["video_grid_thw"][0, 0]

    # What the model checks of its inputs: one pad token per merged patch, in this tokenizer's ids.
    tok = ours.tokenizer
    cfg = load_config(os.path.join(REPO, "configs", "qwen3.5-9b.json")).replace(
        image_token_id=tok.token_to_id("<|image_pad|>"), video_token_id=tok.token_to_id(VIDEO_PAD),
        vision_start_token_id=tok.token_to_id(VISION_START), vision_end_token_id=tok.token_to_id(VISION_END))
    assert vision_inputs(cfg, got["input_ids"], got["attention_mask"], got["pixel_values"], got["image_grid_thw"],
                         got["pixel_values_videos"], got["video_grid_thw"]) is not None

    with pytest.raises(ProcessorError, match=r"holds 1 image placeholder\(s\) .* but 2 image\(s\) were given"):
        ours(text=rendered, images=[str(path), str(path)], videos=[frames])
    with pytest.raises(ProcessorError, match=r"holds 1 video placeholder\(s\) .* but 0 video\(s\)"):
        ours(text=rendered, images=[str(path)])
    with pytest.raises(ProcessorError, match="go in the messages' content parts"):
        ours(messages, images=[str(path)])
    with pytest.raises(ProcessorError, match=r"messages\[0\].content\[0\]: must be"):
        ours([{"role": "user", "content": [{"type": "audio", "audio": b""}]}])
    plain = ours([{"role": "user", "content": "hi"}])  # text only
    assert plain["pixel_values"] is None and plain["video_grid_thw"] is None


# ---- video files -------------------------------------------------------------------------------------------------
def _write_video(path, frames, fps=8, codec="png", pix_fmt="rgb24"):
    """`frames` ([T, H, W, 3] uint8) as a video file written with PyAV (png in .mov: lossless, decoded exactly)."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width, stream.pix_fmt = *frames.shape[1:3], pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def _gradient_frames(count, height=48, width=64):
    """Smooth frames, changing over time: what lossy codecs keep well."""
    t, y, x = np.meshgrid(np.arange(count), np.arange(height), np.arange(width), indexing="ij")
    return np.stack([x * 2 + t * 5, y * 4, t * 8 + y], axis=-1).clip(0, 255).astype(np.uint8)


class _HFFileVideoStandIn(_HFVideoStandIn):
    """transformers' path for a video file: `load_video` with its PyAV decoder (`read_video_pyav`), sampled by
    `Qwen3VLVideoProcessor.sample_frames`; then the pixel pipeline of `_hf_sampled_video_pixels`."""

    def __call__(self, videos, **kwargs):
        s = self.settings
        sampler = types.SimpleNamespace(fps=s.get("fps", 2), min_frames=s.get("min_frames", 4),
                                        max_frames=s.get("max_frames", 768))
        pixels, grids, metadata, self.decoded = [], [], [], []
        self.metadata = metadata
        for path in videos:
            frames, meta = hf_load_video(path, backend="pyav", sample_indices_fn=lambda metadata, **_: (
                hf_video.Qwen3VLVideoProcessor.sample_frames(sampler, metadata)))
            patches, grid = _hf_sampled_video_pixels(frames, s)
            pixels.append(patches)
            grids.append(grid)
            metadata.append(meta)
            self.decoded.append(frames)
        return {"pixel_values_videos": np.concatenate(pixels), "video_grid_thw": np.array(grids),
                "video_metadata": metadata}


def test_video_file_equals_transformers_pyav_path(tokenizers, monkeypatch, tmp_path):
    pytest.importorskip("av")
    hf, ours = _processors(tokenizers, monkeypatch, None, stand_in=_HFFileVideoStandIn)
    frames = _random_image(np.random.default_rng(7), 24 * 48, 64).reshape(24, 48, 64, 3)
    path = _write_video(tmp_path / "clip.mov", frames, fps=8)  # 3 s: 2 fps samples 6 of its 24 frames

    decoded, indices, fps = read_video_file(path, ours.video_processor.sample_indices)
    assert indices.tolist() == [0, 5, 9, 14, 18, 23] and fps == 8.0
    np.testing.assert_array_equal(decoded, frames[indices])  # lossless: the frames written

    bare = f"<|im_start|>user\nWhat happens in {VIDEO_PAD}?<|im_end|>\n<|im_start|>assistant\n"
    expected = hf(text=bare, videos=[path])
    got = ours(text=bare, videos=[path])
    np.testing.assert_array_equal(hf.video_processor.decoded[0], decoded)  # transformers decoded the same frames
    metadata = hf.video_processor.metadata[0]
    assert metadata.frames_indices.tolist() == indices.tolist() and metadata.fps == fps
    assert got["input_ids"].tolist() == expected["input_ids"]
    text = ours.tokenizer.decode(got["input_ids"][0], skip_special_tokens=False)
    assert "<0.3 seconds>" in text and "<1.4 seconds>" in text and "<2.6 seconds>" in text  # (0 + 5) / 2 / 8, ...
    np.testing.assert_array_equal(got["video_grid_thw"], expected["video_grid_thw"])
    assert got["video_grid_thw"].tolist() == [[3, 4, 4]]
    diff = np.abs(got["pixel_values_videos"] - expected["pixel_values_videos"])
    print(f"video file: max abs difference {diff.max():.4g}, {np.mean(diff > 0):.3%} of values differ")
    assert diff.max() <= VIDEO_TOL and np.mean(diff > 0) < 0.02

    # The file and its frames as an array at the file's rate: the same inputs, bit for bit.
    from_array = ours(text=bare, videos=[Video(frames, 8.0)])
    for key, value in from_array.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    # In a message's content, as the CLI passes --video.
    messages = [{"role": "user", "content": [{"type": "video", "video": path}, {"type": "text", "text": "?"}]}]
    np.testing.assert_array_equal(ours(messages)["pixel_values_videos"], got["pixel_values_videos"])


def test_video_file_without_a_frame_count_repeated_indices_and_a_given_rate(tmp_path):
    av = pytest.importorskip("av")
    frames = _gradient_frames(24)
    path = _write_video(tmp_path / "clip.mkv", frames, fps=8, codec="mpeg4", pix_fmt="yuv420p")
    with av.open(path) as container:  # Matroska records no frame count (transformers' PyAV reader gets 0)
        assert container.streams.video[0].frames == 0
        decoded = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    assert decoded.shape == frames.shape and np.abs(decoded.astype(int) - frames).mean() < 8  # lossy, but close
    settings = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8 * 4, max_pixels=8 * 8 * 40)
    for processor, video, as_array in [
            (VideoProcessor(**settings), path, Video(decoded, 8.0)),  # counted: 24 frames, 6 sampled
            (VideoProcessor(**settings, fps=None, num_frames=30), path, Video(decoded, 8.0)),  # indices repeat
            (VideoProcessor(**settings), Video(path, 4.0), Video(decoded, 4.0)),  # a rate given overrides the file's
            (VideoProcessor(**settings, do_sample_frames=False), path, Video(decoded, 8.0))]:
        got, expected = processor(video), processor(as_array)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
        assert got[2] == expected[2]
    assert VideoProcessor(**settings)(path)[1].tolist() == [[3, 4, 4]]
    assert VideoProcessor(**settings)(Video(path, 4.0))[1][0, 0] == 6  # 6 s at 2 fps: 12 frames, 6 patches
    repeated, indices, _ = read_video_file(path, VideoProcessor(fps=None, num_frames=30).sample_indices)
    assert len(repeated) == 30 and len(set(indices.tolist())) == 24
    np.testing.assert_array_equal(repeated, decoded[indices])


def test_video_files_missing_unreadable_or_without_pyav_are_named(tmp_path, monkeypatch):
    av = pytest.importorskip("av")
    processor = VideoProcessor(patch_size=4, merge_size=2, min_pixels=8 * 8 * 4, max_pixels=8 * 8 * 40)
    missing = tmp_path / "missing.mp4"
    with pytest.raises(ProcessorError, match=re.escape(f"videos[0]: video '{missing}' does not exist")):
        processor(str(missing))
    with pytest.raises(ProcessorError, match=re.escape(f"video file '{missing}' does not exist")):
        read_video_file(missing)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    with pytest.raises(ProcessorError, match=re.escape(f"videos[1]: {text}: not a readable video (InvalidDataError")):
        processor([np.zeros((4, 16, 16, 3), np.uint8), str(text)])
    sound = tmp_path / "sound.wav"
    with av.open(str(sound), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(ProcessorError, match=re.escape(f"{sound}: holds no video stream")):
        processor(str(sound))
    clip = _write_video(tmp_path / "clip.mov", _gradient_frames(8), fps=8)
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for i, frame in enumerate(_gradient_frames(8)):
        Image.fromarray(frame).save(frames_dir / f"{i:03d}.png")
    with_av = processor(clip)

    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed: `import av` raises ImportError
    with pytest.raises(MissingVideoDecoder, match=re.escape(f"videos[0]: {clip}: decoding a video file needs PyAV: "
                                                            "pip install av (or pip install 'qwenjax[video]')")):
        processor(clip)
    with pytest.raises(ImportError, match="pip install av"):
        read_video_file(clip)
    with pytest.raises(ValueError, match=re.escape(f"{clip}")):  # the CLI reports ValueErrors as one line
        processor([clip])
    from_dir, from_array = processor(str(frames_dir)), processor(Video(_gradient_frames(8), 8.0))  # no PyAV needed
    np.testing.assert_array_equal(from_dir[0], from_array[0])
    np.testing.assert_array_equal(with_av[0], from_array[0])  # the lossless file: the same frames


# ---- reading within limits, pictures processed ahead -------------------------------------------------------------
@pytest.mark.parametrize("form", ["file", "directory"])
def test_video_frames_are_resized_as_they_are_read(tmp_path, form):
    """A video from a file or a directory is never held at full size: each sampled frame is resized as it is
    decoded (the peak of traced allocations stays under 6 full frames of the 32 sampled), and the inputs are those
    of the frames resized afterwards."""
    frames = _gradient_frames(32, 240, 320)  # 230 kB a frame, 7.4 MB in all
    if form == "file":
        source, fps = _write_video(tmp_path / "clip.mov", frames, fps=8), 8.0
    else:
        source, fps = tmp_path / "frames", None
        source.mkdir()
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(source / f"{i:03d}.png")
    processor = VideoProcessor(patch_size=4, merge_size=2, min_pixels=8 * 8 * 4, max_pixels=8 * 8 * 64, fps=None,
                               num_frames=32)
    expected = processor(Video(frames, fps))
    tracemalloc.start()
    try:
        got = processor(str(source))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * frames[0].nbytes, f"peak {peak / 1e6:.1f} MB"
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prepared_pictures_are_taken_back_by_their_processor_only(tokenizers, monkeypatch):
    rng = np.random.default_rng(11)
    settings = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8 * 4, max_pixels=8 * 8 * 40)
    images, videos = ImageProcessor(**settings), VideoProcessor(**settings)
    image, frames = _random_image(rng, 30, 50), _random_image(rng, 5 * 24, 32).reshape(5, 24, 32, 3)
    prepared, prepared_video = images.prepare(image), videos.prepare(Video(frames, 4.0))
    assert isinstance(prepared, ProcessedPicture) and prepared.timestamps is None
    for got, expected in zip(images([prepared, image]), images([image, image])):
        np.testing.assert_array_equal(got, expected)
    for got, expected in zip(videos([prepared_video]), videos([Video(frames, 4.0)])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    with pytest.raises(ProcessorError, match=r"images\[1\]: a picture processed by another processor"):
        ImageProcessor(**{**settings, "max_pixels": 8 * 8 * 80})([image, prepared])
    with pytest.raises(ProcessorError, match=r"videos\[0\]: a picture processed by another processor"):
        videos([prepared])
    _, ours = _processors(tokenizers, monkeypatch, None)
    content = lambda picture: [{"role": "user", "content": [{"type": "image", "image": picture}]}]  # noqa: E731
    np.testing.assert_array_equal(ours(content(ours.image_processor.prepare(image)))["pixel_values"],
                                  ours(content(image))["pixel_values"])


def test_image_bytes_read_as_their_file_within_the_limits(tmp_path):
    rng = np.random.default_rng(12)
    path = tmp_path / "image.bmp"
    Image.fromarray(_random_image(rng, 20, 30)).save(path)
    np.testing.assert_array_equal(load_image(path.read_bytes()), load_image(str(path)))
    np.testing.assert_array_equal(load_image(path.read_bytes()), np.asarray(hf_load_image(str(path))))
    with pytest.raises(ProcessorError, match=r"picture: not a readable image \(Pillow cannot identify it; accepted "
                                             r"formats: PNG, JPEG\)"):
        load_image(path.read_bytes(), "picture", ReadLimits(image_formats=("PNG", "JPEG")))
    with pytest.raises(ProcessorError, match=r"picture: 30 x 20 pixels \(width x height\) = 600, above the limit "
                                             r"of 599 pixels"):
        load_image(path.read_bytes(), "picture", ReadLimits(max_pixels=599))
    assert load_image(str(path), limits=ReadLimits(max_pixels=600, root=str(tmp_path))).shape == (20, 30, 3)
    with pytest.raises(ProcessorError, match=r"is outside the allowed directory"):
        load_image(str(path), limits=ReadLimits(root=str(tmp_path / "elsewhere")))
    stored = Image.fromarray(_random_image(rng, 12, 20))
    for orientation in range(1, 9):  # every EXIF orientation, turned upright as transformers turns it
        exif = stored.getexif()
        exif[0x0112] = orientation
        stored.save(tmp_path / "turned.png", exif=exif)
        expected = np.asarray(hf_load_image(str(tmp_path / "turned.png")))
        assert expected.shape == ((12, 20, 3) if orientation < 5 else (20, 12, 3))
        np.testing.assert_array_equal(load_image(str(tmp_path / "turned.png")), expected)
        np.testing.assert_array_equal(load_image((tmp_path / "turned.png").read_bytes()), expected)


# ---- loading -----------------------------------------------------------------------------------------------------
QWEN35_IMAGE_CONFIG = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                       "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                       "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                       "image_processor_type": "Qwen2VLImageProcessorFast"}


def test_load_processor_reads_the_configs_and_names_bad_fields(tmp_path):
    write_tokenizer(tmp_path, byte_tokenizer())
    default = load_processor(tmp_path)  # no processor configs: transformers' class defaults
    assert (default.image_processor.patch_size, default.image_processor.min_pixels) == (14, 56 * 56)
    assert (default.video_processor.patch_size, default.video_processor.fps) == (16, 2.0)

    image_file, video_file = tmp_path / "preprocessor_config.json", tmp_path / "video_preprocessor_config.json"
    image_file.write_text(json.dumps(QWEN35_IMAGE_CONFIG))
    video_file.write_text(json.dumps({"size": {"longest_edge": 25165824, "shortest_edge": 4096}, "fps": 2,
                                      "max_frames": 64, "image_mean": 0.5, "image_std": 0.5}))
    loaded = load_processor(tmp_path)
    image, video = loaded.image_processor, loaded.video_processor
    assert (image.patch_size, image.min_pixels, image.max_pixels, image.image_mean) == (16, 65536, 16777216,
                                                                                       (0.5,) * 3)
    assert (video.max_frames, video.min_pixels, video.image_std) == (64, 4096, (0.5,) * 3)
    with pytest.raises(ProcessorError, match=re.escape("has no <|vision_start|>, <|vision_end|>, <|image_pad|>")):
        loaded(text=IMAGE_PLACEHOLDER, images=[_random_image(np.random.default_rng(0), 40, 40)])

    for content, message in [
            ("{not json", re.escape(f"{image_file}: not valid JSON")),
            (json.dumps({**QWEN35_IMAGE_CONFIG, "patch_size": "16"}),
             re.escape(f"{image_file} field `patch_size`: must be an integer, got '16'")),
            (json.dumps({**QWEN35_IMAGE_CONFIG, "size": {"shortest_edge": 4}}),
             re.escape(f"{image_file} field `size`: has no `longest_edge`")),
            (json.dumps({**QWEN35_IMAGE_CONFIG, "image_std": [0.5, 0, 0.5]}), r"field `image_std`\[1\]: must not be 0"),
            (json.dumps({**QWEN35_IMAGE_CONFIG, "size": {"shortest_edge": 9000, "longest_edge": 100}}),
             "field `size.shortest_edge` = 9000 is above")]:
        image_file.write_text(content)
        with pytest.raises(ProcessorError, match=message):
            load_processor(tmp_path)
    image_file.write_text(json.dumps(QWEN35_IMAGE_CONFIG))
    video_file.write_text(json.dumps({"num_frames": 8}))
    with pytest.raises(ProcessorError, match=re.escape(f"{video_file} field `num_frames` and ")):
        load_processor(tmp_path)
    video_file.write_text(json.dumps({"num_frames": 8, "fps": None}))
    assert load_processor(tmp_path).video_processor.num_frames == 8

    shutil.copy(os.path.join(REPO, "configs", "qwen3.5-9b.json"), tmp_path / "config.json")
    assert load_processor(tmp_path).image_processor.patch_size == 16  # agrees with its vision_config
    image_file.unlink()
    with pytest.raises(ProcessorError, match=r"preprocessor_config.json \(missing: default\) field `patch_size` = 14,"
                                             r" but .*config.json field `vision_config.patch_size` = 16"):
        load_processor(tmp_path)
