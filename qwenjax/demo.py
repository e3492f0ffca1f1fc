"""A small random checkpoint directory in the real Hugging Face layout, made by qwenjax alone (no torch).

It holds what a downloaded Qwen3.5 directory holds — config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, chat_template.jinja, generation_config.json — so every step of the user path (load,
tokenize, chat template, generate, stream) runs end to end before any trained weights are at hand. The weights
are random: the text it generates is noise. The tokenizer is byte-level (one token per byte) plus Qwen's chat
special tokens; the chat template is Qwen3.5's (`<|im_start|>role … <|im_end|>`, `<think>` blocks,
`enable_thinking`, tools, tool calls and tool results).
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

# Qwen3.5's chat template (Qwen/Qwen3.5-35B-A3B's chat_template.jinja renders every conversation as this does): the
# tools' JSON and calling instructions in the system turn, an assistant's tool calls as <tool_call> blocks (values
# written with str(), mappings and lists as JSON), tool results grouped into one user turn of <tool_response>
# blocks, pictures as vision tags. Only the errors' wording differs.
_TEMPLATE = """\
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count, is_system_content=false) %}
{%- if content is string %}
{{- content }}
{%- elif content is iterable and content is not mapping %}
{%- for item in content %}
{%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
{%- if is_system_content %}{{- raise_exception('A system message cannot hold images.') }}{%- endif %}
{%- if do_vision_count %}{%- set image_count.value = image_count.value + 1 %}{%- endif %}
{%- if add_vision_id %}{{- 'Picture ' ~ image_count.value ~ ': ' }}{%- endif %}
{{- '<|vision_start|><|image_pad|><|vision_end|>' }}
{%- elif 'video' in item or item.type == 'video' %}
{%- if is_system_content %}{{- raise_exception('A system message cannot hold videos.') }}{%- endif %}
{%- if do_vision_count %}{%- set video_count.value = video_count.value + 1 %}{%- endif %}
{%- if add_vision_id %}{{- 'Video ' ~ video_count.value ~ ': ' }}{%- endif %}
{{- '<|vision_start|><|video_pad|><|vision_end|>' }}
{%- elif 'text' in item %}
{{- item.text }}
{%- else %}
{{- raise_exception('A content part must be text, an image or a video.') }}
{%- endif %}
{%- endfor %}
{%- elif content is none or content is undefined %}
{{- '' }}
{%- else %}
{{- raise_exception('A message content must be a string or a list of parts.') }}
{%- endif %}
{%- endmacro %}
{%- if not messages %}{{- raise_exception('No messages.') }}{%- endif %}
{%- if tools and tools is iterable and tools is not mapping %}
{{- '<|im_start|>system\\n# Tools\\n\\nYou have access to the following functions:\\n\\n<tools>' }}
{%- for tool in tools %}
{{- '\\n' }}
{{- tool|tojson }}
{%- endfor %}
{{- '\\n</tools>\\n\\nIf you choose to call a function ONLY reply in the following format with NO suffix:\\n\\n' }}
{{- '<tool_call>\\n<function=example_function_name>\\n<parameter=example_parameter_1>\\nvalue_1\\n</parameter>\\n' }}
{{- '<parameter=example_parameter_2>\\nThis is the value for the second parameter\\nthat can span\\n' }}
{{- 'multiple lines\\n</parameter>\\n</function>\\n</tool_call>\\n\\n<IMPORTANT>\\nReminder:\\n' }}
{{- '- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested ' }}
{{- 'within <tool_call></tool_call> XML tags\\n- Required parameters MUST be specified\\n' }}
{{- '- You may provide optional reasoning for your function call in natural language BEFORE the function call, ' }}
{{- 'but NOT after\\n- If there is no function call available, answer the question like normal with your current ' }}
{{- 'knowledge and do not tell the user about function calls\\n</IMPORTANT>' }}
{%- if messages[0].role == 'system' %}
{%- set content = render_content(messages[0].content, false, true)|trim %}
{%- if content %}{{- '\\n\\n' + content }}{%- endif %}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + render_content(messages[0].content, false, true)|trim + '<|im_end|>\\n' }}
{%- endif %}
{#- The last question: the assistant turns after it (tool calls and their results) keep their thinking. #}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
{%- if ns.multi_step_tool and message.role == 'user' %}
{%- set content = render_content(message.content, false)|trim %}
{%- if not (content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
{%- set ns.multi_step_tool = false %}
{%- set ns.last_query_index = messages|length - 1 - loop.index0 %}
{%- endif %}
{%- endif %}
{%- endfor %}
{%- if ns.multi_step_tool %}{{- raise_exception('No user message: there is no question to answer.') }}{%- endif %}
{%- for message in messages %}
{%- set content = render_content(message.content, true)|trim %}
{%- if message.role == 'system' %}
{%- if not loop.first %}{{- raise_exception('The system message must come first.') }}{%- endif %}
{%- elif message.role == 'user' %}
{{- '<|im_start|>user\\n' + content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{%- set reasoning_content = '' %}
{%- if message.reasoning_content is string %}
{%- set reasoning_content = message.reasoning_content %}
{%- elif '</think>' in content %}
{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{%- set reasoning_content = reasoning_content|trim %}
@ASSISTANT_TURN@
{%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
{%- for tool_call in message.tool_calls %}
{%- set tool_call = tool_call.function if tool_call.function is defined else tool_call %}
{{- '\\n' if not loop.first else '\\n\\n' if content|trim else '' }}
{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
{%- if tool_call.arguments is defined %}
{%- for name, value in tool_call.arguments|items %}
{{- '<parameter=' + name + '>\\n' }}
{{- value|tojson if value is mapping or (value is sequence and value is not string) else value|string }}
{{- '\\n</parameter>\\n' }}
{%- endfor %}
{%- endif %}
{{- '</function>\\n</tool_call>' }}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.previtem and loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
{%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- else %}
{{- raise_exception('Unknown role: ' + message.role) }}
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
# An assistant turn's opening and answer (`content`, its thinking split off into `reasoning_content`): Qwen3.5's,
# which keeps the thinking of the turns after the last question (a tool-calling exchange) and drops the others' ...
_ANSWER_TURN = """\
{%- if loop.index0 > ns.last_query_index %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content + '\\n</think>\\n\\n' + content }}
{%- else %}
{{- '<|im_start|>assistant\\n' + content }}
{%- endif %}"""
# ... or every turn after an empty thinking block, as the bundled vision model was trained (scripts/
# train_vision_model.py): a generation prompt with thinking on or off continues the same way.
_EMPTY_THINKING_TURN = """\
{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + content }}"""


def chat_template(assistant_turn: str) -> str:
    """The demo chat template (Qwen3.5's) with `assistant_turn` for the assistant's turns: Jinja that writes the
    turn's opening and its answer `content`, given `reasoning_content`, `loop` and `ns.last_query_index`; the
    template then writes the turn's tool calls and its end."""
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
