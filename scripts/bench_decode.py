"""Decode throughput: qwenjax vs transformers `generate`, and qwenjax against the memory-bandwidth bound.

    python scripts/bench_decode.py                        # 0.8B shape, batch 1, fp32 then bf16
    python scripts/bench_decode.py --dtypes bfloat16 --batch 4 --new-tokens 64

Both libraries run the same random weights (transformers writes them with `save_pretrained`; qwenjax loads that
directory) on the same prompt, greedily, with end-of-sequence disabled so every run makes --new-tokens tokens.
Prefill is excluded from both rates:
- qwenjax: the time from the first streamed token to the last, over new_tokens - 1 decode steps;
- transformers: (t(new_tokens) - t(1)) / (new_tokens - 1), each `generate` call timed whole.
Medians over --repeats rounds after a warm-up (which includes qwenjax's compilation); in each round the two
libraries run back to back, so both see the same drift of the machine's bandwidth.

Bandwidth bound: a decode step must read every weight once (the tied embedding once, as the LM head; an untied
embedding only for its looked-up rows), so tokens/s <= copy bandwidth / weight bytes per step x batch: the bound
the targets are set against. A step must also read and write each row's fp32 GDN state and read its KV cache;
at batch 1 that is a few percent of the weights, at batch 32 about as much again, so a second, tighter bound counts
weights + cache bytes (at the mean cache length over the run).
The copy bandwidth counts bytes read plus written (STREAM 'copy'): measured at the start of every round: a 1 GiB
numpy copy on the CPU, a 1 GiB jax device-to-device copy when JAX runs on a GPU (transformers then runs on CUDA too).
Needs the `test` extra (torch, transformers). With flash-linear-attention installed, transformers uses its
kernels for the gated delta rule on CUDA.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second moved (read + written) by a large copy on JAX's default device: STREAM 'copy'."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    if jax.default_backend() != "cpu":
        x = jnp.ones(nbytes // 4, jnp.float32)
        copy = jax.jit(lambda x: x + 1)  # one read, one write; no copy elision
        copy(x).block_until_ready()
        times = []
        for _ in range(repeats * 4):
            t0 = time.perf_counter()
            copy(x).block_until_ready()
            times.append(time.perf_counter() - t0)
        return 2 * x.nbytes / statistics.median(times)
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


def cache_bytes_per_step(cfg, batch: int, length: float, dtype) -> float:
    """Cache bytes a decode step must move at a mean cache length: each GDN layer's fp32 state read and written
    and its conv window read; each attention layer's K and V read up to `length`."""
    import numpy as np

    from qwenjax.config import LINEAR_ATTENTION

    item = np.dtype(dtype).itemsize
    per_row = 0.0
    for t in cfg.layer_types:
        if t == LINEAR_ATTENTION:
            per_row += 2 * 4 * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim
            per_row += item * (cfg.linear_conv_kernel_dim - 1) * cfg.linear_conv_dim
        else:
            per_row += 2 * item * length * cfg.num_key_value_heads * cfg.head_dim
    return per_row * batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="qwen3.5-0.8b", help="config file or configs/ name")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (multiple of 4)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import jax
    import numpy as np
    import torch

    from qwenjax.inference.generate import stream
    from qwenjax.testing import paired_models

    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("JAX runs on a GPU but torch sees no CUDA device: the comparison would not be like for like")
    device = "cuda" if on_gpu else "cpu"
    print(f"model: {args.config}{f' ({args.layers} layers)' if args.layers else ''}, batch {args.batch}, "
          f"prompt {args.prompt} tokens, {args.new_tokens} new tokens, greedy")
    if on_gpu:
        try:
            import fla
            fla_version = f"flash-linear-attention {fla.__version__}"
        except ImportError:
            fla_version = "no flash-linear-attention (transformers uses its torch fallback)"
        where = f"{jax.devices()[0].device_kind}, {torch.cuda.get_device_name()}, {fla_version}"
    else:
        where = f"{platform.machine()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}"
    print(f"machine: {where}; torch {torch.__version__}, jax {jax.__version__}")
    n = args.new_tokens

    for dtype in args.dtypes.split(","):
        hf, m = paired_models(args.config, dtype, args.layers)
        ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, (args.batch, args.prompt))
        hf = hf.to(device)

        def run_qwenjax():
            stamps, rows = [], []
            for out in stream(m, ids, max_new_tokens=n, eos_token_ids=[]):
                stamps.append(time.perf_counter())
                rows.append(out)
            return (stamps[-1] - stamps[0]) / (n - 1), np.array(rows).T

        t_ids = torch.as_tensor(ids, device=device)

        def hf_generate(k):
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = hf.generate(t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=k, min_new_tokens=k,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
                out = out[:, args.prompt:].cpu().numpy()  # waits for the device
            return time.perf_counter() - t0, out

        _, ours_tokens = run_qwenjax()  # warm-up: compiles prefill and the decode step
        _, ref_tokens = hf_generate(n)  # warm-up (and on CUDA: kernel autotuning)
        # The libraries take turns, so that both sample the same stretches of the machine's bandwidth (on a
        # shared CPU host it swings by a third within seconds).
        ours_runs, full_runs, one_runs, bw_runs = [], [], [], []
        for _ in range(args.repeats):
            bw_runs.append(copy_bandwidth(repeats=3))
            ours_runs.append(run_qwenjax()[0])
            full_runs.append(hf_generate(n)[0])
            one_runs.append(hf_generate(1)[0])
        ours = statistics.median(ours_runs)
        ref = (statistics.median(full_runs) - statistics.median(one_runs)) / (n - 1)
        bw = statistics.median(bw_runs)
        agree = (ours_tokens == ref_tokens).all(axis=1).sum()
        wbytes = weight_bytes_per_step(m)
        cbytes = cache_bytes_per_step(m.config, args.batch, args.prompt + n / 2, dtype)
        bound = bw / wbytes * args.batch
        tight = bw / (wbytes + cbytes) * args.batch
        print(f"\n[{dtype}] per step: weights {wbytes / 1e9:.3f} GB -> bound {bound:.1f} tokens/s; weights + cache "
              f"{(wbytes + cbytes) / 1e9:.3f} GB -> bound {tight:.1f} tokens/s; "
              f"greedy tokens identical in {agree}/{args.batch} rows; copy bandwidth in the rounds "
              f"{min(bw_runs) / 1e9:.1f}-{max(bw_runs) / 1e9:.1f} GB/s, median {bw / 1e9:.1f}")
        print(f"  {'qwenjax':>13}: {ours * 1e3:8.2f} ms/step  {args.batch / ours:9.1f} tokens/s  "
              f"({args.batch / ours / bound:.0%} of the weight bound, "
              f"{args.batch / ours / tight:.0%} of weights + cache)")
        print(f"  {'transformers':>13}: {ref * 1e3:8.2f} ms/step  {args.batch / ref:9.1f} tokens/s  "
              f"({args.batch / ref / bound:.0%} of the weight bound, "
              f"{args.batch / ref / tight:.0%} of weights + cache)")
        print(f"  qwenjax / transformers decode throughput: {ref / ours:.2f}x")
        hf = m = None  # free both models before the next dtype
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
