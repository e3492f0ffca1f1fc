"""Matrix-vector products on the CPU: qwenjax's kernel (pallas_kernels/matmul/cpu_matvec.cc) vs XLA's dot.

    python scripts/bench_cpu_matvec.py                     # bf16 weights
    python scripts/bench_cpu_matvec.py --dtype float32 --rows 1

For each weight shape of the Qwen3.5-0.8B decode step, one jitted call runs 24 products with 24 different weight
matrices (as the layers do, so the weights come from memory, not cache), and reports GB/s of weights read.
Medians of 7 timed calls after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.matmul import cpu  # noqa: E402
from pallas_kernels.matmul.xla import matmul_xla  # noqa: E402

SHAPES = [(6144, 1024), (2048, 1024), (3584, 1024), (1024, 3584), (1024, 2048), (4096, 1024), (512, 1024)]


def median_time(fn, *args, repeats: int = 7) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--rows", default="1,2,4", help="comma-separated numbers of x rows")
    args = parser.parse_args()
    dtype, row_counts = jnp.dtype(args.dtype), [int(r) for r in args.rows.split(",")]
    if not cpu.available():
        raise SystemExit("the kernel is not available here (see the warning above)")
    print(f"jax {jax.__version__}, {os.cpu_count()} cpus; GB/s of {dtype} weights read, 24 matrices per call")
    print(f"{'weights':>14} {'rows':>4} {'kernel':>8} {'XLA':>8}")
    for out_f, in_f in SHAPES + [(248320, 1024)]:
        count = 1 if out_f > 100_000 else 24
        ws = [jax.random.normal(jax.random.key(i), (out_f, in_f), dtype) for i in range(count)]
        nbytes = sum(w.nbytes for w in ws)
        for rows in row_counts:
            x = jax.random.normal(jax.random.key(99), (rows, in_f), dtype)
            kernel = jax.jit(lambda x, ws: [cpu.matvec(x, w) for w in ws])
            xla = jax.jit(lambda x, ws: [matmul_xla(x, w) for w in ws])
            t_kernel, t_xla = median_time(kernel, x, ws), median_time(xla, x, ws)
            print(f"{f'{out_f}x{in_f}':>14} {rows:>4} {nbytes / t_kernel / 1e9:8.1f} {nbytes / t_xla / 1e9:8.1f}",
                  flush=True)
        del ws


if __name__ == "__main__":
    main()
