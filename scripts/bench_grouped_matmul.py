"""Grouped matmul on this machine's default backend at the 35B-A3B expert shape (256 experts, 2048 -> 2x512):
`ragged_dot` against the row-gather form the XLA implementation takes when rows are fewer than experts (a decode
step), at decode sizes (batch x top-8 rows). Medians of `--repeats` calls, milliseconds.

    python scripts/bench_grouped_matmul.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from pallas_kernels.grouped_matmul.xla import RAGGED_DOT_DIMS, grouped_matmul_xla

    experts, out, hidden, top_k = 256, 1024, 2048, 8
    ragged = jax.jit(lambda x, w, gs: jax.lax.ragged_dot_general(
        x, w, gs, RAGGED_DOT_DIMS, preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None))
    ours = jax.jit(grouped_matmul_xla)
    print(f"backend {jax.default_backend()}, jax {jax.__version__}; experts {experts}, [{out}, {hidden}] each")
    print("| dtype | batch | rows | ragged_dot ms | row gather ms | ratio |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for dtype in (jnp.bfloat16, jnp.float32):
        w = jax.random.normal(jax.random.key(0), (experts, out, hidden), dtype)
        for batch in args.batch:
            rows = batch * top_k
            chosen = np.concatenate([rng.choice(experts, top_k, replace=False) for _ in range(batch)])
            gs = jnp.asarray(np.bincount(chosen, minlength=experts), jnp.int32)
            x = jax.random.normal(jax.random.key(1), (rows, hidden), dtype)
            times = {}
            for name, f in (("ragged_dot", ragged), ("gather", ours)):
                f(x, w, gs).block_until_ready()
                ts = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    f(x, w, gs).block_until_ready()
                    ts.append(time.perf_counter() - t0)
                times[name] = np.median(ts) * 1e3
            print(f"| {jnp.dtype(dtype).name} | {batch} | {rows} | {times['ragged_dot']:.1f} | {times['gather']:.1f} | "
                  f"{times['ragged_dot'] / times['gather']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
