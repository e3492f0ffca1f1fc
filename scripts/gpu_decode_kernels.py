"""The kernels a GPU decode step launches, from a compile for an H100 (or H200) on this machine, no GPU needed.

    bash scripts/gpu_env.sh && .venv-gpu/bin/python scripts/gpu_decode_kernels.py [--config qwen3.5-0.8b]

Compiles the greedy decode step as `qwenjax.generate` runs it (`qwenjax.aot.compile_decode_step`) for each batch
size and prints the launches per step by kind (`qwenjax.aot.kernel_launches`): at batch 1 a step moves the weights
once, so every launch's fixed cost counts against the HBM roofline.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # the CUDA plugin without CUDA's libraries


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="qwen3.5-0.8b")
    p.add_argument("--target", default="h100", help="a name of qwenjax.aot.GPU_TARGETS")
    p.add_argument("--batch", default="1,32")
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--gated-delta-rule", default="auto", help="the Kernels setting (auto: pallas_gpu on an H100)")
    args = p.parse_args()

    import jax

    from qwenjax import aot
    from qwenjax.config import load_config, resolve_config

    cfg = load_config(resolve_config(args.config))
    print(f"{args.config} decode step, {args.dtype}, cache of {args.max_len} slots, gated delta rule "
          f"{args.gated_delta_rule}, compiled for {args.target} (jax {jax.__version__}, no GPU)")
    print("| batch | launches per step | by kind |")
    print("|---|---|---|")
    for batch in (int(b) for b in args.batch.split(",")):
        compiled = aot.compile_decode_step(cfg, args.target, batch=batch, max_len=args.max_len, dtype=args.dtype,
                                           kernels={"gated_delta_rule": args.gated_delta_rule})
        kinds = aot.kernel_launches(compiled)
        detail = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
        print(f"| {batch} | {sum(kinds.values())} | {detail} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
