"""The bundled default model (qwenjax/assets/tiny-pydoc, made by scripts/train_default_model.py): it is a
complete Hugging Face directory within the size limit, it has learned Python's documentation, and
`qwenjax generate` with no arguments completes text with it."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenjax
from qwenjax.cli import DEFAULT_COMPLETION_PROMPT, main
from qwenjax.demo import DEFAULT_MODEL_DIR
from qwenjax.inference.tokenizer import Tokenizer

# A passage in the style of the docs it was trained on, written for this test (not copied from the corpus).
DOC_TEXT = ("Return a new list containing all items from the iterable in ascending order. A custom key function "
            "can be supplied to customize the sort order, and the reverse flag can be set to request the result "
            "in descending order.")


@pytest.fixture(scope="module")
def bundled():
    assert os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, "config.json")), (
        f"{DEFAULT_MODEL_DIR} is missing: run python scripts/train_default_model.py")
    return qwenjax.from_pretrained(DEFAULT_MODEL_DIR, dtype="float32"), Tokenizer(DEFAULT_MODEL_DIR)


def _loss(m, ids) -> float:
    ids = np.asarray(ids, np.int32)[None]
    logp = jax.nn.log_softmax(jnp.asarray(m(ids), jnp.float32)[0, :-1])
    return float(-jnp.take_along_axis(logp, jnp.asarray(ids[0, 1:, None]), axis=-1).mean())


def test_bundled_model_is_a_small_complete_hf_directory():
    files = set(os.listdir(DEFAULT_MODEL_DIR))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "training.json"} <= files
    size = sum(os.path.getsize(os.path.join(DEFAULT_MODEL_DIR, f)) for f in files)
    assert size <= 20e6, f"{size / 1e6:.1f} MB"
    card = json.load(open(os.path.join(DEFAULT_MODEL_DIR, "training.json")))
    assert card["heldout_loss"] < 0.5 * np.log(4096), card  # far below a uniform guess over its vocabulary


def test_bundled_model_has_learned_the_docs(bundled):
    m, tok = bundled
    ids = tok.encode(DOC_TEXT)
    rng = np.random.default_rng(0)
    shuffled = list(np.asarray(ids)[rng.permutation(len(ids))])
    doc, noise = _loss(m, ids), _loss(m, shuffled)
    # A text it never saw: a uniform guess costs ln(4096) = 8.3 nats per token, and the shipped model (held-out
    # loss 3.96 on its own corpus) measured 5.0 here, 9.0 on the same tokens shuffled. Asserted: over 15x less
    # perplexity than a guess, and word order carries > 2.5 nats per token; a random init gives ~8.3 for both.
    assert doc < np.log(4096) - np.log(15) and noise > doc + 2.5, (doc, noise)


def test_cli_generate_without_model_completes_with_the_bundled_model(capsys):
    assert main(["generate", "--max-new-tokens", "24", "--dtype", "float32"]) == 0
    out, err = capsys.readouterr()
    assert "bundled" in err and "not a chat model" in err
    assert "[thinking]" not in out  # completion: no chat template, no thinking block
    words = out.split()
    assert len(words) >= 5 and sum(w.isalpha() for w in words) >= len(words) // 2, out
    assert out.startswith(DEFAULT_COMPLETION_PROMPT) and len(out) > len(DEFAULT_COMPLETION_PROMPT) + 20
