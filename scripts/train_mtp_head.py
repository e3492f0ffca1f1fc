"""Gives the bundled default model (qwenjax/assets/tiny-pydoc) a trained MTP head, for speculative decoding.

    python scripts/train_mtp_head.py                          # adds the head to the bundled model, in place
    python scripts/train_mtp_head.py --steps 10 --out /tmp/tiny-pydoc-mtp   # a quick trial run

The model trained by scripts/train_default_model.py has no `mtp.*` head. This script
1. adds a randomly initialised one (`qwenjax.pretrained.with_mtp_head`);
2. trains the head alone on the frozen model with qwenjax's trainer (`TrainConfig(mtp_weight=1, mtp_only=True)`)
   on what it will draft against: the model's own greedy continuations of the first 32 tokens of each training
   piece of the Python-docs corpus (the model's own training split; `--continuation-tokens 0`: the pieces
   themselves). Trained on the corpus, the head was right 69% of the time at k = 1 (2026-12-04);
3. measures it on the held-out pieces: the head's loss and top-1 accuracy at token t+2, and the acceptance of
   greedy speculative decoding with k = 1, 2, 3 drafts (`qwenjax.generate(..., num_speculative_tokens=k)`);
4. exports the model with the head in bf16 (the tokenizer file without indentation, so that both bundled models
   stay within 20 MB), adds the measurements to the model card (training.json) and replaces --out atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwenjax.demo import DEFAULT_MODEL_DIR, install_model_dir  # noqa: E402
from scripts.train_default_model import HOLDOUT_EVERY, pieces, python_docs  # noqa: E402

PROMPT_TOKENS = 32  # the held-out acceptance's prompts, and the continuations' (--continuation-tokens)


def heldout_mtp(m, tok, texts: list[str], pack_len: int) -> tuple[float, float]:
    """(mean loss in nats, top-1 accuracy) of the MTP head's prediction of token t+2 over `texts`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import qwenjax

    total, correct, count = 0.0, 0, 0
    for text in texts:  # each right-padded to pack_len: one shape, one compilation
        row = tok.encode(text)[:pack_len]
        if len(row) < 3:
            continue
        ids, mask = np.zeros((1, pack_len), np.int32), np.zeros((1, pack_len), np.int32)
        ids[0, :len(row)], mask[0, :len(row)] = row, 1
        logits = jnp.asarray(qwenjax.mtp_logits(m, ids, mask), jnp.float32)[0, :len(row) - 2]
        targets = jnp.asarray(ids[0, 2:len(row)])
        logp = jax.nn.log_softmax(logits)
        total += float(-jnp.take_along_axis(logp, targets[:, None], axis=-1).sum())
        correct += int((jnp.argmax(logits, -1) == targets).sum())
        count += len(row) - 2
    return total / count, correct / count


def greedy_continuations(m, tok, texts: list[str], new_tokens: int, batch: int = 64) -> list[str]:
    """Each text's first PROMPT_TOKENS tokens and the model's greedy continuation of them: the head then learns
    to predict what it will be asked to draft (the main model's own greedy text), not the corpus."""
    import qwenjax

    prompts = [ids[:PROMPT_TOKENS] for ids in map(tok.encode, texts) if len(ids) >= PROMPT_TOKENS]
    out = []
    for i in range(0, len(prompts), batch):
        rows = prompts[i:i + batch]
        for prompt, new in zip(rows, qwenjax.generate(m, rows, max_new_tokens=new_tokens)):
            out.append(tok.decode(prompt + new, skip_special_tokens=True))
    print(f"{len(out)} greedy continuations of {new_tokens} tokens", flush=True)
    return out


