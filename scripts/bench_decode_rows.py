"""The cost of batch invariance in `qwenjax.generate`'s decode step, by number of rows, on the CPU.

    python scripts/bench_decode_rows.py                              # the bundled model, bf16, 1 / 4 / 16 rows
    python scripts/bench_decode_rows.py --model DIR --rows 1,8 --rounds 5

Two arms of one loaded model: `Kernels(cpu_matvec="kernel")` (the default on the CPU: the C++ kernel takes every
product, batch-invariant, and the programs compile without XLA:CPU's library fusions) and
`Kernels(cpu_matvec="xla")` (XLA's dots, library fusions on). A decode step is timed as
(t(long) - t(short)) / (long - short) of whole greedy `generate` calls on the same random prompts (64 tokens a
row, eos off), so prefill cancels out; each arm's figure is a median of --repeats calls, and the arms alternate
within each of --rounds rounds so both see the same drift of the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import qwenjax  # noqa: E402
from qwenjax.demo import DEFAULT_MODEL_DIR  # noqa: E402


def step_ms(m, prompts: list[list[int]], short: int, long: int, repeats: int) -> float:
    def timed(n: int) -> float:
        t = time.perf_counter()
        qwenjax.generate(m, prompts, max_new_tokens=n, eos_token_ids=())
        return time.perf_counter() - t

    for n in (short, long):  # compiles
        timed(n)
    a = statistics.median(timed(short) for _ in range(repeats))
    b = statistics.median(timed(long) for _ in range(repeats))
    return 1e3 * (b - a) / (long - short)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL_DIR)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--short", type=int, default=8, help="new tokens of the short call")
    p.add_argument("--long", type=int, default=136, help="new tokens of the long call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    base = qwenjax.from_pretrained(args.model, dtype=args.dtype)
    arms = {name: base.replace(kernels={"cpu_matvec": name}) for name in ("kernel", "xla")}
    rng = np.random.default_rng(0)
    rows = [int(r) for r in args.rows.split(",")]
    prompts = {r: [rng.integers(5, base.config.vocab_size, 64).tolist() for _ in range(r)] for r in rows}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; model {args.model} "
          f"({args.dtype}); decode step ms from generate({args.long}) - generate({args.short}) new tokens")
    runs: dict[tuple[str, int], list[float]] = {}
    for i in range(args.rounds):
        for r in rows:
            for name, m in (arms.items() if i % 2 == 0 else reversed(arms.items())):
                runs.setdefault((name, r), []).append(step_ms(m, prompts[r], args.short, args.long, args.repeats))
        print(f"round {i + 1}: " + ", ".join(f"{n} {r} rows {runs[n, r][-1]:.2f}" for r in rows for n in arms),
              flush=True)
    print("| rows | kernel (batch-invariant) ms | xla ms | kernel / xla |\n|---|---|---|---|")
    for r in rows:
        k, x = statistics.median(runs["kernel", r]), statistics.median(runs["xla", r])
        print(f"| {r} | {k:.2f} [{', '.join(f'{v:.2f}' for v in runs['kernel', r])}] | {x:.2f} "
              f"[{', '.join(f'{v:.2f}' for v in runs['xla', r])}] | {k / x:.2f}x |")


if __name__ == "__main__":
    main()
