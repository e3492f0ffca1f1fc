"""`qwenjax` command line.

    qwenjax generate                                  # the bundled tiny model trained on Python's docs, streamed
    qwenjax generate --model DIR --prompt "Hi" --no-thinking
    qwenjax generate --model DIR --image cat.png --prompt "What is in the picture?"
    qwenjax chat --model DIR                          # interactive, with history; /image PATH, /reset, /exit
    qwenjax serve --model DIR --max-batch 16        # OpenAI-compatible server on http://127.0.0.1:8000/v1
    qwenjax forward                                   # random 0.8B-shape model, 512-token prefill speed
    qwenjax forward --model DIR --seq 2048 --mesh fsdp=4,tensor=2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import Callable, Iterable, Iterator

from qwenjax.config import resolve_config
from qwenjax.validate import flag, text_arg

POSITIVE_INT = flag(int, minimum=1)
SEED = flag(int, minimum=0, maximum=2 ** 63 - 1)

DEFAULT_CONFIG = "qwen3.5-0.8b"
DEFAULT_CHAT_PROMPT = "Give me a short introduction to large language models."
DEFAULT_COMPLETION_PROMPT = "The with statement"  # for the bundled model, trained on Python's docs
DEFAULT_PICTURE_PROMPT = "Describe the image."  # for the bundled vision model, trained on drawn shapes
CHAT_CACHE_LEN = 8192  # `qwenjax chat`'s conversation capacity in tokens without --max-cache-len


def cmd_forward(args) -> int:
    import jax
    import numpy as np

    import qwenjax

    if args.model:
        print(f"loading {args.model} ({args.dtype})", flush=True)
        m = qwenjax.from_pretrained(args.model, dtype=args.dtype, mesh=args.mesh)
    else:
        path = resolve_config(args.config)
        print(f"random weights with the shape of {os.path.basename(path)} ({args.dtype}); "
              "no trained weights are loaded", flush=True)
        m = qwenjax.from_config(qwenjax.load_config(path), dtype=args.dtype, mesh=args.mesh, seed=args.seed)
    n_params = sum(x.size for x in jax.tree.leaves(m.params))
    c = m.config
    print(f"{n_params / 1e6:.1f}M parameters, {c.num_hidden_layers} layers "
          f"({c.num_blocks} x {'/'.join('GDN' if t == 'linear_attention' else 'attn' for t in c.block_pattern)}), "
          f"mesh {dict(m.mesh.shape)}", flush=True)
    ids = np.random.default_rng(args.seed).integers(0, c.vocab_size, (args.batch, args.seq))
    t0 = time.perf_counter()
    logits = m(ids, logits_to_keep=1).block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        logits = m(ids, logits_to_keep=1).block_until_ready()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    top = np.argsort(-np.asarray(logits[0, -1], np.float32))[:5]
    print(f"prefill batch={args.batch} seq={args.seq}: first call {compile_s:.2f} s (compile + run), "
          f"median {med:.3f} s over {args.repeats} -> {args.batch * args.seq / med:,.0f} tokens/s")
    print(f"next-token top-5 ids (row 0): {top.tolist()}")
    return 0


# ---- generate / chat ---------------------------------------------------------------------------------------------
def _load(args):
    """(model, tokenizer) from --model; else, with pictures, the bundled tiny-vision model, answering in chat; else
    the bundled tiny-pydoc model, completing text (no chat template); else (a checkout without them) a freshly
    written random demo checkpoint."""
    import atexit
    import shutil
    import tempfile

    import qwenjax
    from qwenjax.demo import DEFAULT_MODEL_DIR, DEFAULT_VISION_MODEL_DIR
    from qwenjax.inference.tokenizer import Tokenizer

    path = args.model
    pictures = getattr(args, "image", None) or getattr(args, "video", None)
    if path is None and pictures and os.path.isfile(os.path.join(DEFAULT_VISION_MODEL_DIR, "config.json")):
        path = DEFAULT_VISION_MODEL_DIR
        args.prompt = args.prompt if args.prompt is not None else DEFAULT_PICTURE_PROMPT
        card = _card(path)
        print(f"No --model given: answering with the bundled {path} — a small Qwen3.5 with a vision tower trained "
              f"from scratch on drawn shapes by scripts/train_vision_model.py (held-out accuracy "
              f"{card.get('heldout_accuracy', {}).get('all', float('nan')):.0%}). It answers only "
              "questions about the colour, shape, count or place of shapes in a picture. Pass --model DIR for a "
              "real checkpoint.", file=sys.stderr, flush=True)
    elif path is None and os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, "config.json")):
        path, args.raw = DEFAULT_MODEL_DIR, True
        args.prompt = args.prompt if getattr(args, "prompt", None) is not None else DEFAULT_COMPLETION_PROMPT
        loss = _card(path).get("heldout_loss")
        print(f"No --model given: completing text with the bundled {path} — a small Qwen3.5 trained from scratch "
              f"on Python's documentation by scripts/train_default_model.py"
              f"{f' (held-out loss {loss:.2f} nats/token)' if loss else ''}. It is not a chat model: the prompt is "
              "continued as is. Pass --model DIR for a real checkpoint.", file=sys.stderr, flush=True)
    elif path is None:
        from qwenjax.demo import DEMO_CONFIG, write_random_checkpoint

        path = write_random_checkpoint(tempfile.mkdtemp(prefix="qwenjax-demo-"), seed=args.seed)
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        print(f"No --model given: generating from a small RANDOM model ({DEMO_CONFIG}, byte-level tokenizer) "
              f"written in the Hugging Face layout to {path}. Its output is noise; pass --model DIR for a real "
              "checkpoint.", file=sys.stderr, flush=True)
    elif not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r}: no such directory")
    tokenizer = Tokenizer(path)
    return qwenjax.from_pretrained(path, dtype=args.dtype, mesh=args.mesh), tokenizer


def _card(model_dir: str) -> dict:
    """A bundled model's training.json ({} without one)."""
    import json

    file = os.path.join(model_dir, "training.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def _token_ids_file(path: str) -> list[int]:
    """argparse type of --draft-vocab: a JSON file holding a list of token ids (ranges are checked later)."""
    import json

    try:
        with open(path) as f:
            ids = json.load(f)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{path!r}: {e}") from None
    if not isinstance(ids, list) or not ids or not all(type(t) is int for t in ids):
        raise argparse.ArgumentTypeError(f"{path!r}: needs a non-empty JSON list of token ids")
    return ids


def _sampling(args, m) -> dict:
    """Sampling settings: the flags, else the checkpoint's generation_config.json, else greedy."""
    from qwenjax.inference.sampling import with_checkpoint_defaults

    # the checkpoint's fields' types and ranges were checked when the model was loaded
    return dict(**with_checkpoint_defaults(m.generation_config, temperature=args.temperature, top_k=args.top_k,
                                           top_p=args.top_p, min_p=args.min_p),
                seed=args.seed, max_new_tokens=args.max_new_tokens, stop_strings=tuple(args.stop),
                max_cache_len=args.max_cache_len, num_speculative_tokens=args.speculative,
                draft_vocab=args.draft_vocab)


def _stream_reply(tokenizer, tokens: Iterable[int], thinking: bool, prompt_len: int,
                  summary: Callable[[], str] = lambda: "") -> str:
    """Streams one reply to stdout as its `tokens` come, thinking and answer under separate headers; returns it.
    `summary()` adds to the closing line on stderr (e.g. the speculative acceptance)."""
    out = sys.stdout
    from qwenjax.inference.tokenizer import THINK_CLOSE, StreamDecoder

    decoder = StreamDecoder(tokenizer)
    text, shown, n, answering, answer_started = "", 0, 0, not thinking, not thinking
    if thinking:
        out.write("[thinking]\n")
    t0 = t_first = time.perf_counter()
    for token in tokens:
        n += 1
        if n == 1:
            t_first = time.perf_counter()
        text += decoder.push(token)
        if not answering and THINK_CLOSE in text:
            thought = text.split(THINK_CLOSE, 1)[0]
            rest = thought[shown:].rstrip("\n")
            out.write(rest + ("\n" if rest or not thought.endswith("\n") else "") + "[answer]\n")
            shown, answering = len(thought) + len(THINK_CLOSE), True
        # while thinking, hold back what may be the start of "</think>"
        hold = 0 if answering else next((k for k in range(len(THINK_CLOSE) - 1, 0, -1)
                                         if text.endswith(THINK_CLOSE[:k])), 0)
        piece, shown = text[shown:len(text) - hold], max(shown, len(text) - hold)
        if answering and not answer_started:  # drop the blank line the model writes after </think>
            piece = piece.lstrip("\n")
            answer_started = bool(piece)
        if piece:
            out.write(piece)
            out.flush()
    out.write(text[shown:] + "\n")
    t_end = time.perf_counter()
    rate = f", {(n - 1) / (t_end - t_first):.1f} tokens/s after the first" if n > 1 else ""
    print(f"[{prompt_len} prompt tokens, {n} new tokens; first token {t_first - t0:.2f} s{rate}{summary()}]",
          file=sys.stderr, flush=True)
    return text


def _generated(m, tokenizer, prompt_ids: list[int], sampling: dict, vision: dict, stats) -> Iterator[int]:
    """A reply's tokens from `qwenjax.stream` (counting speculative drafts into `stats`)."""
    from qwenjax.inference.generate import stream

    for step in stream(m, [prompt_ids], tokenizer=tokenizer, speculative_stats=stats, **sampling, **vision):
        if step[0] is None:
            return
        yield step[0]


def _served(engine, prompt_ids: list[int], sampling: dict, snapshot_at: tuple[int, ...], done: dict) -> Iterator[int]:
    """Submits a reply to `engine` (one row, with the prefix cache; raises InputError at once if it cannot fit)
    and returns its tokens as they come; `done` receives the request's `Finished` event."""
    import queue

    from qwenjax.inference.sampling import SamplingParams
    from qwenjax.serve.engine import Finished, Request

    events: queue.Queue = queue.Queue()
    request = engine.submit(Request(
        prompt=prompt_ids, on_event=events.put, max_tokens=sampling["max_new_tokens"], seed=sampling["seed"],
        sampling=SamplingParams(**{k: sampling[k] for k in ("temperature", "top_k", "top_p", "min_p")}),
        stop_strings=sampling["stop_strings"], snapshot_at=snapshot_at))

    def tokens():
        try:
            while not isinstance(event := events.get(), Finished):
                yield from event.ids
            done["finished"] = event
        finally:
            engine.cancel(request)

    return tokens()


def _prompt(m, tokenizer, messages, args) -> tuple[list[int], dict]:
    """The prompt's token ids, and its images and videos as the model takes them ({} for a text prompt)."""
    if not any(isinstance(msg["content"], list) for msg in messages):
        if args.raw:
            return tokenizer.encode(messages[-1]["content"]), {}
        return tokenizer.encode(tokenizer.apply_chat_template(messages, enable_thinking=not args.no_thinking)), {}
    if args.raw:
        raise ValueError("--raw takes no images or videos: a completion has no chat template to place them in")
    from qwenjax.inference.processor import load_processor

    if getattr(args, "processor", None) is None:
        args.processor = load_processor(m.source)
    batch = args.processor(messages, enable_thinking=not args.no_thinking)
    return batch["input_ids"][0].tolist(), {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}


def _user_message(text: str, images=(), videos=()) -> dict:
    """A user turn: its text, after its images and videos (as content parts) when it has any."""
    if not images and not videos:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                        *({"type": "video", "video": v} for v in videos),
                                        {"type": "text", "text": text}]}


