"""The checkpoint's tokenizer (`tokenizer.json`, HF `tokenizers`) and chat template (jinja2).

The template is rendered the way transformers renders it (sandboxed jinja2 with trim_blocks/lstrip_blocks, the
loop-controls extension, a `tojson` that does not HTML-escape, `raise_exception`, `strftime_now`), so a prompt
built here equals `AutoTokenizer.apply_chat_template`'s.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class TokenizerError(ValueError):
    """A checkpoint directory without a usable tokenizer or chat template."""


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def compile_chat_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(tok: Any) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


class Tokenizer:
    """`Tokenizer(path)` for a checkpoint directory holding `tokenizer.json` (and usually `tokenizer_config.json`,
    `chat_template.jinja`)."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _HFTokenizer

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory {path!r} does not exist")
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise TokenizerError(f"{path} has no tokenizer.json: cannot encode prompts or decode tokens "
                                 "(pass token ids instead, or copy the checkpoint's tokenizer files there)")
        self.path = path
        self._tok = _HFTokenizer.from_file(tok_file)
        cfg_file = os.path.join(path, "tokenizer_config.json")
        self.config: dict = {}
        if os.path.isfile(cfg_file):
            with open(cfg_file) as f:
                self.config = json.load(f)
        self.chat_template_source = self._find_chat_template()
        self._template = None if self.chat_template_source is None else compile_chat_template(
            self.chat_template_source)
        self.special_tokens = {name: _token_text(self.config[name]) for name in
                               ("bos_token", "eos_token", "pad_token", "unk_token") if self.config.get(name)}

    def _find_chat_template(self) -> str | None:
        jinja_file = os.path.join(self.path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file) as f:
                return f.read()
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        return template

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) become their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and each token's (start, end) character span in it."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            enable_thinking: bool = True, tools: list[dict] | None = None, **kwargs) -> str:
        """The prompt text for a conversation ([{"role": ..., "content": ...}, ...]), as the model was trained."""
        if self._template is None:
            raise TokenizerError(f"{self.path} has no chat template (neither chat_template.jinja nor "
                                 "tokenizer_config.json's `chat_template`); use a raw prompt instead")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or "role" not in msg:
                raise ValueError(f"messages[{i}] must be a dict with a 'role' (and 'content'), got {msg!r}")
        return self._template.render(messages=messages, tools=tools, documents=None,
                                     add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                                     **{**self.special_tokens, **kwargs})


def split_thinking(text: str, prompt_opened_thinking: bool = False) -> tuple[str, str]:
    """(thinking, answer) of generated text. Qwen3.5 thinks inside `<think>…</think>` before answering; with
    thinking on, the chat template's generation prompt already opened `<think>` (so the text starts inside it).
    Text that never closes the block is all thinking (generation stopped mid-thought)."""
    if THINK_CLOSE in text:
        thinking, answer = text.split(THINK_CLOSE, 1)
    elif prompt_opened_thinking or text.lstrip().startswith(THINK_OPEN):
        thinking, answer = text, ""
    else:
        return "", text.strip()
    thinking = thinking.strip()
    if thinking.startswith(THINK_OPEN):
        thinking = thinking[len(THINK_OPEN):]
    return thinking.strip(), answer.strip()


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a multi-byte character."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, self.skip)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
