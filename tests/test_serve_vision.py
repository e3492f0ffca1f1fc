"""Images and videos in chat messages: the bundled vision model served by a real `qwenjax serve`, an image or a
video sent as a base64 data URL or a local file (a video also as a directory of frames), the reply equal to
`qwenjax.generate` on the processor's inputs."""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

import qwenjax
from qwenjax.demo import DEFAULT_VISION_MODEL_DIR
from qwenjax.inference.processor import load_processor
from qwenjax.inference.tokenizer import split_thinking
from test_serve_api import _metrics

openai = pytest.importorskip("openai")

EXAMPLE = os.path.join(DEFAULT_VISION_MODEL_DIR, "example.png")
QUESTION = "Describe the image."


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """The server's --allowed-local-media-path: the example image, another image of its size, and a 4-frame video
    as frame images (and, where PyAV is installed, as a file: png frames in QuickTime, lossless). Only the video
    file needs PyAV."""
    root = tmp_path_factory.mktemp("media")
    shutil.copy(EXAMPLE, root / "example.png")
    Image.open(EXAMPLE).convert("RGB").transpose(Image.Transpose.ROTATE_90).point(lambda v: 255 - v).save(
        root / "other.png")
    t, y, x = np.meshgrid(np.arange(4), np.arange(64), np.arange(64), indexing="ij")
    frames = np.stack([x * 4 - t * 9, y * 3 + t * 20, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    (root / "clip").mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(root / "clip" / f"{i:02d}.png")
    try:
        import av
    except ImportError:
        return str(root)
    with av.open(str(root / "clip.mov"), "w") as container:
        stream = container.add_stream("png", rate=2)
        stream.height, stream.width, stream.pix_fmt = 64, 64, "rgb24"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return str(root)


@pytest.fixture(scope="module")
def client(media):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "qwenjax.cli", "serve", "--model", DEFAULT_VISION_MODEL_DIR,
                             "--port", str(port), "--max-batch", "4", "--max-len", "512", "--dtype", "float32",
                             "--allowed-local-media-path", media, "--log-level", "warning", "--no-warmup"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"qwenjax serve did not start:\n{proc.stdout.read()}")
            time.sleep(0.5)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    proc.terminate()
    proc.wait(timeout=60)


def _ask(client, url: str, **kw):
    return client.chat.completions.create(model="tiny-vision", max_tokens=40, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": QUESTION}]}], **kw)


def _alone(content: list[dict], max_new_tokens: int = 40) -> tuple[str, str, int, int]:
    """(thinking, answer, prompt tokens, new tokens) of `qwenjax.generate` on the processor's inputs for one user
    message."""
    processor = load_processor(DEFAULT_VISION_MODEL_DIR)
    inputs = processor([{"role": "user", "content": content}])
    m = qwenjax.from_pretrained(DEFAULT_VISION_MODEL_DIR, dtype="float32")
    alone = qwenjax.generate(m, inputs["input_ids"], max_new_tokens=max_new_tokens, temperature=0.0,
                             **{k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")})[0]
    return (*split_thinking(processor.tokenizer.decode(alone), prompt_opened_thinking=True),
            inputs["input_ids"].shape[1], len(alone))


def _ask_video(client, url: str):
    return client.chat.completions.create(model="tiny-vision", max_tokens=24, temperature=0, messages=[
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, VIDEO_QUESTION]}])


VIDEO_QUESTION = {"type": "text", "text": "Describe the video."}


def test_a_video_as_a_directory_of_frames(client, media):
    """No PyAV needed: the frames are images."""
    path = os.path.join(media, "clip")
    thinking, answer, prompt_tokens, _ = _alone([{"type": "video", "video": path}, VIDEO_QUESTION], 24)
    r = _ask_video(client, path)
    assert (r.choices[0].message.reasoning_content or "", r.choices[0].message.content) == (thinking, answer)
    assert r.usage.prompt_tokens == prompt_tokens
    # not a video (the server's PyAV refuses it, or without PyAV it cannot read video files at all: a 400 either way)
    with pytest.raises(openai.BadRequestError, match="messages"):
        _ask_video(client, "data:video/mp4;base64," + base64.b64encode(b"not a video").decode())
    with pytest.raises(openai.BadRequestError, match="outside the server's --allowed-local-media-path"):
        _ask_video(client, DEFAULT_VISION_MODEL_DIR)


def test_a_video_as_a_file_or_a_data_url(client, media):
    pytest.importorskip("av", reason="decoding a video file needs PyAV (pip install av); frames directories and "
                                     "images do not")
    path = os.path.join(media, "clip.mov")
    thinking, answer, prompt_tokens, _ = _alone([{"type": "video", "video": path}, VIDEO_QUESTION], 24)
    r = _ask_video(client, path)
    assert (r.choices[0].message.reasoning_content or "", r.choices[0].message.content) == (thinking, answer)
    assert r.usage.prompt_tokens == prompt_tokens
    with open(path, "rb") as f:
        data_url = "data:video/quicktime;base64," + base64.b64encode(f.read()).decode()
    assert _ask_video(client, data_url).choices[0].message.content == answer


def test_an_image_as_a_data_url_or_a_local_file(client, media):
    _, answer, prompt_tokens, new_tokens = _alone([{"type": "image", "image": EXAMPLE},
                                                   {"type": "text", "text": QUESTION}])
    with open(EXAMPLE, "rb") as f:
        data_url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    r = _ask(client, data_url)
    assert r.choices[0].message.content == answer and "circle" in answer
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, new_tokens)
    local = os.path.join(media, "example.png")
    assert _ask(client, local).choices[0].message.content == answer
    streamed = _ask(client, "file://" + local, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip() == answer


def test_pictures_skip_the_prefix_cache(client, media):
    """Two images of one size make prompts of the same tokens (the same number of image pads): the second must not
    restore the first's cache row. It is answered as `generate` answers it, with no cached tokens, and neither
    image prompt is looked up or leaves a snapshot; a text chat on the same server does (the cache is on)."""
    url = str(client.base_url).removesuffix("/v1/")
    metrics = lambda: {k: v for k, v in _metrics(url).items() if k.startswith("qwenjax_prefix_cache_")}
    example, other = (os.path.join(media, name) for name in ("example.png", "other.png"))
    _, answer, prompt_tokens, new_tokens = _alone([{"type": "image", "image": other},
                                                   {"type": "text", "text": QUESTION}])
    assert answer != _alone([{"type": "image", "image": example}, {"type": "text", "text": QUESTION}])[1]
    before = metrics()
    assert _ask(client, example).usage.prompt_tokens == prompt_tokens
    r = _ask(client, other)
    assert r.choices[0].message.content == answer
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.prompt_tokens_details.cached_tokens) == (
        prompt_tokens, new_tokens, 0)
    assert metrics() == before
    client.chat.completions.create(model="tiny-vision", max_tokens=4, temperature=0,
                                   messages=[{"role": "user", "content": QUESTION}])
    after = metrics()
    assert after["qwenjax_prefix_cache_lookups_total"] == before["qwenjax_prefix_cache_lookups_total"] + 1
    assert after["qwenjax_prefix_cache_entries"] > before["qwenjax_prefix_cache_entries"]


@pytest.mark.parametrize("url, names", [
    ("data:image/png;base64,!!notbase64", "not a readable image"),
    ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "not a readable image"),
    ("data:image/png,rawbytes", "base64"),
    ("http://example.com/cat.png", "not fetched"),
    ("/etc/passwd", "outside the server's --allowed-local-media-path"),
])
def test_bad_images_get_a_400(client, media, url, names):
    with pytest.raises(openai.BadRequestError, match=names):
        _ask(client, url)
    assert _ask(client, os.path.join(media, "example.png")).choices[0].finish_reason in ("stop", "length")