def _check_text_flags(args) -> None:
    """Prompt, system message and stop strings must be UTF-8 (undecodable argv bytes arrive as surrogates)."""
    for name in ("prompt", "system"):
        if getattr(args, name, None) is not None:
            text_arg(getattr(args, name), f"--{name}")
    for i, stop in enumerate(args.stop):
        text_arg(stop, f"--stop #{i + 1}")
        if not stop:
            raise ValueError(f"--stop #{i + 1} is empty: it would stop after the first token")


def _input_lines():
    """The lines typed on stdin, decoded as UTF-8; a line that is not UTF-8 is reported and skipped."""
    raw = getattr(sys.stdin, "buffer", None)
    for n, line in enumerate(raw if raw is not None else sys.stdin, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                print(f"[input line {n} is not UTF-8 text (byte 0x{line[e.start]:02x} at offset {e.start}); "
                      "ignored, the conversation is kept]", file=sys.stderr, flush=True)
                continue
        yield line


def cmd_generate(args) -> int:
    _check_text_flags(args)
    m, tokenizer = _load(args)
    sampling = _sampling(args, m)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        _user_message(DEFAULT_CHAT_PROMPT if args.prompt is None else args.prompt, args.image, args.video)]
    ids, vision = _prompt(m, tokenizer, messages, args)
    if args.raw:  # a completion: the text it continues comes first
        sys.stdout.write(messages[-1]["content"])
    from qwenjax.inference.speculative import SpeculativeStats

    stats = SpeculativeStats()
    _stream_reply(tokenizer, _generated(m, tokenizer, ids, sampling, vision, stats),
                  thinking=not args.raw and not args.no_thinking, prompt_len=len(ids),
                  summary=lambda: f"; {stats}" if stats.steps else "")
    return 0


