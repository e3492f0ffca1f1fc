"""Malformed tokenizer files and hostile chat templates: each is a TokenizerError naming the file (and field), and
rendering a template is bounded in output length and time."""

import json
import re
import sys

import pytest

from qwenjax.demo import write_tokenizer
from qwenjax.inference.tokenizer import Tokenizer, TokenizerError
from qwenjax.validate import InputError


@pytest.fixture
def checkpoint(tmp_path):
    """A directory with the demo checkpoint's tokenizer files (tokenizer.json, tokenizer_config.json,
    chat_template.jinja) and nothing else."""
    write_tokenizer(tmp_path)
    return tmp_path


def edit_config(checkpoint, **fields):
    path = checkpoint / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def template_only_in_config(checkpoint, template):
    (checkpoint / "chat_template.jinja").unlink()
    edit_config(checkpoint, chat_template=template)


def with_template(checkpoint, source: str) -> Tokenizer:
    (checkpoint / "chat_template.jinja").write_text(source)
    return Tokenizer(checkpoint)


def named(path, *rest: str) -> str:
    """A `match` pattern: the file's path, then each of `rest`, in that order."""
    return ".*".join(map(re.escape, (str(path), *rest)))


USER = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("content, reason", [
    (b"{not json", "line 1"), (b"[]", "sequence"), (b'{"model": 5}', "variant"), (b"\xff\xfe{}", "UTF-8")])
def test_malformed_tokenizer_json(checkpoint, content, reason):
    (checkpoint / "tokenizer.json").write_bytes(content)
    with pytest.raises(TokenizerError, match=named(checkpoint / "tokenizer.json", "not a usable tokenizer", reason)):
        Tokenizer(checkpoint)
    assert issubclass(TokenizerError, InputError)  # so callers catching the validation layer's errors get these


@pytest.mark.parametrize("content, problem", [
    (b"[]", "must hold a JSON object"), (b"{not json", "not valid JSON"), (b'{"eos_token": "\xff"}', "not UTF-8")])
def test_malformed_tokenizer_config(checkpoint, content, problem):
    (checkpoint / "tokenizer_config.json").write_bytes(content)
    with pytest.raises(TokenizerError, match=named(checkpoint / "tokenizer_config.json", problem)):
        Tokenizer(checkpoint)


@pytest.mark.parametrize("template, field", [
    (5, "`chat_template`"), ([5], "`chat_template`[0]"), ([{"template": "x"}], "`chat_template`[0] `name`"),
    ([{"name": "default", "template": ["x"]}], "`chat_template`[0] `template`")])
def test_chat_template_field_of_the_wrong_type(checkpoint, template, field):
    template_only_in_config(checkpoint, template)
    with pytest.raises(TokenizerError, match=named(checkpoint / "tokenizer_config.json", "field " + field)):
        Tokenizer(checkpoint)


@pytest.mark.parametrize("value, field", [
    (5, "`eos_token`"), (["<|im_end|>"], "`eos_token`"), ({"content": 5}, "`eos_token` `content`"),
    ({"text": "<|im_end|>"}, "`eos_token` `content`")])
def test_special_token_field_of_the_wrong_type(checkpoint, value, field):
    edit_config(checkpoint, eos_token=value)
    with pytest.raises(TokenizerError, match=named(checkpoint / "tokenizer_config.json", "field " + field)):
        Tokenizer(checkpoint)
    edit_config(checkpoint, eos_token={"content": "<|im_end|>", "lstrip": False}, bos_token=None)
    assert Tokenizer(checkpoint).special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


def test_chat_template_file_not_utf8(checkpoint):
    (checkpoint / "chat_template.jinja").write_bytes(b"{{ messages }}\xff")
    with pytest.raises(TokenizerError, match=named(checkpoint / "chat_template.jinja", "not UTF-8", "offset 14")):
        Tokenizer(checkpoint)


def test_chat_template_syntax_error_names_file_and_line(checkpoint):
    source = "{% for m in messages %}\n{{ m.content }\n{% endfor %}"
    with pytest.raises(TokenizerError, match=named(checkpoint / "chat_template.jinja", "syntax error at line 2")):
        with_template(checkpoint, source)
    template_only_in_config(checkpoint, source)
    with pytest.raises(TokenizerError, match=named(checkpoint / "tokenizer_config.json", "field `chat_template`",
                                                   "line 2")):
        Tokenizer(checkpoint)
    with pytest.raises(TokenizerError, match="nested too deeply"):
        with_template(checkpoint, "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}")


def test_raise_exception_in_the_template_names_it(checkpoint):
    tok = Tokenizer(checkpoint)
    with pytest.raises(TokenizerError, match=named(checkpoint / "chat_template.jinja", "must come first")):
        tok.apply_chat_template(USER + [{"role": "system", "content": "Late."}])


def test_rendered_length_is_bounded(checkpoint):
    tok = with_template(checkpoint, "{% for i in range(100000) %}0123456789{% endfor %}")
    tok.render_max_chars = 1000
    with pytest.raises(TokenizerError, match=named(checkpoint / "chat_template.jinja", "more than 1000 characters")):
        tok.apply_chat_template(USER)


@pytest.mark.parametrize("expression", ["'x' * 10**15", "10**15 * 'x'", "[0] * 10**15", "10 ** (10 ** 15)",
                                        "'x' * 600 + 'y' * 600"])
def test_huge_repetition_is_refused_before_it_is_built(checkpoint, expression):
    # `| length` renders a few characters: only the operator check can stop these, not the output count
    tok = with_template(checkpoint, f"{{{{ ({expression}) | string | length }}}}")
    tok.render_max_chars = 1000
    with pytest.raises(TokenizerError, match=named(checkpoint / "chat_template.jinja", "longer than 1000")):
        tok.apply_chat_template(USER)


def test_render_time_is_bounded_and_the_outer_tracer_restored(checkpoint):
    tok = with_template(checkpoint, "{% for i in range(20000) %}{% for j in range(20000) %}{% endfor %}{% endfor %}")
    tok.render_timeout_s = 0.05

    def outer_tracer(frame, event, arg):  # stands in for coverage's or a debugger's
        return None

    saved = sys.gettrace()
    sys.settrace(outer_tracer)
    try:
        with pytest.raises(TokenizerError, match=named(checkpoint / "chat_template.jinja",
                                                       "took longer than 0.05 s")):
            tok.apply_chat_template(USER)
        after_timeout = sys.gettrace()
        with_template(checkpoint, "{{ messages[0].content }}").apply_chat_template(USER)
        after_render = sys.gettrace()
    finally:
        sys.settrace(saved)
    assert after_timeout is outer_tracer and after_render is outer_tracer
