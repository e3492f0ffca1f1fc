"""Training throughput: a qwenjax train step vs a transformers (torch) train step, same model, same batch.

    python scripts/bench_train.py                          # 0.8B shape cut to 4 layers, 2 x 256 tokens, fp32
    python scripts/bench_train.py --layers 8 --seq 512 --dtype bfloat16

Both run the same random weights (transformers writes them with `save_pretrained`; qwenjax loads that directory)
and the same step: next-token cross-entropy (mean over tokens), backward, global-norm clipping at 1.0, AdamW.
qwenjax's step is `jit_train_step` (fp32 optimizer state); transformers' is a plain eager torch loop with
`torch.optim.AdamW`. Medians over --steps steps after one warm-up step (qwenjax's includes compilation).
Needs the `test` extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="qwen3.5-0.8b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from qwenjax.testing import paired_models
    from qwenjax.train.step import TrainConfig, init_state, jit_train_step

    hf, m = paired_models(args.config, args.dtype, args.layers)
    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, (args.batch, args.seq))
    tokens = args.batch * (args.seq - 1)
    print(f"model: {args.config} cut to {args.layers} layers, {args.dtype}; batch {args.batch} x {args.seq} tokens; "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} cpus")

    cfg = TrainConfig(learning_rate=1e-5, warmup_steps=0, total_steps=100, weight_decay=0.0)
    state, step = init_state(m.params, cfg), jit_train_step(m.graphdef, cfg)
    batch = {"input_ids": jnp.asarray(ids[None], jnp.int32)}
    ours, ours_loss = [], None
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        loss = float(metrics["loss"])
        ours_loss = loss if i == 0 else ours_loss
        print(f"  qwenjax step {i}: {time.perf_counter() - t0:.2f} s (loss {loss:.5f})", flush=True)
        if i:
            ours.append(time.perf_counter() - t0)

    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    t_ids = torch.as_tensor(ids)
    ref, ref_loss = [], None
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        logits = hf(input_ids=t_ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t_ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref_loss = loss.item() if i == 0 else ref_loss
        print(f"  transformers step {i}: {time.perf_counter() - t0:.2f} s (loss {loss.item():.5f})", flush=True)
        if i:
            ref.append(time.perf_counter() - t0)

    t_ours, t_ref = statistics.median(ours), statistics.median(ref)
    print(f"first-step loss: qwenjax {ours_loss:.5f}, transformers {ref_loss:.5f}")
    print(f"  {'qwenjax':>13}: {t_ours:7.2f} s/step  {tokens / t_ours:8.1f} tokens/s")
    print(f"  {'transformers':>13}: {t_ref:7.2f} s/step  {tokens / t_ref:8.1f} tokens/s")
    print(f"  qwenjax / transformers training throughput: {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    main()
