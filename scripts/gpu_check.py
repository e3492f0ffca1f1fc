"""The Mosaic GPU kernels on a GPU: correct at real shapes, then timed against XLA, flash-linear-attention and the
bounds; the 0.8B train step's MFU. `scripts/gpu_check.sh` runs this, then the decode benchmark, on a lent GPU.

    python scripts/gpu_check.py --out DIR               # on a GPU (H100 / H200)
    .venv-gpu/bin/python scripts/gpu_check.py --smoke   # here: tiny shapes, kernels in the interpreter, no timing
                                                        # worth reading (what CI runs, so the GPU run finds no bug)

Sections, each independent (one failing is reported and the rest go on):
- gdn: the chunked gated delta rule, bf16, B·T = 16k tokens (B = 1), on the 9B (16 q/k, 32 value heads) and
  397B (16, 64) shapes: forward and forward + backward, "pallas_gpu" vs "xla" (relative errors of o, the final
  state and every gradient first) and vs flash-linear-attention's Triton `chunk_gated_delta_rule` (q/k repeated
  to the value heads, as transformers calls it) where `fla` imports;
- step: the decode step at batch 32 (0.8B shape) vs the state-read bound (the fp32 state read and written once at
  the copy bandwidth measured here);
- gmm: grouped matmul at the 35B-A3B expert shape (4096 tokens routed top-8 over 256 experts, 2048 -> 1024),
  forward TFLOP/s for "pallas_gpu" and "ragged_dot" against a dense matmul of the same flops;
- train: the 0.8B train step (bf16, 2 x 2048 tokens) and its MFU, 6 · parameters · tokens flops over the GPU's
  dense bf16 peak.
Times are medians of --repeats calls after a warm-up (compilation), each call waited for (`block_until_ready`;
torch: CUDA events). A kernel more than TOLERANCE off the XLA path (the step's fp32 state: STATE_TOLERANCE)
fails its section (exit status 1), and so does a program without its Mosaic GPU kernels (the "pallas_gpu"
functions lowered for CUDA before anything is timed: a case they send to XLA would time XLA under the kernels'
name). The smoke shapes cross the kernels' blocks as the real ones do: GDN heads of 128 (two 64-column blocks),
three chunks; grouped matmul over several row, column and K blocks. Writes DIR/gpu_check.json and
DIR/gpu_check.md, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense, SXM; the H200 has the H100's tensor cores
TOLERANCE = 2e-2  # max |error| / max |XLA's|: bf16 operands where XLA computes in fp32 (the battery's bound)
# the decode step's fp32 state: fp32 arithmetic on both sides, summation order only (a state rounded to bf16 on
# the way is ~4e-3 off)
STATE_TOLERANCE = {("step", "state"): 1e-5}


def _median_ms(fn, *args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _relative_error(got, want) -> float:
    import numpy as np

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _mosaic_calls(fn, *args) -> int:
    """How many Mosaic GPU kernels `fn(*args)` calls, lowered for CUDA (on any host: no GPU needed)."""
    import jax

    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text().count("custom_call @mosaic_gpu")


def _require_kernels(what: str, calls: int, at_least: int = 1) -> None:
    if calls < at_least:
        raise AssertionError(f"{what}: {calls} Mosaic GPU kernel calls in the program, fewer than {at_least}")


def _copy_bandwidth(repeats: int) -> float:
    """Bytes read + written per second by a 1 GiB device copy (16 MiB in smoke runs)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((2 ** 28 if jax.default_backend() == "gpu" else 2 ** 22,), jnp.float32)
    ms = _median_ms(jax.jit(lambda a: a + 1.0), x, repeats=repeats)
    return 2 * x.nbytes / (ms * 1e-3)


