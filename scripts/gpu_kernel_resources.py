"""Registers, spills and shared memory of every Mosaic GPU kernel, compiled for an H100 on this machine, no GPU needed.

    bash scripts/gpu_env.sh && .venv-gpu/bin/python scripts/gpu_kernel_resources.py [--target h100]

Each case compiles a kernel's forward (and backward, where it has one) at a real model shape for the target's
devices (`qwenjax.aot.topology_devices`) with Mosaic GPU's dumps on, and reads ptxas's report and the kernel's
dynamic shared memory back (`mosaic_gpu_resources`). The dumps are switched on through the environment, the only
way Mosaic GPU takes them, which is why this lives in a script and not in the library.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # the CUDA plugin without CUDA's libraries


def mosaic_gpu_resources(fn, *args) -> dict[str, dict[str, int]]:
    """What each Mosaic GPU kernel of `fn(*args)` takes, compiled for the GPU the args' shardings name (shapes on a
    GPU target's devices, as `qwenjax.aot.topology_devices` gives them): {kernel: {registers, spill_stores,
    spill_loads (bytes per thread, from ptxas), smem (bytes of dynamic shared memory per block)}}. Turns on Mosaic
    GPU's dumps (`MOSAIC_GPU_DUMP_TO`, `MOSAIC_GPU_DUMP_PTXAS`) for this compile alone, and clears JAX's caches
    first (a kernel lowered before would not be lowered, nor dumped, again)."""
    import pathlib
    import tempfile

    import jax

    with tempfile.TemporaryDirectory() as dump:
        saved = {k: os.environ.get(k) for k in ("MOSAIC_GPU_DUMP_TO", "MOSAIC_GPU_DUMP_PTXAS")}
        os.environ.update(MOSAIC_GPU_DUMP_TO=dump, MOSAIC_GPU_DUMP_PTXAS="1")
        try:
            jax.clear_caches()
            jax.jit(fn).lower(*args).compile()
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        found = {}
        for ptxas in sorted(pathlib.Path(dump).glob("*.ptxas")):
            text = ptxas.read_text()
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
            mlir = ptxas.with_suffix(".after_layout_inference.txt")
            smem = re.search(r"dynamic_shared_memory_size %c(\d+)", mlir.read_text()) if mlir.exists() else None
            found[ptxas.stem] = {"registers": int(re.search(r"Used (\d+) registers", text).group(1)),
                                 "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2)),
                                 "smem": int(smem.group(1)) if smem else -1}
    return found


# name: (the model config whose shape it takes, how many Mosaic GPU kernels it compiles)
CASES = {
    # our forward and input-gradient kernel (`grouped_matmul_kernel`, twice), JAX's transposed_ragged_dot (`body`)
    "grouped matmul, forward + both gradients": ("qwen3.5-35b-a3b", 3),
    # the forward state pass, its states-only variant (the backward recomputes the states), the gradient pass
    "gated delta rule, chunked forward + backward": ("qwen3.5-9b", 3),
    "gated delta rule, chunked forward + backward (64 value heads)": ("qwen3.5-397b-a17b", 3),
    "gated delta rule, decode step (batch 32)": ("qwen3.5-9b", 1),
}


def compile_case(name: str, target: str = "h100", tokens: int = 16384):
    """(fn, args) of a case, the args on `target`'s devices: grouped matmul at the config's expert shape with
    4096 tokens routed top-8; the chunked gated delta rule over `tokens` tokens (B = 1); the decode step."""
    import jax
    import jax.numpy as jnp

    from qwenjax import aot
    from qwenjax.config import load_config, resolve_config

    cfg = load_config(resolve_config(CASES[name][0]))
    sharding = jax.sharding.SingleDeviceSharding(aot.topology_devices(target)[0])
    on = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    if name.startswith("grouped matmul"):
        from pallas_kernels.grouped_matmul.gpu import grouped_matmul_gpu

        experts, inter = cfg.num_experts, cfg.moe_intermediate_size
        fn = jax.value_and_grad(lambda x, w, gs: jnp.sum(grouped_matmul_gpu(x, w, gs)), argnums=(0, 1))
        return fn, (on((4096 * 8, cfg.hidden_size)), on((experts, 2 * inter, cfg.hidden_size)),
                    on((experts,), jnp.int32))
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    if "decode step" in name:
        from pallas_kernels.gated_delta_rule.gpu import gated_delta_rule_step_gpu

        b = 32
        fn = lambda q, k, v, g, beta, s: gated_delta_rule_step_gpu(q, k, v, g, beta, initial_state=s)
        return fn, (on((b, 1, hk, dk)), on((b, 1, hk, dk)), on((b, 1, hv, dv)), on((b, 1, hv), jnp.float32),
                     on((b, 1, hv), jnp.float32), on((b, hv, dk, dv), jnp.float32))
    from pallas_kernels.gated_delta_rule.gpu import gated_delta_rule_chunked_gpu

    def loss(q, k, v, g, beta):
        o, final = gated_delta_rule_chunked_gpu(q, k, v, g, beta)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    fn = jax.value_and_grad(loss, argnums=range(5))
    return fn, (on((1, tokens, hk, dk)), on((1, tokens, hk, dk)), on((1, tokens, hv, dv)),
                on((1, tokens, hv), jnp.float32), on((1, tokens, hv), jnp.float32))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="h100", help="a name of qwenjax.aot.GPU_TARGETS")
    args = p.parse_args()
    import jax

    print(f"Mosaic GPU kernels compiled for {args.target} (jax {jax.__version__}, no GPU)")
    print("| kernel | shape of | registers | spill stores / loads (bytes) | shared memory (bytes) |")
    print("|---|---|---|---|---|")
    for name, (config, _) in CASES.items():
        fn, fn_args = compile_case(name, args.target)
        for kernel, used in mosaic_gpu_resources(fn, *fn_args).items():
            kernel = re.sub(r"_[0-9]+$", "", kernel)  # the compile's counter
            print(f"| {name}: `{kernel}` | {config} | {used['registers']} | "
                  f"{used['spill_stores']} / {used['spill_loads']} | {used['smem']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
