"""Structured outputs' cost (qwenjax.inference.grammar): compile times, and per decode step the host's bitmask fill
plus the device's masking, at batch 1 and 16, walking real documents token by token.

    python scripts/bench_grammar.py                                   # the bundled tokenizer (4,096 ids)
    python scripts/bench_grammar.py --tokenizer DIR --vocab-size 248320
    python scripts/bench_grammar.py --qwen-tiktoken qwen.tiktoken     # a Qwen3.5-sized vocabulary, built here
    python scripts/bench_grammar.py --engine                          # served: per token, constrained vs free

A real Qwen3.5 tokenizer.json cannot be downloaded on our machines. `--qwen-tiktoken` takes Qwen's own byte-level
BPE ranks (`qwen.tiktoken`, shipped with Qwen-VL-Chat: the 151,643 tokens Qwen2/2.5/3 also use), turns them into
a tokenizer.json with Qwen's pre-tokenizer regex and its 26 added tokens (`<|im_end|>`, `<tool_call>`,
`</think>`, ...), and extends it to Qwen3.5's 248,044 regular tokens with merges of word pairs (seeded) before
the added ones; the model's vocab_size is 248,320. Mask costs depend on the vocabulary's size and its tokens'
bytes (llguidance walks a trie of them), which this reproduces; the exact Qwen3.5 merges do not matter to them.

Per step, "fill" is GrammarBackend.fill_bitmasks over the batch's rows (llguidance's thread pool; each row a
matcher going round the document once from its own offset), "apply" puts the words on the device and runs the
jitted apply_token_bitmask (its masked logits materialized, as a sampler then reads them); the step's argmax alone
is timed beside it for scale. (On XLA:CPU, fusing the mask into the argmax's program made that program 5x slower
than the two apart at 248k x 16: the argmax's second pass then materializes [B, V] arrays.) Medians over every
step of every document; the first pass over a grammar (its lexer states being built) is reported apart.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import tempfile
import time

import numpy as np
from tokenizers import Tokenizer
import jax

from qwenjax.demo import DEFAULT_MODEL_DIR
from qwenjax.inference.grammar import GrammarBackend, GrammarSpec, apply_token_bitmask
from qwenjax.inference.sampling import argmax

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "role": {"enum": ["admin", "user", "guest"]},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                 "zip": {"type": "string"}},
                "required": ["street", "city"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
    "scores": {"type": "array", "items": {"type": "number"}}},
    "required": ["name", "age", "role", "address", "tags"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object", "properties": {
        "expression": {"type": "string"}, "precision": {"type": "integer"}}, "required": ["expression"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "filters": {"type": "object", "properties": {"site": {"type": "string"}}},
        "limit": {"type": "integer"}}, "required": ["query"]}}},
]
CASES = {  # grammar: (spec, after_thinking, a document of it)
    "json_object": (GrammarSpec.from_response_format({"type": "json_object"}), False,
                    '{"title": "The quick brown fox", "count": 42, "items": [1, 2.5, true, null], '
                    '"nested": {"a": "b c d e f g", "html": "<b>bold</b>"}}'),
    "json_schema": (GrammarSpec.from_response_format({"type": "json_schema", "json_schema": {
        "name": "person", "strict": True, "schema": SCHEMA}}), False,
        '{"name": "Ada Lovelace", "age": 36, "role": "admin", "address": {"street": "12 St James Square", '
        '"city": "London"}, "tags": ["math", "engines", "poetry"], "scores": [9.5, 7.25]}'),
    "tool_call": (GrammarSpec.from_tools(TOOLS, "required"), False,
                  "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis, France\n</parameter>\n"
                  "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=search>\n"
                  "<parameter=query>\nweather in Paris next week <site:meteo.fr>\n</parameter>\n"
                  "<parameter=limit>\n5\n</parameter>\n</function>\n</tool_call>"),
    "tool_call+thinking": (GrammarSpec.from_tools(TOOLS, "required"), True,
                           "The user wants the weather; get_weather takes a city and a number of days.\n</think>\n\n"
                           "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                           "</function>\n</tool_call>"),
}

# Qwen's pre-tokenizer and added tokens (Qwen2/2.5/3's tokenizer.json); the special ones are control tokens.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
              "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
              "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
              "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
              "</tool_response>", "<think>", "</think>"]
QWEN35_REGULAR, QWEN35_VOCAB = 248_044, 248_320


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def qwen_sized_tokenizer(tiktoken_path: str, regular: int = QWEN35_REGULAR, seed: int = 0) -> str:
    """tokenizer.json text: Qwen's BPE from its tiktoken ranks, extended to `regular` tokens (module docstring)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

    ranks = {}
    with open(tiktoken_path, "rb") as f:
        for line in f:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    order = sorted(ranks, key=ranks.get)
    merges = []
    for token in (t for t in order if len(t) > 1):  # a token's merge: its split of the lowest (later) rank
        splits = [(max(ranks[token[:k]], ranks[token[k:]]), token[:k], token[k:]) for k in range(1, len(token))
                  if token[:k] in ranks and token[k:] in ranks]
        merges.append(min(splits)[1:])
    rng = np.random.default_rng(seed)
    words = [t for t in order if len(t) >= 3 and t[:1] == b" " and t[1:].isalpha()]
    tails = [t for t in order if len(t) >= 2 and t.isalpha() and t.islower()]
    while len(order) < regular:
        a, b = words[rng.integers(len(words))], tails[rng.integers(len(tails))]
        if a + b not in ranks:
            ranks[a + b] = len(order)
            order.append(a + b)
            merges.append((a, b))
    chars = _bytes_to_unicode()
    text = lambda t: "".join(chars[c] for c in t)
    tok = Tokenizer(models.BPE({text(t): i for i, t in enumerate(order)}, [(text(a), text(b)) for a, b in merges]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=t.startswith("<|"), normalized=False) for t in QWEN_ADDED])
    return tok.to_str()


