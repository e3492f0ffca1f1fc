"""Trains the model `qwenjax generate` uses by default: a small Qwen3.5 trained from scratch on Python's own docs.

    python scripts/train_default_model.py                        # writes the default (see below for time)
    python scripts/train_default_model.py --steps 20 --out /tmp/tiny-pydoc   # a quick trial run

The corpus is on every machine with Python: the reference-manual topics that `help()` shows (`pydoc_data`) and
the docstrings of the standard library's modules, classes and functions, read from its source with `ast`
(nothing is imported). From it the script
1. trains a byte-level BPE tokenizer (HF `tokenizers`, 4096 tokens) with Qwen's chat special tokens;
2. writes a random bf16 checkpoint of configs/qwen3.5-tiny-pydoc.json (8 layers, 3 Gated DeltaNet : 1 gated
   attention, as Qwen3.5) in the Hugging Face layout with that tokenizer and Qwen3.5's chat template format;
3. trains it with qwenjax's own trainer (`qwenjax.train.loop.finetune`: packed 512-token rows, fp32, AdamW with
   warmup + cosine), holding out every 50th text piece;
4. exports it in the Hugging Face layout (bf16, ~16 MB), adds a model card with the held-out loss, and replaces
   --out atomically.

A 12-step trial on the project's 2-core CPU machine took ~5 s per step of 8 x 512 tokens after two ~35 s
compilations (one of them since removed: the train step now compiles once), so the default 800 steps take
about 70 minutes.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwenjax.demo import DEFAULT_MODEL_DIR, install_model_dir  # noqa: E402

CONFIG = "qwen3.5-tiny-pydoc"
VOCAB_SIZE = 4096
PIECE_CHARS = 1200   # text pieces (JSONL lines) of at most ~this many characters: well under one packed row
HOLDOUT_EVERY = 50   # every 50th piece is held out for the validation loss
SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "ensurepip", "site-packages", "dist-packages",
             "__pycache__"}


def python_docs() -> list[str]:
    """The documents: one per pydoc topic, one per docstring of 80+ characters, in a fixed order."""
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics)]
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith((".", "config-")))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 80:
                        docs.append(doc)
    return docs


def pieces(docs: list[str]) -> list[str]:
    """Each document cut at paragraph breaks into pieces of at most ~PIECE_CHARS characters."""
    out = []
    for doc in docs:
        current = ""
        for para in doc.split("\n\n"):
            para = para.strip("\n")
            while len(para) > PIECE_CHARS:  # a paragraph longer than a piece: cut at a line break if there is one
                cut = para.rfind("\n", 0, PIECE_CHARS)
                cut = cut if cut > 0 else PIECE_CHARS
                if current:
                    out.append(current)
                    current = ""
                out.append(para[:cut])
                para = para[cut:].lstrip("\n")
            if current and len(current) + 2 + len(para) > PIECE_CHARS:
                out.append(current)
                current = ""
            current = f"{current}\n\n{para}" if current else para
        if current.strip():
            out.append(current)
    return [p for p in out if p.strip()]


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from qwenjax.demo import ADDED_TOKENS, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(ADDED_TOKENS), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens(ADDED_TOKENS)
    return tok


def heldout_loss(model_dir: str, texts: list[str], pack_len: int) -> float:
    """Mean next-token loss (nats) of the model in `model_dir` over `texts`, each scored on its own."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import qwenjax
    from qwenjax.inference.tokenizer import Tokenizer

    m, tok = qwenjax.from_pretrained(model_dir, dtype="float32"), Tokenizer(model_dir)
    total, count = 0.0, 0
    for text in texts:  # each right-padded to pack_len: one shape, one compilation
        row = tok.encode(text)[:pack_len]
        ids, mask = np.zeros((1, pack_len), np.int32), np.zeros((1, pack_len), np.int32)
        ids[0, :len(row)], mask[0, :len(row)] = row, 1
        logp = jax.nn.log_softmax(jnp.asarray(m(ids, mask), jnp.float32)[0, :len(row) - 1])
        total += float(-jnp.take_along_axis(logp, jnp.asarray(ids[0, 1:len(row), None]), axis=-1).sum())
        count += len(row) - 1
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_MODEL_DIR, help="where the model goes (replaced atomically)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--pack-len", type=int, default=512)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="scratch directory (default: a temporary one, removed at the end)")
    args = p.parse_args()

    import qwenjax
    from qwenjax.demo import write_random_checkpoint
    from qwenjax.inference.tokenizer import Tokenizer
    from qwenjax.train.loop import RunConfig, finetune
    from qwenjax.train.step import TrainConfig

    t0 = time.time()
    work = args.work or tempfile.mkdtemp(prefix="qwenjax-train-default-")
    os.makedirs(work, exist_ok=True)
    docs = python_docs()
    texts = pieces(docs)
    train_texts = [t for i, t in enumerate(texts) if i % HOLDOUT_EVERY]
    heldout = [t for i, t in enumerate(texts) if i % HOLDOUT_EVERY == 0]
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.2f} M characters -> {len(texts)} pieces "
          f"({len(heldout)} held out); Python {platform.python_version()}", flush=True)

    tokenizer = train_tokenizer(train_texts)
    init = write_random_checkpoint(os.path.join(work, "init"), CONFIG, seed=args.seed, tokenizer=tokenizer,
                                   dtype="bfloat16")
    data = os.path.join(work, "train.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for text in train_texts:
            f.write(json.dumps({"text": text}) + "\n")
    n_tokens = sum(len(e.ids) + 1 for e in tokenizer.encode_batch(train_texts))
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens; training data {n_tokens / 1e6:.2f} M tokens, "
          f"{args.steps} steps x {args.rows} x {args.pack_len} = "
          f"{args.steps * args.rows * args.pack_len / n_tokens:.1f} epochs", flush=True)

    train = TrainConfig(learning_rate=args.lr, warmup_steps=min(args.warmup, args.steps // 10), total_steps=args.steps,
                        final_lr_ratio=0.05, weight_decay=0.1, seed=args.seed)
    run = RunConfig(pack_len=args.pack_len, rows=args.rows, save_every=max(1, min(500, args.steps)))
    history = finetune(qwenjax.from_pretrained(init, dtype="float32"), Tokenizer(init), data, os.path.join(work, "run"),
                       train=train, run=run, overwrite=True)  # a scratch directory: a rerun starts over
    export = os.path.join(work, "run", "export")
    loss = heldout_loss(export, heldout, args.pack_len)
    train_loss = sum(h["loss"] for h in history[-20:]) / len(history[-20:])
    print(f"held-out loss {loss:.3f} nats/token (perplexity {math.exp(loss):.1f}); last-20-step train loss "
          f"{train_loss:.3f}", flush=True)

    card = {
        "what": "A small Qwen3.5-architecture model (configs/qwen3.5-tiny-pydoc.json) trained from scratch by "
                "scripts/train_default_model.py on Python's bundled documentation. It writes Python-docs-like "
                "English; it knows nothing else and follows no instructions.",
        "command": "python scripts/train_default_model.py " + " ".join(sys.argv[1:]),
        "python": platform.python_version(),
        "corpus_characters": sum(map(len, docs)),
        "train_tokens": n_tokens,
        "steps": args.steps, "rows": args.rows, "pack_len": args.pack_len, "learning_rate": args.lr,
        "heldout_loss": round(loss, 4), "train_loss_last_20_steps": round(train_loss, 4),
        "wall_seconds": round(time.time() - t0),
    }
    with open(os.path.join(export, "training.json"), "w") as f:
        json.dump(card, f, indent=2)
    out = os.path.abspath(args.out)
    install_model_dir(export, out)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out} ({sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 1e6:.1f} MB) in "
          f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