def cmd_chat(args) -> int:
    from qwenjax.inference.tokenizer import split_thinking

    _check_text_flags(args)
    if sys.stdin is None or sys.stdin.closed:
        raise ValueError("chat reads its messages from standard input, which is closed")
    m, tokenizer = _load(args)
    sampling = _sampling(args, m)
    from qwenjax.inference.speculative import SpeculativeStats
    from qwenjax.serve.engine import Engine
    from qwenjax.serve.prefix_cache import chat_snapshot_points

    # Text turns run on a one-row serving engine whose prefix cache keeps the conversation, so a turn prefills
    # only what is new; with pictures a turn runs `qwenjax.stream` over the whole history.
    engine = Engine(m, max_batch=1, max_len=args.max_cache_len or min(CHAT_CACHE_LEN, m.config.max_position_embeddings),
                    tokenizer=tokenizer, speculative=args.speculative,
                    draft_vocab=args.draft_vocab).start(warmup=False)
    stats = SpeculativeStats()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    images: list[str] = []
    print("chat: type a message; /image PATH attaches an image to your next message; /reset clears the history, "
          "/exit (or end of input) quits.", file=sys.stderr)
    for line in _input_lines():
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history, images = [], []
            print("[history cleared]", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line.removeprefix("/image").strip()
            if not os.path.isfile(path):
                print(f"[/image {path!r}: no such file]", file=sys.stderr, flush=True)
            else:
                images.append(path)
                print(f"[{path} goes with your next message]", file=sys.stderr, flush=True)
            continue
        history.append(_user_message(line, images))
        try:
            ids, vision = _prompt(m, tokenizer, system + history, args)
        except ValueError as e:  # an unreadable image, a template that refuses: this turn only
            history.pop()
            print(f"[{e}; the message was not sent, the conversation is kept]", file=sys.stderr, flush=True)
            continue
        finally:
            images = []
        thinking = not args.raw and not args.no_thinking
        if vision:
            text = _stream_reply(tokenizer, _generated(m, tokenizer, ids, sampling, vision, stats), thinking,
                                 len(ids), summary=lambda: f"; {stats}" if stats.steps else "")
        else:
            snapshot_at = () if args.raw else chat_snapshot_points(
                tokenizer, system + history, ids, enable_thinking=not args.no_thinking)
            done: dict = {}
            before = dataclasses.replace(engine.stats)
            try:
                tokens = _served(engine, ids, sampling, snapshot_at, done)
            except ValueError as e:  # past the cache's capacity: this turn only
                history.pop()
                print(f"[{e}; the message was not sent, the conversation is kept]", file=sys.stderr, flush=True)
                continue
            text = _stream_reply(tokenizer, tokens, thinking, len(ids), summary=lambda: (
                f"; {done['finished'].cached_tokens} prompt tokens from the prefix cache" if done else "") + (
                f"; {_acceptance(before, engine.stats, engine.k)}" if engine.k else ""))
        _, answer = split_thinking(text, prompt_opened_thinking=not args.no_thinking)
        history.append({"role": "assistant", "content": answer})
    engine.stop()
    return 0


def _acceptance(before, after, k: int) -> str:
    """A turn's speculative acceptance from the engine's counters before and after it, as `SpeculativeStats`."""
    from qwenjax.inference.speculative import SpeculativeStats

    drafted = after.drafted_tokens - before.drafted_tokens
    return str(SpeculativeStats(steps=drafted // k, drafted=drafted,
                                accepted=after.accepted_tokens - before.accepted_tokens))


def _add_generation_flags(p) -> None:
    p.add_argument("--model", help="local Hugging Face checkpoint directory (default: the bundled tiny-pydoc "
                   "model, completing text)")
    p.add_argument("--system", help="system message")
    p.add_argument("--raw", action="store_true", help="no chat template: the prompt text as is")
    p.add_argument("--no-thinking", action="store_true", help="chat template with enable_thinking=False")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=256)
    p.add_argument("--temperature", type=flag(float, minimum=0),
                   help="0 is greedy (default: generation_config.json, else 0)")
    p.add_argument("--top-k", type=flag(int, minimum=0))
    p.add_argument("--top-p", type=flag(float, above=0, maximum=1))
    p.add_argument("--min-p", type=flag(float, minimum=0, maximum=1))
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--max-cache-len", type=POSITIVE_INT,
                   help="cache capacity in tokens (default: fitted to the request)")
    p.add_argument("--speculative", type=flag(int, minimum=0), default=0, metavar="K",
                   help="draft K tokens a step with the checkpoint's MTP head and verify them in one pass (same "
                        "output, greedy or sampled; the acceptance is printed at the end)")
    p.add_argument("--draft-vocab", type=_token_ids_file, default=None, metavar="FILE",
                   help="with --speculative: a JSON list of the token ids the head may draft (e.g. the most "
                        "frequent ones; qwenjax.inference.speculative.frequent_tokens): cheaper draft steps, "
                        "same output")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=4,tensor=2 (default: one device)")


