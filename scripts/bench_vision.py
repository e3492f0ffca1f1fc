"""Vision tower throughput: qwenjax vs transformers, side by side, same random weights, same dtype, one run.

    python scripts/bench_vision.py                          # the released tower (27 blocks, width 1152), fp32
    python scripts/bench_vision.py --depth 4 --sizes 448    # quicker

transformers' `Qwen3_5VisionModel` is built at the released shape with random weights and copied into qwenjax's
`VisionTower`; each image (a square of the given side in pixels, i.e. (side / 16)² patches) goes through both.
Reports the median of --repeats timed runs after one warm-up (qwenjax's includes compilation), as patches/s, and
first each library's rate on one matrix product of the tower's MLP shape (784 x 1152 x 4304, fp32): the ceiling
that the tower's matrix products (nearly all its work) run against on this machine.
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


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cpu() -> str:
    """The CPU model and its vector extensions (our machines differ from session to session)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extensions = ", ".join(f for f in ("avx2", "fma", "avx512f") if f in flags) or "no avx2"
    return f"{model or platform.machine()} ({extensions})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=27)
    p.add_argument("--sizes", type=int, nargs="+", default=[448, 1024], help="square image sides in pixels")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import jax
    import numpy as np
    import torch
    from flax import nnx
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5VisionConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    from qwenjax.testing import randomize_vision_, vision_tower_from_hf

    torch.manual_seed(0)
    hf = Qwen3_5VisionModel(Qwen3_5VisionConfig(depth=args.depth, out_hidden_size=1024)).eval()
    randomize_vision_(hf)
    tower = vision_tower_from_hf(hf, param_dtype=args.dtype)
    hf = hf.to(getattr(torch, args.dtype))
    graphdef, state = nnx.split(tower)
    cfg = tower.config
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"vision tower: {args.depth} blocks, width {cfg.hidden_size}, {n_params / 1e6:.0f}M params, {args.dtype}")
    print(f"machine: {_cpu()}, {os.cpu_count()} cpus, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), jax {jax.__version__}")
    a = np.random.default_rng(1).standard_normal((784, 1152)).astype(np.float32)
    b = np.random.default_rng(2).standard_normal((1152, 4304)).astype(np.float32)
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    ja, jb, product = jax.numpy.asarray(a), jax.numpy.asarray(b), jax.jit(lambda x, y: x @ y)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    xla_rate = flops / _median_s(lambda: product(ja, jb).block_until_ready(), 5) / 1e9
    torch_rate = flops / _median_s(lambda: ta @ tb, 5) / 1e9
    print(f"fp32 matrix product 784x1152x4304: XLA {xla_rate:.0f} GFLOP/s, torch {torch_rate:.0f} GFLOP/s")
    print(f"{'image':>10} {'patches':>8} {'qwenjax patches/s':>18} {'transformers patches/s':>23} {'ratio':>6}")
    for side in args.sizes:
        cells = side // cfg.patch_size
        grid = np.array([[1, cells, cells]])
        n = cells * cells
        pixels = np.random.default_rng(0).standard_normal((n, cfg.patch_dim)).astype(np.float32)
        run = jax.jit(lambda state, x, grid=grid: nnx.merge(graphdef, state)(x, grid))
        x = jax.numpy.asarray(pixels, args.dtype)
        ours = _median_s(lambda: run(state, x).block_until_ready(), args.repeats)
        tx, tgrid = torch.from_numpy(pixels).to(getattr(torch, args.dtype)), torch.from_numpy(grid)

        def reference():
            with torch.no_grad():
                hf(tx, grid_thw=tgrid)

        theirs = _median_s(reference, args.repeats)
        print(f"{side:>5}x{side:<4} {n:>8} {n / ours:>18,.0f} {n / theirs:>23,.0f} {theirs / ours:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