def _stats(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"median {statistics.median(xs) * 1e6:8.1f} us  mean {statistics.fmean(xs) * 1e6:8.1f}  " \
           f"p90 {xs[int(0.9 * len(xs))] * 1e6:8.1f}  max {xs[-1] * 1e6:8.1f}"


def bench(tokenizer_json: str, vocab_size: int, batches: list[int], repeats: int) -> None:
    hf = Tokenizer.from_str(tokenizer_json)
    eos = [hf.token_to_id("<|im_end|>"), hf.token_to_id("<|endoftext|>")]
    t0 = time.perf_counter()
    backend = GrammarBackend(tokenizer_json, vocab_size, eos)
    print(f"vocab {vocab_size:,} (tokenizer {hf.get_vocab_size():,}); llguidance's tokenizer built in "
          f"{time.perf_counter() - t0:.2f} s; markers {backend.markers}; device {jax.devices()[0].platform}")
    masked = jax.jit(apply_token_bitmask)
    plain = jax.jit(argmax)
    print("\ncompile (the cache cleared; median of 5, the first apart):")
    for name, (spec, thinking, _) in CASES.items():
        times = []
        for _ in range(5):
            backend._cache.clear()
            t0 = time.perf_counter()
            backend.compile(spec, thinking)
            times.append(time.perf_counter() - t0)
        print(f"  {name:20s} {statistics.median(times) * 1e3:7.2f} ms  (first {times[0] * 1e3:.2f} ms)")
    for batch in batches:
        logits = jax.device_put(np.random.default_rng(0).normal(size=(batch, vocab_size)).astype(np.float32))
        constrained = jax.device_put(np.ones(batch, bool))
        print(f"\nbatch {batch}, per decode step:")
        for name, (spec, thinking, doc) in CASES.items():
            ids = hf.encode(doc, add_special_tokens=False).ids + [eos[0]]
            words = backend.allocate_bitmask(batch)
            first, fills, applies, argmaxes = [], [], [], []
            masked(logits, jax.device_put(words), constrained).block_until_ready()
            plain(logits).block_until_ready()
            for rep in range(repeats):
                if rep == 0:
                    backend._cache.clear()
                matchers = [backend.matcher(spec, thinking) for _ in range(batch)]
                offsets = [r * len(ids) // batch for r in range(batch)]
                for r, m in enumerate(matchers):  # row r starts `offsets[r]` tokens in: the rows' states differ
                    assert all(m.accept(t) for t in ids[:offsets[r]])
                for step in range(len(ids)):  # each row goes round the document once (from its start again)
                    for r, m in enumerate(matchers):
                        if step and (offsets[r] + step) % len(ids) == 0:
                            m.reset()
                    t0 = time.perf_counter()
                    backend.fill_bitmasks(words, [(m, r) for r, m in enumerate(matchers)])
                    (first if rep == 0 else fills).append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    masked(logits, jax.device_put(words), constrained).block_until_ready()
                    applies.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    plain(logits).block_until_ready()
                    argmaxes.append(time.perf_counter() - t0)
                    for r, m in enumerate(matchers):
                        assert m.accept(ids[(offsets[r] + step) % len(ids)]), (name, r, step)
            fill_median, apply_median = statistics.median(fills or first), statistics.median(applies)
            print(f"  {name:20s} fill   {_stats(fills or first)}   ({len(ids)} tokens a document)")
            print(f"  {'':20s} first  {_stats(first)}")
            print(f"  {'':20s} apply  {_stats(applies)}")
            print(f"  {'':20s} => mask cost per step {(fill_median + apply_median) * 1e6:.1f} us "
                  f"(fill {fill_median * 1e6:.1f} + apply {apply_median * 1e6:.1f}; the step's argmax alone takes "
                  f"{statistics.median(argmaxes) * 1e6:.1f}); per token "
                  f"{(fill_median + apply_median) / batch * 1e6:.1f} us")


def bench_engine(batches: list[int], rounds: int, max_tokens: int = 64) -> None:
    """The cost in the serving engine (the bundled model, bf16, greedy): wall time per generated token of `batch`
    rows constrained to a JSON schema (their masks filled each step, and their tokens read before the next step
    is dispatched) against the same rows free, rounds interleaved, medians. Both write max_tokens tokens: the free
    rows with ignore_eos, the constrained ones a string of at least 2,000 characters."""
    import queue

    import qwenjax
    from qwenjax.inference.tokenizer import Tokenizer as QwenTokenizer
    from qwenjax.serve.engine import Engine, Finished, Request

    m, tok = qwenjax.from_pretrained(DEFAULT_MODEL_DIR), QwenTokenizer(DEFAULT_MODEL_DIR)
    engine = Engine(m, max_batch=max(batches), max_len=1024, tokenizer=tok).start()
    spec = GrammarSpec.from_response_format({"type": "json_schema", "json_schema": {"name": "long", "schema": {
        "type": "object", "properties": {"text": {"type": "string", "minLength": 2000}}, "required": ["text"]}}})
    topics = ["os.path.join", "the json module", "list.sort", "re.match", "the class dict", "math.floor"]

    def run(batch: int, constrained: bool) -> tuple[float, int]:
        inboxes = [queue.Queue() for _ in range(batch)]
        t0 = time.perf_counter()
        for r, inbox in enumerate(inboxes):
            text = tok.apply_chat_template([{"role": "user", "content": f"Describe {topics[r % len(topics)]} as "
                                             f"JSON ({r})."}], enable_thinking=False)
            engine.submit(Request(prompt=tok.encode(text), on_event=inbox.put, max_tokens=max_tokens,
                                  grammar=spec if constrained else None, ignore_eos=not constrained))
        tokens = 0
        for inbox in inboxes:
            while not isinstance(event := inbox.get(timeout=600), Finished):
                tokens += len(event.ids)
        return time.perf_counter() - t0, tokens

    print(f"engine: {DEFAULT_MODEL_DIR} ({m.dtype}), greedy, max_tokens {max_tokens}; {rounds} rounds, interleaved")
    for batch in batches:
        run(batch, True), run(batch, False)  # compiles this batch's programs
        per_token = {True: [], False: []}
        for _ in range(rounds):
            for constrained in (False, True):
                seconds, tokens = run(batch, constrained)
                per_token[constrained].append(seconds / tokens)
        free, schema = (statistics.median(per_token[c]) for c in (False, True))
        print(f"  batch {batch:2d}: free {free * 1e3:6.2f} ms/token, json_schema {schema * 1e3:6.2f} ms/token "
              f"({schema / free:.2f}x; +{(schema - free) * 1e3:.2f} ms a token)")
    engine.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=DEFAULT_MODEL_DIR,
                   help="a checkpoint directory or a tokenizer.json (default: the bundled model's)")
    p.add_argument("--vocab-size", type=int, help="the model's vocab_size (default: the tokenizer's, or Qwen3.5's "
                   "248,320 with --qwen-tiktoken)")
    p.add_argument("--qwen-tiktoken", help="build a Qwen3.5-sized vocabulary from Qwen's qwen.tiktoken ranks")
    p.add_argument("--save-tokenizer", help="where to write the built tokenizer.json (with --qwen-tiktoken)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3, help="passes over each document (the first is reported apart)")
    p.add_argument("--engine", action="store_true", help="measure in the serving engine instead (bench_engine)")
    args = p.parse_args()
    if args.engine:
        return bench_engine(args.batch, args.repeats)
    if args.qwen_tiktoken:
        t0 = time.perf_counter()
        text = qwen_sized_tokenizer(args.qwen_tiktoken)
        print(f"Qwen-sized tokenizer built from {args.qwen_tiktoken} in {time.perf_counter() - t0:.1f} s")
        path = args.save_tokenizer or os.path.join(tempfile.mkdtemp(), "tokenizer.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        vocab_size = args.vocab_size or QWEN35_VOCAB
    else:
        path = args.tokenizer if args.tokenizer.endswith(".json") else os.path.join(args.tokenizer, "tokenizer.json")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        vocab_size = args.vocab_size or Tokenizer.from_str(text).get_vocab_size()
    bench(text, vocab_size, args.batch, args.repeats)


if __name__ == "__main__":
    main()