def acceptance(m, tok, texts: list[str], prompt_tokens: int, new_tokens: int) -> dict[str, dict]:
    """Greedy speculative decoding from the first `prompt_tokens` of each held-out text, for k = 1, 2, 3."""
    import qwenjax
    from qwenjax.inference.speculative import SpeculativeStats

    prompts = [ids[:prompt_tokens] for ids in (tok.encode(t) for t in texts) if len(ids) >= prompt_tokens]
    out = {}
    for k in (1, 2, 3):
        stats = SpeculativeStats()
        qwenjax.generate(m, prompts, max_new_tokens=new_tokens, num_speculative_tokens=k, speculative_stats=stats)
        out[f"k={k}"] = {"acceptance_rate": round(stats.acceptance_rate, 4),
                         "tokens_per_verify_pass": round(stats.mean_accepted + 1, 3)}
        print(f"k={k}: {stats}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL_DIR, help="the model to give a head (default: the bundled one)")
    p.add_argument("--out", default=DEFAULT_MODEL_DIR, help="where the model goes (replaced atomically)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--pack-len", type=int, default=512)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--continuation-tokens", type=int, default=96,
                   help="train on the model's greedy continuations of this many tokens after each training text's "
                        f"first {PROMPT_TOKENS} (0: on the texts themselves)")
    p.add_argument("--work", help="scratch directory (default: a temporary one, removed at the end)")
    args = p.parse_args()

    import shutil

    import qwenjax
    from qwenjax.inference.tokenizer import Tokenizer
    from qwenjax.pretrained import with_mtp_head
    from qwenjax.train.loop import RunConfig, finetune
    from qwenjax.train.step import TrainConfig

    t0 = time.time()
    work = args.work or tempfile.mkdtemp(prefix="qwenjax-train-mtp-")
    os.makedirs(work, exist_ok=True)
    texts = pieces(python_docs())
    train_texts = [t for i, t in enumerate(texts) if i % HOLDOUT_EVERY]
    heldout = [t for i, t in enumerate(texts) if i % HOLDOUT_EVERY == 0]
    with open(os.path.join(args.model, "training.json")) as f:
        card = json.load(f)

    # a new head in place of any the model has: the result does not depend on an earlier run's
    model = with_mtp_head(qwenjax.from_pretrained(args.model, dtype="float32"), seed=args.seed, replace=True)
    if args.continuation_tokens:
        train_texts = greedy_continuations(model, Tokenizer(args.model), train_texts, args.continuation_tokens)
    data = os.path.join(work, "train.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for text in train_texts:
            f.write(json.dumps({"text": text}) + "\n")
    train = TrainConfig(learning_rate=args.lr, warmup_steps=min(30, args.steps // 10), total_steps=args.steps,
                        final_lr_ratio=0.05, weight_decay=0.1, seed=args.seed, mtp_weight=1.0, mtp_only=True)
    run = RunConfig(pack_len=args.pack_len, rows=args.rows, save_every=max(1, min(500, args.steps)))
    history = finetune(model, Tokenizer(args.model), data, os.path.join(work, "run"), train=train, run=run,
                       overwrite=True)  # a scratch directory: a rerun starts over
    trained = qwenjax.from_pretrained(os.path.join(work, "run", "export"), dtype="float32")
    tok = Tokenizer(args.model)
    loss, top1 = heldout_mtp(trained, tok, heldout, args.pack_len)
    print(f"MTP head, held out: loss {loss:.3f} nats at token t+2, top-1 accuracy {top1:.1%}", flush=True)
    accept = acceptance(trained, tok, heldout[:24], prompt_tokens=PROMPT_TOKENS, new_tokens=48)

    export = qwenjax.export_hf(trained, os.path.join(work, "export"), dtype="bfloat16", overwrite=True)
    card["mtp_head"] = {
        "what": "the MTP head (mtp.*) trained alone on the frozen model by scripts/train_mtp_head.py",
        "command": "python scripts/train_mtp_head.py " + " ".join(sys.argv[1:]),
        "trained_on": (f"the model's greedy continuations of {args.continuation_tokens} tokens after the first "
                       f"{PROMPT_TOKENS} tokens of each training text" if args.continuation_tokens else
                       "the training texts"),
        "steps": args.steps, "rows": args.rows, "pack_len": args.pack_len, "learning_rate": args.lr,
        "train_mtp_loss_last_20_steps": round(sum(h["mtp_loss"] for h in history[-20:]) / len(history[-20:]), 4),
        "heldout_mtp_loss": round(loss, 4), "heldout_top1_t_plus_2": round(top1, 4),
        "greedy_speculative_acceptance_24_heldout_prompts_of_32_tokens_48_new": accept,
        "wall_seconds": round(time.time() - t0),
    }
    with open(os.path.join(export, "training.json"), "w") as f:
        json.dump(card, f, indent=2)
    # the tokenizer without indentation (105 KB instead of 265): the head's 2 MB must fit the bundle's 20 MB
    from tokenizers import Tokenizer as HFTokenizer
    HFTokenizer.from_file(os.path.join(export, "tokenizer.json")).save(os.path.join(export, "tokenizer.json"),
                                                                        pretty=False)
    install_model_dir(export, os.path.abspath(args.out))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out} in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
