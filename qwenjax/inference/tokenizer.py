"""The checkpoint's tokenizer (`tokenizer.json`, HF `tokenizers`) and chat template (jinja2).

The template is rendered the way transformers renders it (sandboxed jinja2 with trim_blocks/lstrip_blocks, the
loop-controls extension, a `tojson` that does not HTML-escape, `raise_exception`, `strftime_now`), so a prompt
built here equals `AutoTokenizer.apply_chat_template`'s. A template is untrusted input (it ships with whatever
checkpoint is downloaded), so rendering one is bounded in output length and time, and every way a tokenizer file
can be wrong is a TokenizerError naming the file and field.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox

from qwenjax.validate import InputError, check, read_json_object

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKEN_FIELDS = ("bos_token", "eos_token", "pad_token", "unk_token")
# Far above any real prompt (the longest context is 262,144 tokens), far below what exhausts memory.
RENDER_MAX_CHARS = 8_000_000


class TokenizerError(InputError):
    """A checkpoint directory without a usable tokenizer or chat template, or a chat template that failed (or
    refused) to render a conversation."""


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


class _ChatTemplateEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox transformers renders in, refusing a `*`, `+` or `**` whose result would be longer than
    `max_result_length` (characters or items of a string or list, decimal digits of an integer) before building it:
    `'x' * 10**10` would exhaust memory before any output is counted. Intercepted operators are also not folded
    into constants at compile time, where nothing would bound them."""

    intercepted_binops = frozenset(["*", "+", "**"])
    max_result_length = RENDER_MAX_CHARS  # Tokenizer.apply_chat_template sets its render_max_chars per render

    def call_binop(self, context, operator, left, right):
        # One function (no helpers): templates use `+` a lot, and under the render time limit every call is traced.
        size, sequence = 0.0, (str, list, tuple)
        if operator == "+":
            if isinstance(left, sequence) and isinstance(right, sequence):
                size = len(left) + len(right)
        elif operator == "*":
            items, times = (right, left) if isinstance(right, sequence) else (left, right)
            if isinstance(items, sequence) and isinstance(times, int):
                size = len(items) * max(times, 0)
            elif isinstance(left, int) and isinstance(right, int):
                size = (left.bit_length() + right.bit_length()) * math.log10(2)
        elif isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:  # `**`
            size = right * math.log10(abs(left))
        if size > self.max_result_length:
            raise jinja2.sandbox.SecurityError(
                f"`{type(left).__name__} {operator} {type(right).__name__}` would be longer than "
                f"{self.max_result_length} (characters, items or digits)")
        return self.binop_table[operator](left, right)


def compile_chat_template(source: str, filename: str = "<template>") -> jinja2.Template:
    """The chat template `source`, compiled as transformers compiles it. `filename` (where the source came from)
    names it in errors and tracebacks, and is the file name its compiled code carries."""
    env = _ChatTemplateEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        # env.from_string, but with `filename`: the render time limit finds the template's frames by it
        return env.template_class.from_code(env, env.compile(source, filename=filename), env.make_globals(None),
                                            None)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"{filename}: chat template syntax error at line {e.lineno}: {e.message}") from None
    except RecursionError:
        raise TokenizerError(f"{filename}: chat template nested too deeply to compile") from None


def _deadline_tracer(filename: str, deadline: float, message: str):
    """A `sys.settrace` function that raises TokenizerError(message) at the first line of code compiled from
    `filename` run after `deadline` (time.monotonic()). Other code is not traced line by line, so it costs one
    check per call; C code (a single huge `str.center`, say) runs to its end."""
    def trace_template_lines(frame, event, arg):
        if event == "line" and time.monotonic() > deadline:
            raise TokenizerError(message)
        return trace_template_lines

    def trace_calls(frame, event, arg):
        return trace_template_lines if frame.f_code.co_filename == filename else None

    return trace_calls


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:  # text mode (universal newlines), as transformers reads it
            return f.read()
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") \
            from None


def _special_token_text(value: Any, where: str) -> str | None:
    """A special token field's text: a string, null, or an AddedToken object (`{"content": ..., ...}`)."""
    value = check(value, str | dict | None, where, TokenizerError)
    return check(value.get("content"), str, f"{where} `content`", TokenizerError) if isinstance(value, dict) \
        else value