def gdn(args, rows):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwenjax.ops.gated_delta_rule import IMPLEMENTATIONS

    shapes = {"9B": (16, 32, 128), "397B": (16, 64, 128)} if not args.smoke else {"tiny": (2, 4, 128)}
    tokens = 16384 if not args.smoke else 130  # smoke: three chunks
    for name, (hk, hv, d) in shapes.items():
        rng = np.random.default_rng(0)
        normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)
        q, k, v = normal(1, tokens, hk, d), normal(1, tokens, hk, d), normal(1, tokens, hv, d)
        g = jnp.asarray(-np.logaddexp(0.0, -(2.0 + 1.5 * rng.standard_normal((1, tokens, hv)))), jnp.float32)
        beta = jnp.asarray(1.0 / (1.0 + np.exp(-rng.standard_normal((1, tokens, hv)))), jnp.float32)
        inputs = (q, k, v, g, beta)
        ct = jnp.asarray(rng.standard_normal(v.shape, np.float32), jnp.bfloat16)

        def programs(impl, jit=True):
            fn = IMPLEMENTATIONS[impl][0]
            forward = lambda *a: fn(*a)

            def loss(*a):
                o, final = fn(*a)
                return jnp.sum(o.astype(jnp.float32) * ct) + jnp.sum(final)

            backward = jax.value_and_grad(loss, argnums=range(5))
            return (jax.jit(forward), jax.jit(backward)) if jit else (forward, backward)

        forward, backward = programs(args.compiled, jit=False)
        calls = _mosaic_calls(forward, *inputs)
        _require_kernels(f"gdn {name} forward", calls)
        _require_kernels(f"gdn {name} forward + backward", _mosaic_calls(backward, *inputs), calls + 2)
        results = {}
        for impl in (args.kernels, "xla"):
            forward, backward = programs(impl)
            results[impl] = (forward(*inputs), backward(*inputs)[1])
            fwd_ms = _median_ms(forward, *inputs, repeats=args.repeats)
            bwd_ms = _median_ms(backward, *inputs, repeats=args.repeats)
            rows.append({"section": "gdn", "shape": name, "impl": impl, "forward_ms": fwd_ms,
                         "forward_backward_ms": bwd_ms})
        (o, final), grads = results[args.kernels]
        (o_x, final_x), grads_x = results["xla"]
        errors = {"o": _relative_error(o, o_x), "final": _relative_error(final, final_x)}
        errors.update({f"d{n}": _relative_error(a, b) for n, a, b in zip("q k v g beta".split(), grads, grads_x)})
        rows.append({"section": "gdn", "shape": name, "impl": f"{args.kernels} vs xla", "errors": errors})
        if not args.smoke:
            rows.append(_fla(inputs, ct, hv // hk, name, args.repeats))


def _fla(inputs, ct, ratio, name, repeats):
    """flash-linear-attention's chunked kernels on the same inputs through torch (CUDA events)."""
    try:
        import torch
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as e:
        return {"section": "gdn", "shape": name, "impl": "fla", "skipped": f"fla not importable: {e}"}
    import numpy as np

    to_torch = lambda x: torch.from_numpy(np.asarray(x, np.float32)).cuda()
    q, k, v, g, beta = (to_torch(x) for x in inputs)
    q, k = q.repeat_interleave(ratio, dim=2), k.repeat_interleave(ratio, dim=2)
    q, k, v = (x.bfloat16().requires_grad_() for x in (q, k, v))
    g, beta = g.requires_grad_(), beta.bfloat16().requires_grad_()
    ct_t = to_torch(ct).bfloat16()

    def forward():
        return chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)

    def forward_backward():
        o, final = forward()
        ((o.float() * ct_t.float()).sum() + final.sum()).backward()

    def median_ms(fn):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    with torch.no_grad():
        fwd_ms = median_ms(forward)
    import fla

    return {"section": "gdn", "shape": name, "impl": f"fla {fla.__version__}", "forward_ms": fwd_ms,
            "forward_backward_ms": median_ms(forward_backward)}


def step(args, rows):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwenjax.ops.gated_delta_rule import IMPLEMENTATIONS

    b, hk, hv, d = (32, 16, 16, 128) if not args.smoke else (2, 2, 4, 128)
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((b, 1, hk, d), np.float32), jnp.bfloat16) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, 1, hv, d), np.float32), jnp.bfloat16)
    g = jnp.full((b, 1, hv), -0.1, jnp.float32)
    beta = jnp.full((b, 1, hv), 0.5, jnp.float32)
    state = jnp.asarray(rng.standard_normal((b, hv, d, d), np.float32))
    bound_ms = 2 * state.nbytes / _copy_bandwidth(args.repeats) * 1e3
    want = IMPLEMENTATIONS["xla"][1](q, k, v, g, beta, initial_state=state)
    step_kernel = IMPLEMENTATIONS[args.compiled][1]
    _require_kernels("step", _mosaic_calls(lambda s: step_kernel(q, k, v, g, beta, initial_state=s), state))
    for impl in (args.kernels, "xla"):
        fn = IMPLEMENTATIONS[impl][1]
        once = jax.jit(lambda s, fn=fn: fn(q, k, v, g, beta, initial_state=s))
        got = once(state)
        errors = {"o": _relative_error(got[0], want[0]), "state": _relative_error(got[1], want[1])}
        # the state fed back, donated: in place where the implementation can be
        chained = jax.jit(lambda s, fn=fn: fn(q, k, v, g, beta, initial_state=s)[1], donate_argnums=0)
        s = chained(jnp.copy(state))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            s = jax.block_until_ready(chained(s))
            times.append(time.perf_counter() - start)
        ms = 1e3 * statistics.median(times)
        rows.append({"section": "step", "shape": f"batch {b}, {hv} heads, {d}x{d}", "impl": impl, "ms": ms,
                     "state_read_bound_ms": bound_ms, "of_bound": bound_ms / ms, "errors": errors})


