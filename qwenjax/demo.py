"""A small random checkpoint directory in the real Hugging Face layout, made by qwenjax alone (no torch).

It holds what a downloaded Qwen3.5 directory holds — config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, chat_template.jinja, generation_config.json — so every step of the user path (load,
tokenize, chat template, generate, stream) runs end to end before any trained weights are at hand. The weights
are random: the text it generates is noise. The tokenizer is byte-level (one token per byte) plus Qwen's chat
special tokens; the chat template follows Qwen3.5's format (`<|im_start|>role … <|im_end|>`, `<think>` blocks,
`enable_thinking`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from qwenjax.checkpoint.export import export_hf
from qwenjax.config import load_config, resolve_config
from qwenjax.pretrained import from_config

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED_TOKENS = ["<think>", "</think>"]
DEMO_CONFIG = "tiny-chat"
# The trained default of `qwenjax generate` / `qwenjax chat`, shipped with the package (scripts/train_default_model.py).
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny-pydoc")
# The trained default of `qwenjax generate --image` (scripts/train_vision_model.py): it sees drawn shapes.
DEFAULT_VISION_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny-vision")

_TEMPLATE = """\
{%- if messages and messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- if not loop.first %}{{ raise_exception('The system message must come first.') }}{%- endif %}
{%- elif message.role == 'user' %}
{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
@ASSISTANT_TURN@
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- else %}
{{ raise_exception('Unknown role: ' + message.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- else %}
{{- '<think>\\n' }}
{%- endif %}
{%- endif %}
"""
# An assistant turn: its answer, any thinking dropped (as Qwen's templates drop it from earlier turns) ...
_ANSWER_TURN = """\
{%- set content = message.content %}
{%- if '</think>' in content %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"""
# ... or after an empty thinking block, as Qwen3.5 writes the turns after the last question: a model trained on
# these continues a generation prompt the same way with thinking on or off.
_EMPTY_THINKING_TURN = """\
{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content.split('</think>')[-1].lstrip('\\n') }}
{{- '<|im_end|>\\n' }}"""


def chat_template(assistant_turn: str) -> str:
    """The demo chat template with `assistant_turn` (Jinja that renders `message`) for the assistant's turns."""
    return _TEMPLATE.replace("@ASSISTANT_TURN@", assistant_turn)


CHAT_TEMPLATE = chat_template(_ANSWER_TURN)
CHAT_TEMPLATE_EMPTY_THINKING = chat_template(_EMPTY_THINKING_TURN)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (ids 0-255 are the bytes) and Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(ADDED_TOKENS)
    return tok


def write_tokenizer(path: str | os.PathLike, tok=None) -> None:
    """Writes `tok` (a `tokenizers.Tokenizer`; default `byte_tokenizer()`), its config and the chat template."""
    tok = byte_tokenizer() if tok is None else tok
    path = os.fspath(path)
    tok.save(os.path.join(path, "tokenizer.json"))
    _write_json(os.path.join(path, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": 262144, "clean_up_tokenization_spaces": False})
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)


def _byte_of(ch: str) -> int:
    """The byte a ByteLevel alphabet character stands for (GPT-2's printable remapping of the 256 bytes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    code = ord(ch)
    if code in printable:
        return code
    return [b for b in range(256) if b not in printable][code - 256]


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def write_random_checkpoint(path: str | os.PathLike, config: str = DEMO_CONFIG, seed: int = 0, *,
                            tokenizer=None, dtype: str = "float32") -> str:
    """Writes a random checkpoint of `config` (a configs/ name or file) into directory `path` (created; or an
    empty one) with `tokenizer` (default: the byte-level one) and returns the path. The weights are stored in
    `dtype` ("float32" or "bfloat16"). The config's vocab_size must cover the tokenizer; its pad/eos ids are set
    from the tokenizer's special tokens."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: the checkpoint is written in 'float32' or 'bfloat16'")
    path = os.fspath(path)
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise FileExistsError(f"{path} exists and is not an empty directory: the checkpoint needs one of its own")
    tokenizer = byte_tokenizer() if tokenizer is None else tokenizer
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    cfg = load_config(resolve_config(config))
    if cfg.vocab_size < tokenizer.get_vocab_size():
        raise ValueError(f"config {config}: vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.get_vocab_size()} tokens")
    cfg = cfg.replace(pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    model = from_config(cfg, dtype="float32", seed=seed)  # fp32 whatever the storage dtype: one seed, one model
    export_hf(model, path, dtype=dtype, overwrite=True)  # overwrite: the empty directory `path` may already be
    _write_json(os.path.join(path, "generation_config.json"), {
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"],
        "do_sample": True, "temperature": 1.0, "top_k": 20, "top_p": 0.95})
    write_tokenizer(path, tokenizer)
    return path


def install_model_dir(source: str, out: str) -> None:
    """Copies the model directory `source` to `out`, replacing whatever is there in one rename: a reader of `out`
    sees the old model or the new one, never half of one. The copy is world-readable (it ships in the package)."""
    out = os.path.abspath(out)
    staged = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    shutil.rmtree(staged)
    shutil.copytree(source, staged)
    os.chmod(staged, 0o755)
    old = f"{out}.old-{os.getpid()}"
    if os.path.exists(out):
        os.replace(out, old)
    os.replace(staged, out)
    shutil.rmtree(old, ignore_errors=True)
