"""The server's reading of image_url and video_url parts (qwenjax/serve/media.py, `Pictures`), as the routes use
it (each part read, then `processor.expand`), held to hostile requests: media types, links out of
--allowed-local-media-path, images too large to decode; and its pixels against transformers' image loader and
processor (`transformers.image_utils.load_image`, `Qwen2VLImageProcessorPil`)."""

from __future__ import annotations

import base64
import concurrent.futures
import os
import re
import subprocess
import sys

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
pytest.importorskip("transformers")

from PIL import Image, ImageFile  # noqa: E402
from transformers.image_utils import load_image as hf_load_image  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

import qwenjax.serve.media as media  # noqa: E402
from qwenjax.demo import DEFAULT_VISION_MODEL_DIR  # noqa: E402
from qwenjax.inference.processor import Video, load_processor  # noqa: E402
from qwenjax.serve.errors import APIError  # noqa: E402
from qwenjax.serve.media import Pictures  # noqa: E402

WHERE = "messages[0].content[0]"


@pytest.fixture(scope="module")
def processor():
    return load_processor(DEFAULT_VISION_MODEL_DIR)


def _data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def _expand(pictures: Pictures, part: dict, scratch) -> dict:
    """The model inputs of one user message holding `part`, read as the chat route reads it."""
    kind = part["type"]
    read = pictures.image(part[kind], WHERE) if kind == "image_url" else \
        pictures.video(part[kind], WHERE, str(scratch))
    picture = {"type": "image" if kind == "image_url" else "video", "image" if kind == "image_url" else "video": read}
    return pictures.processor.expand([{"role": "user", "content": [picture, {"type": "text", "text": "?"}]}])[1]


def _refused(pictures: Pictures, part: dict, scratch) -> str:
    """The message of the 400 that reading `part` must give; it names the part."""
    with pytest.raises(APIError) as refused:
        _expand(pictures, part, scratch)
    assert (refused.value.status, refused.value.param) == (400, WHERE)
    assert refused.value.message.startswith(f"{WHERE}: ")
    return refused.value.message