def gmm(args, rows):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwenjax.ops.grouped_matmul import grouped_matmul

    # smoke: three row blocks of 128 (300 rows: padded), three column blocks, five K steps of 64
    experts, hidden, out, rows_routed = (256, 2048, 1024, 4096 * 8) if not args.smoke else (8, 320, 384, 300)
    rng = np.random.default_rng(0)
    group_sizes = jnp.asarray(np.bincount(rng.integers(0, experts, rows_routed), minlength=experts), jnp.int32)
    x = jnp.asarray(rng.standard_normal((rows_routed, hidden), np.float32), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((experts, out, hidden), np.float32) / hidden ** 0.5, jnp.bfloat16)
    flops = 2 * rows_routed * hidden * out
    want = grouped_matmul(x, w, group_sizes, implementation="ragged_dot")
    _require_kernels("gmm", _mosaic_calls(lambda x, w: grouped_matmul(x, w, group_sizes, implementation=args.compiled),
                                          x, w))
    dense_w = w[0].T
    programs = {impl: jax.jit(lambda x, w, gs, impl=impl: grouped_matmul(x, w, gs, implementation=impl))
                for impl in (args.gmm_kernels, "ragged_dot")}
    for impl, fn in programs.items():
        error = _relative_error(fn(x, w, group_sizes), want)
        ms = _median_ms(fn, x, w, group_sizes, repeats=args.repeats)
        rows.append({"section": "gmm", "impl": impl, "ms": ms, "tflops": flops / ms / 1e9, "errors": {"out": error}})
    dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    ms = _median_ms(dense, x, dense_w, repeats=args.repeats)
    rows.append({"section": "gmm", "impl": "dense matmul, same flops", "ms": ms, "tflops": flops / ms / 1e9})


def train(args, rows):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import qwenjax
    from qwenjax.config import resolve_config
    from qwenjax.train.step import TrainConfig, init_state, jit_train_step, train_step as one_step

    name, batch, seq = ("qwen3.5-0.8b", 2, 2048) if not args.smoke else ("tiny", 2, 64)
    cfg = qwenjax.load_config(resolve_config(name))
    m = qwenjax.from_config(cfg, dtype="bfloat16", kernels={"gated_delta_rule": args.kernels})
    params = sum(x.size for x in jax.tree.leaves(m.params))
    tcfg = TrainConfig(learning_rate=1e-5, warmup_steps=0, total_steps=100, weight_decay=0.0)
    state, train_step = init_state(m.params, tcfg), jit_train_step(m.graphdef, tcfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, batch, seq)), jnp.int32)
    compiled = m.replace(kernels=m.kernels.replace(gated_delta_rule=args.compiled)).graphdef
    _require_kernels("train", _mosaic_calls(lambda s, i: one_step(compiled, tcfg, s, {"input_ids": i}), state, ids),
                     cfg.layer_types.count("linear_attention"))
    state, _ = jax.block_until_ready(train_step(state, {"input_ids": ids}))
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(train_step(state, {"input_ids": ids}))
        times.append(time.perf_counter() - start)
    ms = 1e3 * statistics.median(times)
    kind = jax.devices()[0].device_kind
    peak = next((p for gpu, p in PEAK_BF16_TFLOPS.items() if gpu in kind), None)
    achieved = 6 * params * batch * seq / ms / 1e9
    rows.append({"section": "train", "shape": f"{name}, bf16, {batch} x {seq} tokens", "impl": args.kernels,
                 "ms": ms, "tflops": achieved, "mfu": achieved / peak if peak else None,
                 "loss": float(metrics["loss"])})


def table(rows) -> str:
    lines = ["| section | shape | implementation | result |", "|---|---|---|---|"]
    for r in rows:
        show = lambda v: (f"{v:.4g}" if isinstance(v, float)
                          else "{" + ", ".join(f"{k} {show(x)}" for k, x in v.items()) + "}" if isinstance(v, dict)
                          else str(v))
        result = ", ".join(f"{k} {show(v)}" for k, v in r.items() if k not in ("section", "shape", "impl"))
        lines.append(f"| {r['section']} | {r.get('shape', '')} | {r['impl']} | {result} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted kernels: a check of this script")
    p.add_argument("--sections", default="gdn,step,gmm,train")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    import jax

    if args.smoke:
        args.repeats = 1
    args.kernels = args.gmm_kernels = "pallas_gpu_interpret" if args.smoke else "pallas_gpu"
    args.compiled = "pallas_gpu"  # what the Mosaic calls are counted in: the same functions, compiled
    print(f"gpu_check: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    rows, failed = [], []
    for section in args.sections.split(","):
        start = time.perf_counter()
        try:
            globals()[section](args, rows)
            off = {f"{r['impl']} {name}": (e, STATE_TOLERANCE.get((section, name), TOLERANCE))
                   for r in rows if r["section"] == section for name, e in r.get("errors", {}).items()}
            off = {what: e_tol for what, e_tol in off.items() if not e_tol[0] <= e_tol[1]}
            if off:
                failed.append(section)
                print(f"gpu_check: {section}: off the XLA path (error, bound): {off}", flush=True)
        except Exception:  # report and go on: one section's failure must not cost the others' device time
            failed.append(section)
            rows.append({"section": section, "impl": "FAILED", "error": traceback.format_exc(limit=3)[-400:]})
            traceback.print_exc()
        print(f"gpu_check: {section} took {time.perf_counter() - start:.1f} s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(table(rows) + "\n")
    print(table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
