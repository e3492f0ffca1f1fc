"""Decode throughput: qwenjax vs transformers `generate`, and qwenjax against the memory-bandwidth bound.

    python scripts/bench_decode.py                        # 0.8B shape, batch 1, fp32 then bf16
    python scripts/bench_decode.py --dtypes bfloat16 --batch 4 --new-tokens 64

Both libraries run the same random weights (transformers writes them with `save_pretrained`; qwenjax loads that
directory) on the same prompt, greedily, with end-of-sequence disabled so every run makes --new-tokens tokens.
Prefill is excluded from both rates:
- qwenjax: the time from the first streamed token to the last, over new_tokens - 1 decode steps;
- transformers: (t(new_tokens) - t(1)) / (new_tokens - 1), each `generate` call timed whole.
Medians over --repeats runs after a warm-up (which includes qwenjax's compilation).

Bandwidth bound: a decode step at small batch must read every weight once (the tied embedding once, as the LM
head; an untied embedding only for its looked-up rows), so tokens/s <= copy bandwidth / weight bytes per step
x batch. The copy bandwidth is measured here with a 1 GiB numpy copy, counting bytes read plus written (STREAM).
Needs the `test` extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second moved (read + written) by a large numpy copy: the STREAM 'copy' figure."""
    import numpy as np

    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    return 2 * a.nbytes / statistics.median(times)


def weight_bytes_per_step(m) -> int:
    import jax

    total = sum(x.nbytes for x in jax.tree.leaves(m.params))
    if not m.config.tie_word_embeddings:
        total -= m.params["embed_tokens"]["weight"][...].nbytes
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="qwen3.5-0.8b", help="config file or configs/ name")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (multiple of 4)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import numpy as np
    import torch

    import qwenjax
    from qwenjax.inference.generate import stream
    from qwenjax.testing import hf_text_model

    bw = copy_bandwidth()
    print(f"model: {args.config}{f' ({args.layers} layers)' if args.layers else ''}, batch {args.batch}, "
          f"prompt {args.prompt} tokens, {args.new_tokens} new tokens, greedy")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), jax {__import__('jax').__version__}; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write)")
    n = args.new_tokens

    for dtype in args.dtypes.split(","):
        hf = hf_text_model(args.config, dtype, args.layers)
        ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, (args.batch, args.prompt))
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            m = qwenjax.from_pretrained(tmp, dtype=dtype)

        def run_qwenjax():
            stamps, rows = [], []
            for out in stream(m, ids, max_new_tokens=n, eos_token_ids=[]):
                stamps.append(time.perf_counter())
                rows.append(out)
            return (stamps[-1] - stamps[0]) / (n - 1), np.array(rows).T

        t_ids = torch.as_tensor(ids)

        def hf_generate(k):
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = hf.generate(t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=k, min_new_tokens=k,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
            return time.perf_counter() - t0, out[:, args.prompt:].numpy()

        _, ours_tokens = run_qwenjax()  # warm-up: compiles prefill and the decode step
        ours = statistics.median(run_qwenjax()[0] for _ in range(args.repeats))
        _, ref_tokens = hf_generate(n)
        t_full = statistics.median(hf_generate(n)[0] for _ in range(args.repeats))
        t_one = statistics.median(hf_generate(1)[0] for _ in range(args.repeats))
        ref = (t_full - t_one) / (n - 1)
        agree = (ours_tokens == ref_tokens).all(axis=1).sum()
        wbytes = weight_bytes_per_step(m)
        bound = bw / wbytes * args.batch
        print(f"\n[{dtype}] weights read per step {wbytes / 1e9:.2f} GB -> bandwidth bound {bound:.2f} tokens/s; "
              f"greedy tokens identical in {agree}/{args.batch} rows")
        print(f"  {'qwenjax':>13}: {ours * 1e3:8.1f} ms/step  {args.batch / ours:8.2f} tokens/s  "
              f"({args.batch / ours / bound:.0%} of the bandwidth bound)")
        print(f"  {'transformers':>13}: {ref * 1e3:8.1f} ms/step  {args.batch / ref:8.2f} tokens/s")
        print(f"  qwenjax / transformers decode throughput: {ref / ours:.2f}x")
        hf = m = None  # free both models before the next dtype
        gc.collect()


if __name__ == "__main__":
    main()