def _write_video(path, frames, fps=4):
    """`frames` ([T, H, W, 3] uint8) as png frames in QuickTime: lossless."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=fps)
        stream.height, stream.width, stream.pix_fmt = *frames.shape[1:3], "rgb24"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def _frames(count=4, height=40, width=56, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


# ---- probe 4: a video data URL's media type ---------------------------------------------------------------------
def test_a_video_data_url_with_a_long_or_unknown_media_type_is_a_400_naming_the_part(processor, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    pictures = Pictures(processor)
    clip = b"\x00\x00\x00\x18ftypmp42" + bytes(64)
    for media_type in ["video/" + "x" * 300, "video/x-evil", "video/../../etc/passwd", "video/mp4/../x", "video",
                       "", "image/png", "text/plain"]:
        message = _refused(pictures, {"type": "video_url", "video_url": {"url": _data_url(media_type, clip)}},
                           scratch)
        assert len(message) < 600 and "x" * 100 not in message  # the client's text is not echoed whole
    message = _refused(pictures, {"type": "video_url", "video_url": {"url": _data_url("video/x-evil", clip)}},
                       scratch)
    assert "video/mp4" in message and "video/webm" in message  # the types the server reads
    for media_type in ["image/" + "x" * 300, "video/mp4", "text/plain", ""]:  # image_url: an image/* type
        _refused(pictures, {"type": "image_url", "image_url": {"url": _data_url(media_type, b"\x89PNG")}}, scratch)
    assert os.listdir(scratch) == []  # nothing is written, so no file name is made from the request


def test_a_video_data_url_is_read_as_its_file(processor, tmp_path):
    frames = _frames(6)
    path = _write_video(tmp_path / "clip.mov", frames)
    with open(path, "rb") as f:
        data = f.read()
    expected = processor.video_processor(Video(frames, 4.0))
    pictures = Pictures(processor, str(tmp_path))
    for url in [_data_url("video/quicktime", data), _data_url("video/mp4", data), path]:  # mp4: the same demuxer
        got = _expand(pictures, {"type": "video_url", "video_url": {"url": url}}, tmp_path)
        np.testing.assert_array_equal(got["pixel_values_videos"], expected[0])
        np.testing.assert_array_equal(got["video_grid_thw"], expected[1])


def test_unreadable_bytes_and_invalid_paths_are_a_400_naming_the_part(processor, tmp_path):
    pictures = Pictures(processor, str(tmp_path))
    for url in [str(tmp_path / "a\0b.png"), "file://" + str(tmp_path) + "/\0"]:
        for kind in ("image_url", "video_url"):
            assert "not a valid path (it holds a NUL character)" in _refused(pictures, {"type": kind, kind: url},
                                                                              tmp_path)
    long_path = str(tmp_path / ("a" * 200)) * 30  # 6000 characters: not echoed whole
    assert len(_refused(pictures, {"type": "video_url", "video_url": long_path}, tmp_path)) < 1200
    # garbage as an image, in a fresh process: Pillow has then registered only its commonest plugins
    code = ("import base64; from qwenjax.demo import DEFAULT_VISION_MODEL_DIR as d; "
            "from qwenjax.inference.processor import load_processor; from qwenjax.serve.media import Pictures; "
            "from qwenjax.serve.errors import APIError\n"
            "try: Pictures(load_processor(d)).image('data:image/png;base64,' + base64.b64encode(b'garbage' * 9)"
            ".decode(), 'm')\nexcept APIError as e: print(e.status, e.message)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.startswith("400 m: the image: not a readable image (Pillow cannot identify it; accepted formats: "
                                 "PNG, JPEG, MPO, WEBP"), out.stdout + out.stderr


# ---- probe 5: every file read resolved within --allowed-local-media-path -----------------------------------------
def test_frames_linked_out_of_the_allowed_directory_are_refused_saying_nothing_of_them(processor, tmp_path):
    root, outside = tmp_path / "media", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    frames = _frames(4, seed=1)
    Image.fromarray(frames[2]).save(outside / "secret.png")
    (outside / "notes.txt").write_text("the password is hunter2\n")
    (outside / "subdir").mkdir()
    pictures = Pictures(processor, str(root))
    messages = []
    for n, target in enumerate(["secret.png", "notes.txt", "missing.png", "subdir"]):
        clip = root / f"clip{n}"
        clip.mkdir()
        for i in (0, 1, 3):
            Image.fromarray(frames[i]).save(clip / f"{i:03d}.png")
        (clip / "002.png").symlink_to(outside / target)
        message = _refused(pictures, {"type": "video_url", "video_url": {"url": str(clip)}}, tmp_path)
        assert "outside the server's --allowed-local-media-path" in message
        assert not re.search("elsewhere|secret|notes|hunter|missing|subdir|not a readable", message), message
        messages.append(message.replace(f"clip{n}", "clip"))
    assert len(set(messages)) == 1, messages  # whatever the link leads to (or not), the same answer

    # links that stay inside the root are followed: the same inputs as the frames themselves
    inside = root / "frames"
    inside.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(root / f"frame{i}.png")
        (inside / f"{i:03d}.png").symlink_to(root / f"frame{i}.png")
    got = _expand(pictures, {"type": "video_url", "video_url": {"url": str(inside)}}, tmp_path)
    np.testing.assert_array_equal(got["pixel_values_videos"], processor.video_processor(Video(frames))[0])


def test_a_playlist_in_the_allowed_directory_cannot_open_files_outside_it(processor, tmp_path):
    """FFmpeg picks the demuxer from the content: an HLS playlist (or a concat list) opens the files it names."""
    root, outside = tmp_path / "media", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    secret = _write_video(outside / "secret.mov", _frames(4, seed=2))
    playlist = root / "clip.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:4\n#EXTINF:4,\nfile://{secret}\n#EXT-X-ENDLIST\n")
    message = _refused(Pictures(processor, str(root)), {"type": "video_url", "video_url": {"url": str(playlist)}},
                       tmp_path)
    assert "not a readable video" in message and "secret" not in message


# ---- probe 9: one image loader for paths and data URLs, as transformers' -----------------------------------------
def _rotated_jpeg(path):
    """A JPEG whose EXIF orientation (6: rotate 90° clockwise to view) turns 48 x 80 stored pixels upright. Wrong:
    the stored pixels (the file opened, its orientation not applied)."""
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, "JPEG", exif=exif, quality=95)
    return "image/jpeg", Image.open(path)


def _rgba_png(path):
    """Transparency varying over the image: transformers' loader drops the alpha band. Wrong: compositing it on
    white (as transformers' processor does to an RGBA image given in memory)."""
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (56, 40, 4), dtype=np.uint8)).save(path, "PNG")
    return "image/png", Image.open(path)


def _palette_png(path):
    """A palette image with a transparent colour (PNG tRNS): transformers' loader keeps it as a transparent RGB
    colour, which its processor composites on white. Wrong: the palette's colour (transparency dropped)."""
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (40, 72, 3), dtype=np.uint8)).quantize(16)
    image.save(path, "PNG", transparency=3)
    return "image/png", np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("write", [_rotated_jpeg, _rgba_png, _palette_png])
def test_an_image_by_path_or_data_url_gives_transformers_pixels(processor, tmp_path, write):
    path = tmp_path / ("image.jpg" if write is _rotated_jpeg else "image.png")
    media_type, wrong = write(path)
    data_url = _data_url(media_type, path.read_bytes())
    hf = Qwen2VLImageProcessorPil.from_pretrained(DEFAULT_VISION_MODEL_DIR)
    expected = hf(hf_load_image(str(path)), return_tensors="np")
    from_url = hf(hf_load_image(data_url), return_tensors="np")
    np.testing.assert_array_equal(from_url["pixel_values"], expected["pixel_values"])  # transformers: one loader
    assert not np.array_equal(processor.image_processor(wrong)[0], expected["pixel_values"])  # the case matters

    pictures = Pictures(processor, str(tmp_path))
    for url in [str(path), "file://" + str(path), data_url]:
        got = _expand(pictures, {"type": "image_url", "image_url": {"url": url}}, tmp_path)
        np.testing.assert_array_equal(got["pixel_values"], expected["pixel_values"], err_msg=url)
        np.testing.assert_array_equal(got["image_grid_thw"], expected["image_grid_thw"])
    library = processor([{"role": "user", "content": [{"type": "image", "image": str(path)}]}])  # generate's path
    np.testing.assert_array_equal(library["pixel_values"], expected["pixel_values"])