def test_hostile_pictures_get_a_400_naming_the_part(client, media):
    """Issue 37's probes over HTTP: an EXIF-rotated JPEG read alike by path and data URL (as `generate` reads the
    file); a video data URL with a 300-character media type, an image over --max-image-pixels (the default, 2^24)
    and a frame linked out of --allowed-local-media-path each get a 400 naming the part; the server goes on."""
    rotated = os.path.join(media, "rotated.jpg")
    upright = Image.open(EXAMPLE).convert("RGB")
    exif = upright.getexif()
    exif[0x0112] = 6  # stored turned a quarter left, shown upright
    upright.transpose(Image.Transpose.ROTATE_90).save(rotated, "JPEG", exif=exif, quality=95)
    _, answer, prompt_tokens, _ = _alone([{"type": "image", "image": rotated}, {"type": "text", "text": QUESTION}])
    with open(rotated, "rb") as f:
        data_url = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
    for url in (rotated, data_url):
        r = _ask(client, url)
        assert (r.choices[0].message.content, r.usage.prompt_tokens) == (answer, prompt_tokens)

    big = os.path.join(media, "big.png")
    Image.new("L", (4097, 4096), 200).save(big)  # a few kB of PNG, 16.8M pixels
    with open(big, "rb") as f:
        big_url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    outside = os.path.join(os.path.dirname(media), "outside-" + os.path.basename(media))
    os.makedirs(outside, exist_ok=True)
    shutil.copy(EXAMPLE, os.path.join(outside, "secret.png"))
    linked = os.path.join(media, "linked")
    shutil.copytree(os.path.join(media, "clip"), linked)
    os.remove(os.path.join(linked, "01.png"))
    os.symlink(os.path.join(outside, "secret.png"), os.path.join(linked, "01.png"))
    for ask, url, names in [
            (_ask_video, "data:video/" + "x" * 300 + ";base64,AAAA", "is not a valid media type"),
            (_ask, big, "above the server's limit (--max-image-pixels) of 16,777,216"),
            (_ask, big_url, "above the server's limit (--max-image-pixels) of 16,777,216"),
            (_ask_video, linked, "is outside the server's --allowed-local-media-path")]:
        with pytest.raises(openai.BadRequestError, match=re.escape(names)) as refused:
            ask(client, url)
        assert refused.value.param == "messages[0].content[0]" and "secret" not in str(refused.value)
    assert _ask(client, os.path.join(media, "example.png")).choices[0].finish_reason in ("stop", "length")