def cmd_finetune(args) -> int:
    import qwenjax
    from qwenjax.inference.tokenizer import Tokenizer
    from qwenjax.train.lora import ALL_TARGETS, LoRAConfig
    from qwenjax.train.loop import RunConfig, finetune
    from qwenjax.train.step import TrainConfig

    train = TrainConfig(learning_rate=args.lr, warmup_steps=args.warmup, total_steps=args.steps,
                        weight_decay=args.weight_decay, clip_norm=args.clip_norm, grad_accum=args.grad_accum,
                        remat=args.remat, master_fp32=args.master_fp32, seed=args.seed,
                        train_vision=args.train_vision, mtp_only=args.train == "mtp",
                        mtp_weight=args.mtp_weight if args.mtp_weight is not None else float(args.train == "mtp"))
    run = RunConfig(pack_len=args.pack_len, rows=args.rows, save_every=args.save_every,
                    strict_data=args.strict_data)
    lora = None
    if args.lora_rank:
        targets = tuple(args.lora_targets.split(",")) if args.lora_targets else ALL_TARGETS
        lora = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank,
                          dropout=args.lora_dropout, targets=targets, seed=args.seed)
    path = args.model
    if path is None:
        from qwenjax.demo import DEFAULT_MODEL_DIR

        path = DEFAULT_MODEL_DIR
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"no --model given, and the bundled model {path} is missing (run python "
                                    "scripts/train_default_model.py, or pass --model DIR)")
        print(f"No --model given: fine-tuning the bundled {path} — a small Qwen3.5 trained from scratch on "
              "Python's documentation by scripts/train_default_model.py, for trying the command out. Pass --model "
              "DIR for a real checkpoint.", file=sys.stderr, flush=True)
    tokenizer = Tokenizer(path)  # before the weights: a checkpoint without one fails at once
    model = qwenjax.from_pretrained(path, dtype=args.dtype, mesh=args.mesh)
    history = finetune(model, tokenizer, args.data, args.out, train=train, run=run, lora=lora, resume=args.resume,
                       overwrite=args.overwrite)
    if history:
        print(f"step {history[-1]['step']}: loss {history[-1]['loss']:.4f}; metrics in "
              f"{os.path.join(args.out, 'metrics.jsonl')}, model in {os.path.join(args.out, 'export')}")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    import qwenjax
    from qwenjax.demo import DEFAULT_MODEL_DIR
    from qwenjax.inference.tokenizer import Tokenizer
    from qwenjax.serve.api import create_app
    from qwenjax.serve.engine import Engine
    from qwenjax.serve.media import DEFAULT_MAX_IMAGE_PIXELS

    path = args.model or DEFAULT_MODEL_DIR
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r}: no such directory")
    if args.model is None:
        print(f"No --model given: serving the bundled {path} — a small Qwen3.5 trained from scratch on Python's "
              "documentation (it completes text; its chat replies are not a chat model's). Pass --model DIR for a "
              "real checkpoint.", file=sys.stderr, flush=True)
    tokenizer = Tokenizer(path)
    m = qwenjax.from_pretrained(path, dtype=args.dtype, mesh=args.mesh)
    name = args.served_model_name or os.path.basename(os.path.normpath(path))
    engine = Engine(m, max_batch=args.max_batch, max_len=args.max_len, prefill_chunk=args.prefill_chunk,
                    max_queue=args.max_queue, prefix_cache_bytes=args.prefix_cache_mb << 20, tokenizer=tokenizer,
                    speculative=args.speculative, draft_vocab=args.draft_vocab)
    if not args.no_warmup:
        print(f"compiling for {args.max_batch} rows of {args.max_len} tokens ...", file=sys.stderr, flush=True)
    engine.start(warmup=not args.no_warmup)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    processor = None
    if m.config.vision is not None:
        from qwenjax.inference.processor import load_processor

        processor = load_processor(path)
    app = create_app(engine, tokenizer, name, processor=processor,
                     allowed_local_media_path=args.allowed_local_media_path,
                     max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS if args.max_image_pixels is None else
                     args.max_image_pixels or None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qwenjax", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("forward", help="run a prefill forward and report its speed")
    src = f.add_mutually_exclusive_group()
    src.add_argument("--model", help="local Hugging Face checkpoint directory")
    src.add_argument("--config", default=DEFAULT_CONFIG, help="config file or configs/ name (random weights)")
    f.add_argument("--seq", type=POSITIVE_INT, default=512)
    f.add_argument("--batch", type=POSITIVE_INT, default=1)
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    f.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=4,tensor=2 (default: one device)")
    f.add_argument("--repeats", type=POSITIVE_INT, default=3)
    f.add_argument("--seed", type=SEED, default=0)
    f.set_defaults(fn=cmd_forward)
    g = sub.add_parser("generate", help="generate a reply to one prompt, streamed as it comes")
    g.add_argument("--prompt", help=f"default: {DEFAULT_CHAT_PROMPT!r} ({DEFAULT_COMPLETION_PROMPT!r} to complete, "
                   f"for the bundled model; {DEFAULT_PICTURE_PROMPT!r} for the bundled vision model)")
    g.add_argument("--image", action="append", default=[], help="an image file for the prompt (repeatable)")
    g.add_argument("--video", action="append", default=[],
                   help="a video for the prompt: a video file (mp4, webm, mkv, ...; needs PyAV: pip install av) or a "
                        "directory of its frame images, in name order (repeatable)")
    _add_generation_flags(g)
    g.set_defaults(fn=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat with history (reads stdin)")
    _add_generation_flags(c)
    c.set_defaults(fn=cmd_chat)
    t = sub.add_parser("finetune", help="fine-tune on a JSONL file (full or LoRA), with checkpoints and resume")
    t.add_argument("--model", help="local Hugging Face checkpoint directory, with its tokenizer (default: the "
                   "bundled tiny-pydoc model, to try the command)")
    t.add_argument("--data", required=True,
                   help='JSONL: {"text": ...} or {"messages": [...]} per line; with a vision model, a message\'s '
                        'content may list {"type": "image", "image": PATH} parts (paths relative to the file)')
    t.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.jsonl, export/")
    t.add_argument("--overwrite", action="store_true", help="replace the earlier run in --out (default: refuse)")
    t.add_argument("--steps", type=POSITIVE_INT, default=1000)
    t.add_argument("--lr", type=flag(float, above=0), default=1e-4)
    t.add_argument("--warmup", type=flag(int, minimum=0), default=None, help="warmup steps (default: 5%% of --steps)")
    t.add_argument("--weight-decay", type=flag(float, minimum=0), default=0.1)
    t.add_argument("--clip-norm", type=flag(float, minimum=0), default=1.0, help="0 turns clipping off")
    t.add_argument("--pack-len", type=flag(int, minimum=2), default=1024, help="tokens per packed row")
    t.add_argument("--rows", type=POSITIVE_INT, default=8, help="rows per micro-batch")
    t.add_argument("--grad-accum", type=POSITIVE_INT, default=1)
    t.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    t.add_argument("--master-fp32", action="store_true", help="keep fp32 master weights")
    t.add_argument("--lora-rank", type=flag(int, minimum=0), default=0,
                   help="train LoRA adapters of this rank (0: full fine-tune)")
    t.add_argument("--lora-alpha", type=flag(float, above=0), default=None, help="default: 2 x rank")
    t.add_argument("--lora-dropout", type=flag(float, minimum=0, below=1), default=0.0)
    t.add_argument("--lora-targets", default=None,
                   help="comma-separated layer names (default: every linear of the language model; the vision "
                        "tower's are qkv,proj,linear_fc1,linear_fc2)")
    t.add_argument("--train-vision", action="store_true",
                   help="full fine-tune: also train the vision tower (frozen by default)")
    t.add_argument("--mtp-weight", type=flag(float, minimum=0), default=None,
                   help="add this weight x the MTP head's loss (token t+2), which keeps the checkpoint's draft "
                        "head in step with the model (default 0: the head is left as loaded; 1 with --train mtp)")
    t.add_argument("--train", default="model", choices=["model", "mtp"],
                   help="mtp: train only the MTP head on the frozen model (revives a stale draft head)")
    t.add_argument("--save-every", type=POSITIVE_INT, default=100)
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--strict-data", action="store_true", help="stop at the first bad data line")
    t.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    t.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=4 (rows over data x fsdp; default: one device)")
    t.add_argument("--seed", type=SEED, default=0)
    t.set_defaults(fn=cmd_finetune)
    v = sub.add_parser("serve", help="an OpenAI-compatible server (continuous batching, prefix cache, tools)")
    v.add_argument("--model", help="local Hugging Face checkpoint directory (default: the bundled tiny-pydoc model)")
    v.add_argument("--served-model-name", help="the model name clients use (default: the directory's name)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=flag(int, minimum=0, maximum=65535), default=8000)
    v.add_argument("--max-batch", type=POSITIVE_INT, default=16, help="rows decoded together")
    v.add_argument("--max-len", type=flag(int, minimum=2), default=4096,
                   help="tokens per row: a request's prompt plus its max_tokens")
    v.add_argument("--prefill-chunk", type=flag(int, minimum=64), default=256,
                   help="the longest prefill call, a multiple of 64: long prompts prefill in chunks between the "
                        "running rows' decode steps")
    v.add_argument("--max-queue", type=flag(int, minimum=0), default=256,
                   help="requests waiting for a row beyond which the server answers 429")
    v.add_argument("--prefix-cache-mb", type=flag(int, minimum=0), default=1024,
                   help="memory for prefix-cache snapshots (GDN states and KV), 0 turns it off")
    v.add_argument("--no-warmup", action="store_true",
                   help="answer at once instead of compiling the decode steps and prefill chunks first: each "
                        "program compiles on first use, so early requests of each new shape wait for it")
    v.add_argument("--shutdown-timeout", type=flag(float, minimum=0), default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish before they are cancelled")
    v.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="image_url parts may name files under DIR (default: base64 data URLs only)")
    v.add_argument("--max-image-pixels", type=flag(int, minimum=0), default=None, metavar="N",
                   help="the most pixels an image or video frame may have, checked from its header before it is "
                        "decoded (default 16777216, Qwen3.5's largest image unscaled; 0: Pillow's own bound only)")
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    v.add_argument("--speculative", type=flag(int, minimum=0), default=0, metavar="K",
                   help="draft K tokens per row and step with the checkpoint's MTP head, verified in one pass (same "
                        "output, greedy or sampled)")
    v.add_argument("--draft-vocab", type=_token_ids_file, default=None, metavar="FILE",
                   help="with --speculative: a JSON list of the token ids the head may draft")
    v.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    v.add_argument("--mesh", default=None, help="e.g. data=2,tensor=2 (default: one device)")
    v.set_defaults(fn=cmd_serve)
    args = p.parse_args(argv)
    if getattr(args, "warmup", 0) is None:
        args.warmup = max(1, args.steps // 20)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError) as e:
        print(f"qwenjax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
