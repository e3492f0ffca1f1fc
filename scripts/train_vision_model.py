"""Trains the model `qwenjax generate --image` uses by default: a small Qwen3.5 with a vision tower, trained from
scratch on pictures it draws itself.

    python scripts/train_vision_model.py                          # writes qwenjax/assets/tiny-vision
    python scripts/train_vision_model.py --steps 20 --out /tmp/tiny-vision    # a quick trial run

1. Pillow draws 64 x 64 pictures: one to four shapes (circle, square, triangle) of one colour (red, green, blue,
   yellow, purple, orange) on a light background, one shape to a quarter; each picture comes with what is in it;
2. each picture becomes a conversation of three questions about it (its colour, shape, count, where the shape is,
   or a description), answered from those facts;
3. a random checkpoint of configs/qwen3.5-tiny-vision.json (4 text layers, 3 Gated DeltaNet : 1 gated attention,
   width 128; a 2-block vision tower, 8-pixel patches) with a byte-level tokenizer that knows the vision tokens
   is trained, tower and all, by qwenjax's own trainer (`qwenjax.train.loop.finetune`, `train_vision`);
4. the export is scored on freshly drawn pictures (greedy answers, exact match per question kind), and the
   scores go into its model card (training.json) beside an example picture (example.png) that README names;
   --out is replaced atomically.

Every assistant turn of the chat template (`qwenjax.demo.CHAT_TEMPLATE_EMPTY_THINKING`) starts with an empty
thinking block, as Qwen3.5's templates write the turns after the last question: a generation prompt with thinking
on or off continues the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwenjax.demo import DEFAULT_VISION_MODEL_DIR, install_model_dir  # noqa: E402

CONFIG = "qwen3.5-tiny-vision"
SIZE = 64   # pixels per side: 8 x 8 patches of 8 pixels, 16 image tokens
CELL = SIZE // 2  # the picture's quarters: a shape fills most of one (2 x 2 merged image tokens)
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 75, 215), "yellow": (230, 195, 25),
           "purple": (140, 55, 180), "orange": (240, 130, 25)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("one", "two", "three", "four")
ROWS, COLS = ("top", "bottom"), ("left", "right")
QUESTION_KINDS = ("colour", "shape", "count", "position", "describe")
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
PROCESSOR = {"patch_size": 8, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": SIZE * SIZE,
             "max_pixels": SIZE * SIZE, "size": {"shortest_edge": SIZE * SIZE, "longest_edge": SIZE * SIZE},
             "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def draw(rng):
    """(a 64 x 64 RGB picture, its facts: colour, shape, count, and the cell of a lone shape)."""
    from PIL import Image, ImageDraw

    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    count = int(rng.integers(1, 5))
    background = tuple(int(v) for v in rng.integers(220, 256, 3))
    image = Image.new("RGB", (SIZE, SIZE), background)
    pen = ImageDraw.Draw(image)
    cells = rng.permutation(4)[:count]
    for cell in cells:
        r, c = divmod(int(cell), 2)
        half = int(rng.integers(9, 14))
        cy = r * CELL + CELL // 2 + int(rng.integers(-1, 2))
        cx = c * CELL + CELL // 2 + int(rng.integers(-1, 2))
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = tuple(int(min(255, max(0, v + rng.integers(-20, 21)))) for v in COLOURS[colour])
        if shape == "circle":
            pen.ellipse(box, fill=fill)
        elif shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    where = None
    if count == 1:
        r, c = divmod(int(cells[0]), 2)
        where = f"{ROWS[r]} {COLS[c]}"
    return image, {"colour": colour, "shape": shape, "count": count, "where": where}


def question(kind: str, facts: dict) -> tuple[str, str] | None:
    """(question, answer) of one kind about a picture; None where it does not apply (where is one of many)."""
    one = facts["count"] == 1
    noun = facts["shape"] if one else facts["shape"] + "s"
    if kind == "colour":
        return ("What colour is the shape?" if one else "What colour are the shapes?"), facts["colour"]
    if kind == "shape":
        return ("What shape is it?" if one else "What shape are they?"), noun
    if kind == "count":
        return "How many shapes are there?", NUMBERS[facts["count"] - 1]
    if kind == "position":
        return ("Where is the shape?", facts["where"]) if one else None
    count = NUMBERS[facts["count"] - 1]
    return "Describe the image.", (f"one {facts['colour']} {noun}, {facts['where']}" if one
                                   else f"{count} {facts['colour']} {noun}")


def conversations(rng, n: int, pictures_dir: str, turns: int = 3) -> list[dict]:
    """n pictures drawn into `pictures_dir`, each the first user turn of a conversation of `turns` questions."""
    os.makedirs(pictures_dir, exist_ok=True)
    out = []
    for i in range(n):
        image, facts = draw(rng)
        name = f"{i:05d}.png"
        image.save(os.path.join(pictures_dir, name))
        kinds = [k for k in rng.permutation(QUESTION_KINDS) if question(str(k), facts)][:turns]
        messages = []
        for t, kind in enumerate(kinds):
            q, a = question(str(kind), facts)
            content = [{"type": "image", "image": os.path.join(os.path.basename(pictures_dir), name)},
                       {"type": "text", "text": q}] if t == 0 else q
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
        out.append({"messages": messages, "facts": facts})
    return out


def write_initial_checkpoint(path: str, seed: int) -> None:
    """A random checkpoint of CONFIG with the byte-level tokenizer plus the vision tokens, the chat template whose
    assistant turns start with an empty thinking block, and the processor configs."""
    from qwenjax.demo import CHAT_TEMPLATE_EMPTY_THINKING, byte_tokenizer, write_random_checkpoint

    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens(VISION_TOKENS)
    write_random_checkpoint(path, CONFIG, seed=seed, tokenizer=tokenizer, dtype="bfloat16")
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE_EMPTY_THINKING)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        with open(os.path.join(path, name), "w") as f:
            json.dump(PROCESSOR, f, indent=2)


def score(model_dir: str, rng, n: int, work: str, batch: int = 32) -> dict[str, float]:
    """Exact-match accuracy of greedy answers per question kind, over n freshly drawn pictures."""
    import numpy as np

    import qwenjax

    m, processor = qwenjax.from_pretrained(model_dir, dtype="float32"), qwenjax.load_processor(model_dir)
    tokenizer = processor.tokenizer
    im_end = tokenizer.token_to_id("<|im_end|>")
    pictures = os.path.join(work, "heldout")
    os.makedirs(pictures, exist_ok=True)
    asks = []
    for i in range(n):
        image, facts = draw(rng)
        file = os.path.join(pictures, f"{i:05d}.png")
        image.save(file)
        for kind in QUESTION_KINDS:
            if (qa := question(kind, facts)) is not None:
                asks.append((kind, file, *qa))
    right = {k: [] for k in QUESTION_KINDS}
    for at in range(0, len(asks), batch):
        chunk = asks[at:at + batch]
        inputs = [processor([{"role": "user", "content": [{"type": "image", "image": file},
                                                          {"type": "text", "text": q}]}], enable_thinking=False)
                  for _, file, q, _ in chunk]
        out = qwenjax.generate(m, [x["input_ids"][0] for x in inputs],
                               pixel_values=np.concatenate([x["pixel_values"] for x in inputs]),
                               image_grid_thw=np.concatenate([x["image_grid_thw"] for x in inputs]),
                               max_new_tokens=32, temperature=0.0, eos_token_ids=[im_end])
        for (kind, _, _, answer), tokens in zip(chunk, out):
            right[kind].append(tokenizer.decode(tokens).strip() == answer)
    accuracy = {k: round(float(np.mean(v)), 4) for k, v in right.items()}
    accuracy["all"] = round(float(np.mean([x for v in right.values() for x in v])), 4)
    return accuracy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_VISION_MODEL_DIR, help="where the model goes (replaced atomically)")
    p.add_argument("--pictures", type=int, default=5000, help="training pictures (one conversation each)")
    p.add_argument("--heldout", type=int, default=100, help="fresh pictures to score the model on")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--pack-len", type=int, default=512)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="scratch directory (default: a temporary one, removed at the end)")
    args = p.parse_args()

    import numpy as np

    import qwenjax
    from qwenjax.train.loop import RunConfig, finetune
    from qwenjax.train.step import TrainConfig

    t0 = time.time()
    work = args.work or tempfile.mkdtemp(prefix="qwenjax-train-vision-")
    os.makedirs(work, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    data = os.path.join(work, "train.jsonl")
    with open(data, "w") as f:
        for record in conversations(rng, args.pictures, os.path.join(work, "pictures")):
            f.write(json.dumps({"messages": record["messages"]}) + "\n")
    init = os.path.join(work, "init")
    shutil.rmtree(init, ignore_errors=True)
    write_initial_checkpoint(init, args.seed)
    print(f"{args.pictures} pictures drawn; {args.steps} steps of {args.rows} x {args.pack_len} tokens",
          flush=True)

    train = TrainConfig(learning_rate=args.lr, warmup_steps=min(args.warmup, args.steps // 10),
                        total_steps=args.steps, final_lr_ratio=0.05, weight_decay=0.1, seed=args.seed,
                        train_vision=True)
    run = RunConfig(pack_len=args.pack_len, rows=args.rows, save_every=max(1, min(500, args.steps)))
    model = qwenjax.from_pretrained(init, dtype="float32")
    history = finetune(model, qwenjax.load_processor(init).tokenizer, data, os.path.join(work, "run"), train=train,
                       run=run, overwrite=True)  # a scratch directory: a rerun starts over
    export = os.path.join(work, "run", "export")
    for name in ("chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json"):
        shutil.copy(os.path.join(init, name), export)
    train_loss = sum(h["loss"] for h in history[-20:]) / len(history[-20:])
    accuracy = score(export, np.random.default_rng([args.seed, 1]), args.heldout, work)
    print(f"held-out accuracy {accuracy}; last-20-step train loss {train_loss:.4f}", flush=True)
    example, facts = draw(np.random.default_rng([args.seed, 2]))
    example.save(os.path.join(export, "example.png"))
    card = {
        "what": "A small Qwen3.5-architecture model with a vision tower (configs/qwen3.5-tiny-vision.json), "
                "trained from scratch by scripts/train_vision_model.py on 64 x 64 pictures of one to four shapes "
                "that it draws with Pillow. It answers five questions about such pictures and nothing else: "
                + "; ".join(f"{k}: {question(k, {'colour': 'red', 'shape': 'circle', 'count': 1, 'where': 'top'})[0]!r}"
                            for k in QUESTION_KINDS) + " (plural forms for several shapes).",
        "command": "python scripts/train_vision_model.py " + " ".join(sys.argv[1:]),
        "python": platform.python_version(),
        "pictures": args.pictures, "steps": args.steps, "rows": args.rows, "pack_len": args.pack_len,
        "learning_rate": args.lr, "train_loss_last_20_steps": round(train_loss, 4),
        "heldout_pictures": args.heldout, "heldout_accuracy": accuracy,
        "example": {"file": "example.png", **facts},
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