class Tokenizer:
    """`Tokenizer(path)` for a checkpoint directory holding `tokenizer.json` (and usually `tokenizer_config.json`,
    `chat_template.jinja`)."""

    # Bounds on rendering the (untrusted) chat template; set them on an instance to change one tokenizer's.
    render_max_chars = RENDER_MAX_CHARS
    render_timeout_s = 10.0

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
        try:
            self._tok = _HFTokenizer.from_file(tok_file)
        except Exception as e:  # `tokenizers` raises a bare Exception for bad JSON, bad UTF-8 or the wrong shape
            raise TokenizerError(f"{tok_file}: not a usable tokenizer file ({e})") from None
        cfg_file = os.path.join(path, "tokenizer_config.json")
        self.config: dict = read_json_object(cfg_file, TokenizerError) if os.path.isfile(cfg_file) else {}
        self.chat_template_source, template_file = self._find_chat_template(cfg_file)
        self._template = None if self.chat_template_source is None else compile_chat_template(
            self.chat_template_source, template_file)
        self.special_tokens = {}
        for name in SPECIAL_TOKEN_FIELDS:
            text = _special_token_text(self.config.get(name), f"{cfg_file} field `{name}`")
            if text:
                self.special_tokens[name] = text

    def _find_chat_template(self, cfg_file: str) -> tuple[str | None, str | None]:
        """(source, where it came from) of the chat template; (None, None) if there is none."""
        jinja_file = os.path.join(self.path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            return _read_text(jinja_file), jinja_file
        where = f"{cfg_file} field `chat_template`"
        template = check(self.config.get("chat_template"), str | list | None, where, TokenizerError)
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {}
            for i, entry in enumerate(template):
                entry_where = f"{where}[{i}]"
                entry = check(entry, dict, entry_where, TokenizerError)
                name = check(entry.get("name"), str, f"{entry_where} `name`", TokenizerError)
                named[name] = check(entry.get("template"), str, f"{entry_where} `template`", TokenizerError)
            template = named.get("default", next(iter(named.values()), None))
        return template, where

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) become their ids."""
        return self._encoding(text).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and each token's (start, end) character span in it."""
        enc = self._encoding(text)
        return enc.ids, enc.offsets

    def _encoding(self, text: str):
        # encode_batch, not encode: it lets go of the GIL while it works, so a server thread tokenizing a 5 MB
        # prompt (8 s) does not stall the event loop and every other request's stream
        return self._tok.encode_batch([text], add_special_tokens=False)[0]

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
        return self._render(dict(messages=messages, tools=tools, documents=None,
                                 add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                                 **{**self.special_tokens, **kwargs}))

    def _render(self, variables: dict) -> str:
        """The chat template rendered with `variables`, within render_max_chars and render_timeout_s. Anything
        the template raises (`raise_exception`, a refused operation, a plain bug) is a TokenizerError naming it."""
        template, max_chars = self._template, self.render_max_chars
        template.environment.max_result_length = max_chars
        tracer = _deadline_tracer(template.filename, time.monotonic() + self.render_timeout_s,
                                  f"{template.filename}: chat template rendering took longer than "
                                  f"{self.render_timeout_s} s (render_timeout_s)")
        pieces, n_chars = [], 0
        outer_tracer = sys.gettrace()  # a debugger's or coverage's; settrace is per thread, so others are unaffected
        sys.settrace(tracer)
        try:
            for piece in template.generate(**variables):
                n_chars += len(piece)
                if n_chars > max_chars:
                    raise TokenizerError(f"{template.filename}: chat template rendered more than {max_chars} "
                                         "characters (render_max_chars)")
                pieces.append(piece)
        except TokenizerError:
            raise
        except Exception as e:
            raise TokenizerError(f"{template.filename}: chat template failed: {e}") from e
        finally:
            sys.settrace(outer_tracer)
        return "".join(pieces)


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
    """Turns a growing list of token ids into text pieces, never splitting a multi-byte character.

    Each push decodes only a short window: the tokens since the last piece plus those of the piece before (their
    text is subtracted), so a decoder that reads context (a leading space, a byte sequence) sees it, and a long
    reply costs no more per token than a short one."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read]: the previous piece's tokens; ids[read:]: not yet shown

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        shown = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        if len(text) <= len(shown) or text.endswith("\ufffd"):  # nothing new, or an incomplete UTF-8 sequence
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(shown):]
