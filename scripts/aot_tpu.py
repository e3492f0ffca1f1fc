"""Compile the Pallas kernels for a TPU topology on this host (libtpu compile-only devices) and print XLA's
memory and cost figures against the XLA paths, alone and in a model:
- `--part gdr` (default): the gated delta rule vs the XLA chunked form; the model program is forward + backward;
- `--part moe`: the grouped matmul vs `ragged_dot` at the MoE models' expert shapes; the model program is the
  forward, over the grouped-matmul and expert-parallel choices;
- `--part vision`: a model forward with images (default the released 9B with its vision tower): the tower alone,
  the text forward without images, then tower + text model with every logit and with the last one only
  (prefill), on `--batch` rows of `--seq` tokens, each with `--images` square images of `--image-size` pixels.
  The image grid is static under jit (host ints), so each program is for that image batch shape alone.

    python scripts/aot_tpu.py                                   # v5e, kernels at the 9B and 397B GDN shapes
    python scripts/aot_tpu.py --topology v5p:2x2x1 --model qwen3.5-0.8b --layers 4 --batch 8 --seq 2048
    python scripts/aot_tpu.py --part moe --topology v5e:4x4 --model qwen3.5-35b-a3b --mesh fsdp=2,expert=8 \
        --batch 16 --seq 2048
    python scripts/aot_tpu.py --part vision --topology v5e:2x2 --batch 4 --seq 2048 --images 1 --image-size 448

Needs libtpu (`pip install "jax[tpu]==<your jax version>"`); no TPU. Memory is per device. "recompute" and
"save" are the kernel's two ways to give its backward the per-chunk states (`SAVE_STATES` in
pallas_kernels/gated_delta_rule/tpu.py). XLA cannot see inside a Mosaic kernel: its flops and bytes leave out the
kernel's own work, so they compare only the XLA parts of the programs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only devices: other libtpu users may run too
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = [("xla", "xla", False), ("kernel, recompute", "pallas_tpu", False), ("kernel, save", "pallas_tpu", True)]
MOE_VARIANTS = [("kernel, ragged all-to-all", "pallas_tpu", "ragged_all_to_all"),
                ("kernel, all-gather", "pallas_tpu", "allgather"),
                ("ragged_dot, ragged all-to-all", "ragged_dot", "ragged_all_to_all")]
MOE_SHAPES = [  # (label, experts, hidden, expert width, top-k): one layer's experts on one chip
    ("35B-A3B experts (256 x 2048 -> 2x512)", 256, 2048, 512, 8),
    ("397B-A17B experts, an 8th of them (64 x 4096 -> 2x1024)", 64, 4096, 1024, 10),  # all 512: 8.6 GB of weights
]


def _row(program, variant, report, seconds, cpu_seconds=None):
    mib = lambda b: f"{b / 2**20:,.0f}"
    cpu = "" if cpu_seconds is None else f" {cpu_seconds:.0f} |"
    print(f"| {program} | {variant} | {mib(report['temp_bytes'])} | {mib(report['argument_bytes'])} | "
          f"{mib(report['output_bytes'])} | {report['flops']:.3g} | {report['bytes_accessed']:.3g} | {seconds:.0f} |"
          f"{cpu}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("gdr", "moe", "vision"), default="gdr")
    p.add_argument("--topology", default="v5e:2x2")
    p.add_argument("--tokens", type=int, default=16384, help="B*T (gdr) or tokens routed (moe) of the kernels alone")
    p.add_argument("--seq", type=int, default=None,
                   help="T of the kernel-alone programs, and of the model's (default 4096; vision: 2048)")
    p.add_argument("--model", default=None, help="also a full model forward + backward: config file or name "
                   "(vision: the model compiled, default qwen3.5-9b)")
    p.add_argument("--layers", type=int, default=None, help="override the model's num_hidden_layers")
    p.add_argument("--batch", type=int, default=4, help="model batch (rows of --seq tokens)")
    p.add_argument("--mesh", default=None, help="model mesh over the topology's devices (default: all fsdp)")
    p.add_argument("--images", type=int, default=1, help="vision: images per row")
    p.add_argument("--image-size", type=int, default=448, help="vision: image side in pixels (a multiple of 32)")
    args = p.parse_args()
    if args.part == "vision":
        args.model = args.model or "qwen3.5-9b"
    args.seq = args.seq or (2048 if args.part == "vision" else 4096)

    import jax
    import jax.numpy as jnp

    from pallas_kernels.gated_delta_rule import tpu as gdr_tpu
    from qwenjax import Kernels, aot
    from qwenjax.config import load_config, resolve_config
    from qwenjax.ops.gated_delta_rule import IMPLEMENTATIONS

    devices = aot.topology_devices(args.topology)
    print(f"topology {args.topology} ({devices[0].device_kind}, {len(devices)} chips), jax {jax.__version__}; "
          "memory in MiB per device\n")
    kind = {"gdr": "gated delta rule", "moe": "grouped matmul, expert parallelism",
            "vision": "logits"}[args.part]
    cpu = " compile CPU s |" if args.part == "vision" else ""  # the CPU time: steadier on a shared host
    print(f"| program | {kind} | temp | arguments | outputs | flops | bytes accessed | compile s |{cpu}")
    print("|---|---|---|---|---|---|---|---|" + "---|" * bool(cpu))
    one = jax.sharding.SingleDeviceSharding(devices[0])
    cfg = None
    if args.model:
        cfg = load_config(resolve_config(args.model))
        if args.layers:
            cfg = cfg.replace(num_hidden_layers=args.layers, layer_types=cfg.layer_types[:args.layers])
    if args.part == "moe":
        _moe(args, cfg, one)
        return
    if args.part == "vision":
        _vision(args, cfg, devices)
        return
    bf16, f32 = jnp.bfloat16, jnp.float32
    b, t = args.tokens // args.seq, args.seq
    for label, hv in (("9B/35B GDN (16 q/k, 32 v heads)", 32), ("397B GDN (16 q/k, 64 v heads)", 64)):
        shapes = [((b, t, 16, 128), bf16), ((b, t, 16, 128), bf16), ((b, t, hv, 128), bf16), ((b, t, hv), f32),
                  ((b, t, hv), f32)]
        inputs = [jax.ShapeDtypeStruct(s, d, sharding=one) for s, d in shapes]
        for variant, name, save in VARIANTS:
            gdr_tpu.SAVE_STATES = save
            fn = IMPLEMENTATIONS[name][0]
            loss = lambda *a: sum(jnp.sum(x.astype(f32)) for x in fn(*a))
            programs = [("forward", fn), ("forward+backward", jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))]
            for program, f in programs:
                if program == "forward" and save:
                    continue  # the forward alone does not keep states
                t0 = time.perf_counter()
                compiled = jax.jit(f).lower(*inputs).compile()
                _row(f"{label}, B={b} T={t}, {program}", variant, aot.summary(compiled), time.perf_counter() - t0)

    if cfg is not None:
        for variant, name, save in VARIANTS:
            gdr_tpu.SAVE_STATES = save
            t0 = time.perf_counter()
            compiled = aot.compile_forward_backward(cfg, args.topology, mesh=args.mesh, batch=args.batch,
                                                    seq=args.seq,
                                                    kernels=Kernels(gated_delta_rule=name))
            _row(f"{args.model} ({cfg.num_hidden_layers} layers), batch {args.batch} x {args.seq}, mesh "
                 f"{args.mesh or 'fsdp'}, forward+backward", variant, aot.summary(compiled),
                 time.perf_counter() - t0)


def _moe(args, cfg, one) -> None:
    import jax
    import jax.numpy as jnp

    from qwenjax import Kernels, aot
    from qwenjax.ops.grouped_matmul import IMPLEMENTATIONS

    for label, experts, hidden, inter, top_k in MOE_SHAPES:
        rows = args.tokens * top_k
        inputs = [jax.ShapeDtypeStruct(s, d, sharding=one) for s, d in
                  (((rows, hidden), jnp.bfloat16), ((experts, 2 * inter, hidden), jnp.bfloat16),
                   ((experts,), jnp.int32))]
        for name in ("ragged_dot", "pallas_tpu"):
            fn = IMPLEMENTATIONS[name]
            grad = jax.value_and_grad(lambda x, w, gs: jnp.sum(fn(x, w, gs)), argnums=(0, 1))
            for program, f in (("forward", fn), ("forward+backward", grad)):
                t0 = time.perf_counter()
                compiled = jax.jit(f).lower(*inputs).compile()
                _row(f"gate+up of {label}, {rows} rows, {program}", "kernel" if name == "pallas_tpu" else name,
                     aot.summary(compiled), time.perf_counter() - t0)
    if cfg is not None:
        for variant, gmm, ep in MOE_VARIANTS:
            t0 = time.perf_counter()
            compiled = aot.compile_forward_backward(cfg, args.topology, mesh=args.mesh, batch=args.batch,
                                                    seq=args.seq, backward=False,
                                                    kernels=Kernels(grouped_matmul=gmm, expert_parallel=ep))
            _row(f"{args.model} ({cfg.num_hidden_layers} layers), batch {args.batch} x {args.seq}, mesh "
                 f"{args.mesh or 'fsdp'}, forward", variant, aot.summary(compiled), time.perf_counter() - t0)


def _vision(args, cfg, devices) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from qwenjax import _compat, aot
    from qwenjax.model.vision import VisionTower
    from qwenjax.ops.kernels import resolve_kernels
    from qwenjax.sharding import ShardingRules, activation_sharding, make_mesh, param_shardings

    ids, _, grid = aot.image_batch(cfg, batch=args.batch, seq=args.seq, image_size=args.image_size,
                                   images_per_row=args.images)
    patches = int(np.prod(grid, axis=1).sum())
    pads = int((ids == cfg.image_token_id).sum())
    images = f"{len(grid)} images of {args.image_size}x{args.image_size} ({patches} patches, {pads} pad tokens)"
    where = f"mesh {args.mesh or 'fsdp'}"

    # The tower alone: its bf16 weights sharded as in the model, the same pixels.
    mesh, rules = make_mesh(args.mesh, devices), ShardingRules()
    kernels = resolve_kernels(None, devices[0].platform)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: VisionTower(
        cfg.vision, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, kernels=kernels)))
    params = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), abstract,
                          param_shardings(abstract, mesh, rules), is_leaf=_compat.is_variable)
    pixels = jax.ShapeDtypeStruct((patches, cfg.vision.patch_dim), jnp.float32,
                                  sharding=rules.sharding(mesh, (None, None)))
    def timed(program, variant, compile_):
        t0, c0 = time.perf_counter(), time.process_time()
        compiled = compile_()
        _row(program, variant, aot.summary(compiled), time.perf_counter() - t0, time.process_time() - c0)

    def tower():
        with activation_sharding(mesh, rules):
            return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, grid)).lower(params, pixels).compile()

    timed(f"vision tower ({cfg.vision.depth} blocks), {images}, {where}", "features", tower)
    model = f"{args.model} ({cfg.num_hidden_layers} layers)"
    timed(f"{model}, text only, batch {args.batch} x {args.seq}, {where}, forward", "all",
          lambda: aot.compile_forward_backward(cfg, args.topology, mesh=args.mesh, batch=args.batch, seq=args.seq,
                                               backward=False))
    for label, keep in (("all", 0), ("last (prefill)", 1)):
        timed(f"{model} + vision tower, batch {args.batch} x {args.seq} with {images}, {where}, forward", label,
              lambda keep=keep: aot.compile_multimodal_forward(
                  cfg, args.topology, mesh=args.mesh, batch=args.batch, seq=args.seq, image_size=args.image_size,
                  images_per_row=args.images, logits_to_keep=keep))


if __name__ == "__main__":
    main()
