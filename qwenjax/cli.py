"""`qwenjax` command line.

    qwenjax forward                                   # random 0.8B-shape model, 512-token prefill
    qwenjax forward --model DIR --seq 2048            # a local Hugging Face checkpoint
    qwenjax forward --config configs/tiny.json --mesh fsdp=4,tensor=2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CONFIG = "qwen3.5-0.8b"


def resolve_config(name: str) -> str:
    """A config path, or the name of a file in the repository's configs/ (e.g. 'qwen3.5-9b')."""
    if os.path.exists(name):
        return name
    candidate = os.path.join(CONFIG_DIR, name if name.endswith(".json") else name + ".json")
    if os.path.exists(candidate):
        return candidate
    known = sorted(f[:-5] for f in os.listdir(CONFIG_DIR)) if os.path.isdir(CONFIG_DIR) else []
    raise SystemExit(f"qwenjax: no config {name!r} (a path, or one of: {', '.join(known)})")


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qwenjax", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("forward", help="run a prefill forward and report its speed")
    src = f.add_mutually_exclusive_group()
    src.add_argument("--model", help="local Hugging Face checkpoint directory")
    src.add_argument("--config", default=DEFAULT_CONFIG, help="config file or configs/ name (random weights)")
    f.add_argument("--seq", type=int, default=512)
    f.add_argument("--batch", type=int, default=1)
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    f.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=4,tensor=2 (default: one device)")
    f.add_argument("--repeats", type=int, default=3)
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(fn=cmd_forward)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"qwenjax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
