"""Tokenizer, chat template and the generate/chat command lines, on the demo checkpoint qwenjax writes itself."""

import io
import os
import re
import shutil

import pytest

import qwenjax
from qwenjax.cli import main
from qwenjax.demo import DEFAULT_MODEL_DIR, write_random_checkpoint
from qwenjax.inference.generate import generate
from qwenjax.inference.tokenizer import StreamDecoder, Tokenizer, TokenizerError, split_thinking

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, who are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nA greeting.\n</think>\n\nHello!"},
     {"role": "user", "content": "Ünïcödé and emoji 🙂?"}],
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("demo"))


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_template_and_ids_equal_transformers(demo, thinking):
    transformers = pytest.importorskip("transformers")
    ours, ref = Tokenizer(demo), transformers.AutoTokenizer.from_pretrained(demo)
    for conv in CONVERSATIONS:
        text = ours.apply_chat_template(conv, enable_thinking=thinking)
        assert text == ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=True,
                                               enable_thinking=thinking)
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert text.endswith("<think>\n" if thinking else "<think>\n\n</think>\n\n")
    assert "A greeting." not in text  # earlier turns' thinking is dropped by the template


def test_template_from_tokenizer_config(demo, tmp_path):
    import json

    moved = tmp_path / "template-in-config"
    shutil.copytree(demo, moved)
    template = (moved / "chat_template.jinja").read_text()
    os.remove(moved / "chat_template.jinja")
    config = json.loads((moved / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": template}, {"name": "tool_use", "template": "x"}]
    (moved / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer(moved).apply_chat_template(CONVERSATIONS[1]) == Tokenizer(demo).apply_chat_template(
        CONVERSATIONS[1])


def test_decode_round_trip_and_streaming_never_splits_characters(demo):
    tok = Tokenizer(demo)
    text = "héllo 🙂 wörld"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_split_thinking():
    assert split_thinking("Let me see.\n</think>\n\nFour.", prompt_opened_thinking=True) == ("Let me see.", "Four.")
    assert split_thinking("<think>\nhm\n</think>\nYes") == ("hm", "Yes")
    assert split_thinking("still thinking", prompt_opened_thinking=True) == ("still thinking", "")
    assert split_thinking("Just an answer.") == ("", "Just an answer.")


def test_stop_strings(demo):
    m, tok = qwenjax.from_pretrained(demo, dtype="float32"), Tokenizer(demo)
    prompt = tok.encode(tok.apply_chat_template(CONVERSATIONS[0]))
    free = generate(m, [prompt], max_new_tokens=12)[0]
    stop = tok.decode(free[4:6], skip_special_tokens=False)
    out = generate(m, [prompt], max_new_tokens=12, stop_strings=[stop], tokenizer=tok)[0]
    assert stop in tok.decode(out, skip_special_tokens=False) and len(out) <= 6 and out == free[:len(out)]
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        generate(m, [prompt], stop_strings=["x"])


def test_missing_tokenizer_and_template_fail_clearly(demo, tmp_path):
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(demo, bare)
    os.remove(bare / "tokenizer.json")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer(bare)
    assert main(["generate", "--model", str(bare), "--max-new-tokens", "2"]) == 2
    no_template = tmp_path / "no-template"
    shutil.copytree(demo, no_template)
    os.remove(no_template / "chat_template.jinja")
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer(no_template).apply_chat_template(CONVERSATIONS[0])


def test_cli_unknown_model_path(capsys):
    assert main(["generate", "--model", "/does/not/exist"]) == 2
    assert "/does/not/exist" in capsys.readouterr().err


def test_cli_generate_streams_from_a_random_model_without_the_bundled_one(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("qwenjax.demo.DEFAULT_MODEL_DIR", str(tmp_path / "absent"))
    assert main(["generate", "--max-new-tokens", "6", "--dtype", "float32"]) == 0
    out, err = capsys.readouterr()
    assert "RANDOM model" in err and "6 new tokens" in err
    assert out.startswith("[thinking]\n")


def test_cli_chat_keeps_history(demo, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAnd again?\n/reset\nFresh start\n/exit\n"))
    assert main(["chat", "--model", demo, "--max-new-tokens", "3", "--no-thinking", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    n_prompt = [int(line.split()[0][1:]) for line in err.splitlines() if "prompt tokens" in line]
    assert len(n_prompt) == 3
    assert n_prompt[1] > n_prompt[0] + 3   # the second turn carries the first exchange
    assert n_prompt[2] < n_prompt[1]       # /reset dropped it


def test_cli_stream_splits_thinking_from_answer(demo, monkeypatch, capsys):
    from qwenjax.cli import _stream_reply

    tok = Tokenizer(demo)
    ids = tok.encode("Two and two.\n</think>\n\nFour 🙂.")  # byte tokens: '</think>' arrives piece by piece too
    text = _stream_reply(tok, iter(ids), thinking=True, prompt_len=2)
    assert capsys.readouterr().out == "[thinking]\nTwo and two.\n[answer]\nFour 🙂.\n"
    assert split_thinking(text, prompt_opened_thinking=True) == ("Two and two.", "Four 🙂.")


@pytest.mark.parametrize("speculative", [0, 2])
def test_cli_chat_prefills_only_each_turns_new_tokens(demo, monkeypatch, capsys, speculative):
    """`qwenjax chat` keeps the conversation in the serving engine's prefix cache: the second turn restores the
    first turn's history and prefills the rest; the replies are what `qwenjax.generate` gives each whole prompt,
    with MTP drafts too (the bundled model's trained head)."""
    if speculative:
        demo = DEFAULT_MODEL_DIR
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAnd again?\n/exit\n"))
    assert main(["chat", "--model", demo, "--max-new-tokens", "6", "--no-thinking", "--temperature", "0",
                 "--dtype", "float32", "--speculative", str(speculative)]) == 0
    out, err = capsys.readouterr()
    assert ("drafts accepted" in err) == bool(speculative)
    cached = [int(re.search(r"; (\d+) prompt tokens from the prefix cache", line).group(1))
              for line in err.splitlines() if "prompt tokens," in line]
    tok = Tokenizer(demo)
    m = qwenjax.from_pretrained(demo, dtype="float32")
    history, replies = [], []
    for message in ("Hello", "And again?"):
        history.append({"role": "user", "content": message})
        ids = tok.encode(tok.apply_chat_template(history, enable_thinking=False))
        replies.append(tok.decode(qwenjax.generate(m, [ids], max_new_tokens=6, temperature=0.0)[0]))
        history.append({"role": "assistant", "content": split_thinking(replies[-1])[1]})
    first = tok.encode(tok.apply_chat_template(history[:1], add_generation_prompt=False, enable_thinking=False))
    assert cached == [0, len(first)]
    assert out == "".join(r + "\n" for r in replies)


def test_stream_decoder_pieces_join_to_the_whole_decode(demo):
    """The windowed decoder's pieces are the text of the whole reply, with special tokens skipped or kept."""
    tok = Tokenizer(demo)
    ids = tok.encode("<think>\nmaybe 🙂</think>\n\nsí — ok 🙂🙂<|im_end|>") + tok.encode("日本語 text")
    for skip in (True, False):
        dec = StreamDecoder(tok, skip_special_tokens=skip)
        pieces = [dec.push(i) for i in ids]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in p for p in pieces)