# ---- probe 10: a pixel cap, checked before decoding --------------------------------------------------------------
@pytest.fixture
def decodes(monkeypatch):
    """The sizes of the images Pillow decodes (`ImageFile.load` with tiles left to decode)."""
    sizes, load = [], ImageFile.ImageFile.load

    def counted(image):
        if image.tile:
            sizes.append(image.size)
        return load(image)
    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    return sizes


def test_an_image_over_the_pixel_cap_is_refused_before_it_is_decoded(processor, tmp_path, decodes):
    assert media.DEFAULT_MAX_IMAGE_PIXELS == 4096 * 4096
    over, at = tmp_path / "over.png", tmp_path / "at.png"
    Image.new("L", (4097, 4096), 128).save(over)  # compresses to a few kB: a small request, 16.8M pixels
    Image.new("L", (4096, 4096), 128).save(at)
    pictures = Pictures(processor, str(tmp_path))
    for url in [str(over), _data_url("image/png", over.read_bytes())]:
        message = _refused(pictures, {"type": "image_url", "image_url": {"url": url}}, tmp_path)
        assert "4097 x 4096 pixels (width x height) = 16,781,312" in message
        assert "16,777,216 pixels" in message and "--max-image-pixels" in message
    assert decodes == []
    _expand(pictures, {"type": "image_url", "image_url": {"url": str(at)}}, tmp_path)  # at the cap: read
    assert decodes == [(4096, 4096)]


def test_the_pixel_cap_is_a_setting_and_holds_for_video_frames(processor, tmp_path, decodes):
    small, wide = tmp_path / "small.png", tmp_path / "wide.png"
    Image.new("RGB", (64, 40)).save(small)
    Image.new("RGB", (65, 40)).save(wide)
    pictures = Pictures(processor, str(tmp_path), max_image_pixels=64 * 40)
    _expand(pictures, {"type": "image_url", "image_url": {"url": str(small)}}, tmp_path)
    assert "65 x 40 pixels" in _refused(pictures, {"type": "image_url", "image_url": {"url": str(wide)}}, tmp_path)
    clip = tmp_path / "clip"
    clip.mkdir()
    for i, frame in enumerate(_frames(4, 40, 65)):
        Image.fromarray(frame).save(clip / f"{i:03d}.png")
    assert decodes == [(64, 40)]
    assert "000.png: 65 x 40 pixels" in _refused(pictures, {"type": "video_url", "video_url": {"url": str(clip)}},
                                                 tmp_path)
    assert decodes == [(64, 40)]  # no frame decoded
    unlimited = Pictures(processor, str(tmp_path), max_image_pixels=None)
    _expand(unlimited, {"type": "video_url", "video_url": {"url": str(clip)}}, tmp_path)
    for bad in (0, -1, 2.5, True, "16M"):
        with pytest.raises(ValueError, match="--max-image-pixels must be a positive whole number"):
            Pictures(processor, max_image_pixels=bad)


def test_the_pixel_cap_holds_for_video_files(processor, tmp_path):
    path = _write_video(tmp_path / "clip.mov", _frames(4, 40, 65))
    with open(path, "rb") as f:
        data_url = _data_url("video/quicktime", f.read())
    pictures = Pictures(processor, str(tmp_path), max_image_pixels=64 * 40)
    for url in [path, data_url]:
        message = _refused(pictures, {"type": "video_url", "video_url": {"url": url}}, tmp_path)
        assert "65 x 40 pixels (width x height) = 2,600, above the server's limit (--max-image-pixels) of 2,560" \
            in message
    _expand(Pictures(processor, str(tmp_path), max_image_pixels=65 * 40), {"type": "video_url",
                                                                          "video_url": {"url": path}}, tmp_path)


# ---- off the event loop ------------------------------------------------------------------------------------------
def test_pictures_read_in_threads_equal_one_at_a_time(processor, tmp_path):
    parts = []
    for i in range(8):
        path = tmp_path / f"image{i}.png"
        size = (40 + 8 * i, 64 - 4 * i)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        url = str(path) if i % 2 else _data_url("image/png", path.read_bytes())
        parts.append({"type": "image_url", "image_url": {"url": url}})
    clip = _frames(6, seed=9)
    for i, frame in enumerate(clip):
        (tmp_path / "clip").mkdir(exist_ok=True)
        Image.fromarray(frame).save(tmp_path / "clip" / f"{i:03d}.png")
    parts += [{"type": "video_url", "video_url": {"url": str(tmp_path / "clip")}}] * 4
    pictures = Pictures(processor, str(tmp_path))
    alone = [_expand(pictures, part, tmp_path) for part in parts]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda part: _expand(pictures, part, tmp_path), parts * 3))
    for i, got in enumerate(together):
        for key, value in alone[i % len(parts)].items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{i} {key}")
