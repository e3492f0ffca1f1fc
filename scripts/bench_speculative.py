"""Speculative decoding with the MTP head: what it gains on the bundled model, and what a verify pass costs at the
0.8B shape, from which its gain on a real checkpoint can be projected.

    python scripts/bench_speculative.py                        # both parts
    python scripts/bench_speculative.py --part bundled --repeats 3
    python scripts/bench_speculative.py --part shape --configs qwen3.5-0.8b --dtypes bfloat16 --ks 1,3

Part "bundled": the bundled tiny-pydoc model and its trained head, batch 1, greedy, end-of-sequence disabled,
`--new-tokens` tokens from the first 32 tokens of each of `--prompts` held-out pieces of its corpus (those
scripts/train_default_model.py never trained on). Decode tokens/s = (new tokens - 1) / the time from the first
streamed token to the last (prefill excluded), `qwenjax.stream(..., num_speculative_tokens=k)` for k = 0 (plain
decoding), 1, 2, 3, taking turns on every prompt in every round so that all see the same drift of the machine.
Medians over prompts x rounds; the mean accepted drafts per verify pass from `SpeculativeStats`. k = 1, 2, 3
again with a draft vocabulary (`draft_vocab`): the `--draft-vocab-size` most frequent tokens of the training split.

Part "shape": random weights of each of `--configs` (default the 0.8B shape) with an MTP layer; acceptance is
meaningless there, so this part times one call of each jitted function after a 128-token prompt (at least 3
calls and `--round-seconds` per function per round, median; the median over `--repeats` rounds), relative to one
plain decode step in the same rounds:
- verify: the main model over k+1 tokens keeping every GDN state, and the selection of a prefix;
- speculative step: verify + selection + the k draft steps of the MTP head (what one pass of generation costs),
  with the "states" rollback (generation's) and the "recompute" one (the kept tokens run through the model again
  instead of keeping every GDN state), and "states" with a draft vocabulary of `--draft-vocab-size` tokens.
A real checkpoint's speed-up at k is then (mean accepted + 1) / (speculative step cost / decode step cost).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPT_TOKENS = 32


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]}, {len(names)} cpus" if names else platform.processor()
    except OSError:
        return platform.processor()


def bundled(args) -> None:

    import qwenjax
    from qwenjax.demo import DEFAULT_MODEL_DIR
    from qwenjax.inference.speculative import SpeculativeStats, frequent_tokens
    from qwenjax.inference.tokenizer import Tokenizer
    from scripts.train_default_model import HOLDOUT_EVERY, pieces, python_docs

    m = qwenjax.from_pretrained(DEFAULT_MODEL_DIR, dtype=args.bundled_dtype)
    tok = Tokenizer(DEFAULT_MODEL_DIR)
    texts = pieces(python_docs())
    heldout = [t for i, t in enumerate(texts) if i % HOLDOUT_EVERY == 0]
    prompts = [ids[:PROMPT_TOKENS] for ids in map(tok.encode, heldout) if len(ids) >= PROMPT_TOKENS][:args.prompts]
    # runs: k, and the draft vocabulary's size (0: all): the most frequent tokens of the training split
    runs = [(0, 0), (1, 0), (2, 0), (3, 0)]
    vocabs = {0: None}
    size = 1024 if args.draft_vocab_size is None else args.draft_vocab_size
    if size:
        vocabs[size] = frequent_tokens(tok, [t for i, t in enumerate(texts) if i % HOLDOUT_EVERY], size)
        runs += [(1, size), (2, size), (3, size)]
    n = args.new_tokens

    def run(prompt, kv):
        k, size = kv
        stats = SpeculativeStats()
        stamps, tokens = [], []
        for out in qwenjax.stream(m, [prompt], max_new_tokens=n, eos_token_ids=[], num_speculative_tokens=k,
                                  speculative_stats=stats, draft_vocab=vocabs[size]):
            stamps.append(time.perf_counter())
            tokens.append(out[0])
        return (n - 1) / (stamps[-1] - stamps[0]), tokens, stats

    print(f"\n== bundled model ({DEFAULT_MODEL_DIR}, {args.bundled_dtype}): batch 1, greedy, {len(prompts)} held-out "
          f"prompts of {PROMPT_TOKENS} tokens, {n} new tokens, {args.repeats} rounds")
    plain = {}
    for i, p in enumerate(prompts):  # warm-up (compiles), and the plain output every k must reproduce
        for k in runs:
            _, tokens, _ = run(p, k)
            if k == (0, 0):
                plain[i] = tokens
            elif tokens != plain[i]:
                raise SystemExit(f"prompt {i}: k, vocabulary = {k}: output differs from plain greedy decoding")
    rates = {k: [] for k in runs}
    stats = {k: SpeculativeStats() for k in runs}
    for _ in range(args.repeats):
        for i, p in enumerate(prompts):
            for k in runs:
                rate, _, s = run(p, k)
                rates[k].append(rate)
                for f in ("steps", "drafted", "accepted"):
                    setattr(stats[k], f, getattr(stats[k], f) + getattr(s, f))
    base = statistics.median(rates[(0, 0)])
    print("| k | draft vocabulary | decode tokens/s (median) | vs plain | mean accepted per pass | tokens per pass "
          "| acceptance |")
    print("|---|---|---|---|---|---|---|")
    for kv in runs:
        r = statistics.median(rates[kv])
        s = stats[kv]
        extra = (f"{s.mean_accepted:.2f} | {s.mean_accepted + 1:.2f} | {s.acceptance_rate:.0%}" if kv[0] else
                 "- | 1 | -")
        print(f"| {kv[0]} | {kv[1] or 'all'} | {r:.0f} | **{r / base:.2f}x** | {extra} |")


def shape(args) -> None:
    from qwenjax.config import load_config, resolve_config

    for name in args.configs.split(","):
        cfg = load_config(resolve_config(name))
        if args.layers:
            cfg = cfg.replace(num_hidden_layers=args.layers, layer_types=cfg.layer_types[:args.layers])
        for dtype in args.dtypes.split(","):
            shape_one(args, name, cfg.replace(mtp_num_hidden_layers=cfg.mtp_num_hidden_layers or 1), dtype)


def shape_one(args, name, cfg, dtype) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import qwenjax
    from qwenjax.inference import generate, speculative
    from qwenjax.inference.sampling import SamplingParams
    from qwenjax.model.cache import accept_steps

    ks = [int(k) for k in args.ks.split(",")]
    greedy = SamplingParams()
    prompt = 128
    m = qwenjax.from_config(cfg, dtype=dtype)
    model, _ = generate.flat_params_model(m)
    params = jax.tree.leaves(m.params)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, prompt)).astype(np.int32)
    rng = jax.random.key(0)
    # every call starts from this cache (nothing donated), so all read the same 128 held tokens
    tokens, cache = generate._compiled(m, "prefill", greedy)(
        params, generate.new_cache(m, 1, generate.CACHE_BUCKET, mtp=True), ids, np.ones_like(ids), rng)
    print(f"\n== {name} shape{f' ({args.layers} layers)' if args.layers else ''}, random weights, "
          f"{dtype}: one call after a {prompt}-token prompt, batch 1")

    def timed(fn):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(cache))
        return time.perf_counter() - t0

    def decode_step(leaves, c):
        logits, c = model(leaves).extend(tokens[:, None], c)
        return jnp.argmax(logits, -1), c

    def verify(leaves, c, k):
        logits, _, steps = model(leaves).verify(jnp.zeros((1, k + 1), jnp.int32), c)
        return jnp.argmax(logits, -1), accept_steps(steps, jnp.ones((1,), jnp.int32))

    def speculative_step(leaves, c, k, rollback, vocab=None):
        return speculative.step(model(leaves), c, tokens, jnp.zeros((1, k), jnp.int32), None, rng, greedy,
                                rollback=rollback, vocab=vocab)

    # a draft vocabulary of the first ids (its cost does not depend on which tokens)
    vocab_size = 32768 if args.draft_vocab_size is None else args.draft_vocab_size
    vocab = speculative.DraftVocab.of(m.module, jnp.arange(min(vocab_size, cfg.vocab_size))) if vocab_size else None

    calls = {"decode step": functools.partial(jax.jit(decode_step), params)}
    for k in ks:
        calls[f"verify k={k}"] = functools.partial(jax.jit(verify, static_argnums=2), params, k=k)
        for rollback in speculative.ROLLBACKS:
            calls[f"speculative step k={k}, {rollback}"] = functools.partial(
                jax.jit(speculative_step, static_argnums=(2, 3)), params, k=k, rollback=rollback)
        if vocab is not None:
            calls[f"speculative step k={k}, states, draft vocabulary {vocab.ids.size}"] = functools.partial(
                jax.jit(speculative_step, static_argnums=(2, 3)), params, k=k, rollback="states", vocab=vocab)
    for fn in calls.values():  # compile
        timed(fn)
    times = {call: [] for call in calls}
    for _ in range(args.repeats):
        for call, fn in calls.items():
            runs = [timed(fn) for _ in range(3)]
            while sum(runs) < args.round_seconds:
                runs.append(timed(fn))
            times[call].append(statistics.median(runs))
    base = statistics.median(times["decode step"])
    print("| call | ms (median) | vs one decode step |")
    print("|---|---|---|")
    for call in calls:
        t = statistics.median(times[call])
        print(f"| {call} | {t * 1e3:.1f} | **{t / base:.2f}x** |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("bundled", "shape", "both"), default="both")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts (bundled part)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--bundled-dtype", default="bfloat16", help="the bundled model's compute dtype, as the CLI's")
    p.add_argument("--configs", default="qwen3.5-0.8b", help="shape part: config files or configs/ names")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (multiple of 4)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--ks", default="1,2,3", help="draft counts of the shape part")
    p.add_argument("--draft-vocab-size", type=int, default=None,
                   help="also draft from this many tokens (bundled: the most frequent of its training split; default "
                        "1024; shape: the first ids, default 32768; 0: not)")
    p.add_argument("--round-seconds", type=float, default=0.3,
                   help="shape part: each call is timed at least 3 times and for this long in every round")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import jax

    print(f"machine: {cpu_name() if jax.default_backend() == 'cpu' else jax.devices()[0].device_kind}; "
          f"jax {jax.__version__}")
    if args.part in ("bundled", "both"):
        bundled(args)
    if args.part in ("shape", "both"):
        shape(args)


if __name__ == "__main__":
    main()
