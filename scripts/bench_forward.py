"""Prefill throughput: qwenjax vs transformers, side by side, same random weights, same dtype, one run.

    python scripts/bench_forward.py                       # 0.8B shape, 2048 tokens, fp32
    python scripts/bench_forward.py --seq 512 --layers 4  # quicker

transformers writes a random checkpoint with its own `save_pretrained`; both libraries load that directory and
run a full-prompt forward keeping only the last position's logits (what generation's prefill needs). Reports
the median of --repeats timed runs after one warm-up (qwenjax's warm-up includes compilation).
Needs the `test` extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="qwen3.5-0.8b", help="config file or configs/ name")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (multiple of 4)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import numpy as np
    import torch

    from qwenjax.testing import paired_models

    hf, m = paired_models(args.config, args.dtype, args.layers)
    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, (args.batch, args.seq))

    n_params = sum(p.numel() for p in hf.parameters())
    tokens = args.batch * args.seq
    print(f"model: {args.config}{f' ({args.layers} layers)' if args.layers else ''}, {n_params / 1e6:.0f}M params, "
          f"{args.dtype}, batch {args.batch} x {args.seq} tokens")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), jax {__import__('jax').__version__}")

    def run_qwenjax():
        m(ids, logits_to_keep=1).block_until_ready()

    t_ids = torch.as_tensor(ids)

    def run_transformers():
        with torch.inference_mode():
            hf(input_ids=t_ids, logits_to_keep=1)

    # check they agree before timing anything
    with torch.inference_mode():
        ref = hf(input_ids=t_ids, logits_to_keep=1).logits.float().numpy()
    ours = np.asarray(m(ids, logits_to_keep=1), np.float32)
    print(f"last-position logits max abs diff: {np.abs(ours - ref).max():.2e} (scale {np.abs(ref).max():.2f})")

    results = {}
    for name, fn in (("qwenjax", run_qwenjax), ("transformers", run_transformers)):
        first, times = _timed(fn, args.repeats)
        med = statistics.median(times)
        results[name] = med
        print(f"{name:>13}: first call {first:7.2f} s, median {med:7.3f} s "
              f"(runs: {', '.join(f'{t:.3f}' for t in times)}) -> {tokens / med:10,.1f} tokens/s")
    print(f"qwenjax / transformers prefill throughput: {results['transformers'] / results['qwenjax']:.2f}x")


if __name__ == "__main__":
    main()
