"""Images in chat messages: the bundled vision model served by a real `qwenjax serve`, an image sent as a base64
data URL or a local file, the reply equal to `qwenjax.generate` on the processor's inputs."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import qwenjax
from qwenjax.demo import DEFAULT_VISION_MODEL_DIR
from qwenjax.inference.processor import load_processor
from qwenjax.inference.tokenizer import split_thinking

openai = pytest.importorskip("openai")

EXAMPLE = os.path.join(DEFAULT_VISION_MODEL_DIR, "example.png")
QUESTION = "Describe the image."


@pytest.fixture(scope="module")
def client():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "qwenjax.cli", "serve", "--model", DEFAULT_VISION_MODEL_DIR,
                             "--port", str(port), "--max-batch", "4", "--max-len", "512", "--dtype", "float32",
                             "--allowed-local-media-path", DEFAULT_VISION_MODEL_DIR, "--log-level", "warning"],
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


def test_an_image_as_a_data_url_or_a_local_file(client):
    processor = load_processor(DEFAULT_VISION_MODEL_DIR)
    inputs = processor([{"role": "user", "content": [{"type": "image", "image": EXAMPLE},
                                                      {"type": "text", "text": QUESTION}]}])
    m = qwenjax.from_pretrained(DEFAULT_VISION_MODEL_DIR, dtype="float32")
    alone = qwenjax.generate(m, inputs["input_ids"], max_new_tokens=40, temperature=0.0,
                             **{k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")})[0]
    thinking, answer = split_thinking(processor.tokenizer.decode(alone), prompt_opened_thinking=True)
    with open(EXAMPLE, "rb") as f:
        data_url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    r = _ask(client, data_url)
    assert r.choices[0].message.content == answer and "circle" in answer
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (inputs["input_ids"].shape[1], len(alone))
    assert _ask(client, EXAMPLE).choices[0].message.content == answer
    streamed = _ask(client, "file://" + EXAMPLE, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip() == answer


@pytest.mark.parametrize("url, names", [
    ("data:image/png;base64,!!notbase64", "not a readable image"),
    ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "not a readable image"),
    ("data:image/png,rawbytes", "base64"),
    ("http://example.com/cat.png", "not fetched"),
    ("/etc/passwd", "outside the server's --allowed-local-media-path"),
])
def test_bad_images_get_a_400(client, url, names):
    with pytest.raises(openai.BadRequestError, match=names):
        _ask(client, url)
    assert _ask(client, EXAMPLE).choices[0].finish_reason in ("stop", "length")  # still serving
