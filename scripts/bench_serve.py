"""`qwenjax serve` under load against sequential `qwenjax.generate` calls, in one run.

    python scripts/bench_serve.py                      # the bundled model, concurrency 1, 4, 16, 64
    python scripts/bench_serve.py --speculative 1      # the server drafting with the MTP head

First the baseline: every request's prompt through `qwenjax.generate` alone, one after another, in this process.
Then a real `qwenjax serve` process on localhost, and at each concurrency level that many client threads, each
sending its streamed requests one after another. Reported per level: total generated tokens/s (and against the
baseline), p50/p99 time to first token, p50/p99 time per token after the first, and how many replies are the text
of the baseline's tokens for the same prompt (batch invariance: greedy replies must not depend on the batch).
With --rounds N the levels run N times in turn (A/B noise on a shared machine) and each figure is the median.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np

PROMPT = "Section {i}. The {topic} module"
TOPICS = ["os", "json", "re", "sys", "math", "time", "random", "pathlib", "socket", "typing", "itertools", "csv"]


def prompts(n: int) -> list[str]:
    return [PROMPT.format(i=i, topic=TOPICS[i % len(TOPICS)]) for i in range(n)]


def baseline(model_dir: str, dtype: str, texts: list[str], max_tokens: int) -> tuple[float, int, list[str]]:
    """(seconds, tokens, each prompt's reply text) of sequential `generate` calls over `texts` (after one untimed
    call per prompt bucket)."""
    import qwenjax
    from qwenjax.inference.tokenizer import Tokenizer

    m, tok = qwenjax.from_pretrained(model_dir, dtype=dtype), Tokenizer(model_dir)
    ids = [tok.encode(t) for t in texts]
    qwenjax.generate(m, [ids[0]], max_new_tokens=max_tokens, temperature=0.0)  # compile
    t0, replies = time.perf_counter(), []
    for p in ids:
        replies.append(qwenjax.generate(m, [p], max_new_tokens=max_tokens, temperature=0.0)[0])
    seconds = time.perf_counter() - t0
    return seconds, sum(map(len, replies)), [tok.decode(r) for r in replies]


def one_request(port: int, text: str, max_tokens: int) -> tuple[float, float, float, int, str]:
    """(start, first token, end) times, generated tokens and text of one streamed completion."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    first, tokens, reply = None, 0, []
    for line in iter(response.readline, b""):
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0].get("text"):
            first = first or time.perf_counter()
            reply.append(chunk["choices"][0]["text"])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    conn.close()
    return start, first or end, end, tokens, "".join(reply)


def level(port: int, concurrency: int, texts: list[str], max_tokens: int, expected: list[str]) -> dict:
    """One concurrency level over `texts` (whose baseline replies are `expected`)."""
    per_client = [list(range(len(texts)))[i::concurrency] for i in range(concurrency)]

    def client(mine: list[int]):
        return [(i, one_request(port, texts[i], max_tokens)) for i in mine]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = [r for rs in pool.map(client, per_client) for r in rs]
    wall = time.perf_counter() - t0
    ttft = np.array([first - start for _, (start, first, *_) in results])
    tpot = np.array([(end - first) / (n - 1) for _, (_, first, end, n, _) in results if n > 1])
    tokens = sum(r[3] for _, r in results)
    same = sum(r[4] == expected[i] for i, r in results)
    return dict(rate=tokens / wall, requests=len(results), ttft=ttft, tpot=tpot, same=same)


def main() -> int:
    from qwenjax.demo import DEFAULT_MODEL_DIR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL_DIR)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests-per-client", type=int, default=4, help="at the highest concurrency")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--speculative", type=int, default=0, help="the server's --speculative (the baseline: plain)")
    p.add_argument("--rounds", type=int, default=1, help="run the levels this many times in turn; report medians")
    p.add_argument("--server-arg", action="append", default=[], help="one more argument for `qwenjax serve`")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = prompts(max(levels) * args.requests_per_client)

    seconds, tokens, expected = baseline(args.model, args.dtype, texts, args.max_tokens)
    base_rate = tokens / seconds

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "qwenjax.cli", "serve", "--model", args.model, "--port",
                               str(port), "--dtype", args.dtype, "--max-batch", str(args.max_batch), "--max-len",
                               str(args.max_len), "--max-queue", str(len(texts)), "--log-level", "warning",
                               "--speculative", str(args.speculative), *args.server_arg],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("qwenjax serve did not start")
                time.sleep(0.5)
        level(port, 4, texts[:8], args.max_tokens, expected)  # compile what the warm-up left (chunks, horizons)
        runs = {c: [] for c in levels}
        for _ in range(args.rounds):
            for c in levels:
                n = c * args.requests_per_client if c < max(levels) else len(texts)
                runs[c].append(level(port, c, texts[:n], args.max_tokens, expected[:n]))
    finally:
        server.terminate()
        server.wait()

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    import jax

    print(f"machine: {cpu}, {os.cpu_count()} cpus; jax {jax.__version__}; model {args.model} ({args.dtype}); "
          f"--max-batch {args.max_batch}, --speculative {args.speculative}; {args.max_tokens} new tokens a request, "
          f"greedy; QWENJAX_CPU_MATVEC={os.environ.get('QWENJAX_CPU_MATVEC', '')!r} (xla: batch invariance off)")
    print(f"baseline: {len(texts)} sequential qwenjax.generate calls: {tokens} tokens in {seconds:.1f} s = "
          f"{base_rate:.0f} tokens/s")
    rounds = f", medians of {args.rounds} rounds" if args.rounds > 1 else ""
    print(f"| concurrency | requests | tokens/s{rounds} | vs sequential generate | TTFT p50 / p99 (ms) | "
          "per token p50 / p99 (ms) | replies identical to generate's |")
    print("|---|---|---|---|---|---|---|")
    for c, rs in runs.items():
        rate = float(np.median([r["rate"] for r in rs]))
        pct = lambda key, q: float(np.median([np.percentile(r[key], q) for r in rs])) * 1e3
        print(f"| {c} | {rs[0]['requests']} | {rate:.0f} | **{rate / base_rate:.2f}x** | "
              f"{pct('ttft', 50):.0f} / {pct('ttft', 99):.0f} | {pct('tpot', 50):.1f} / {pct('tpot', 99):.1f} | "
              f"{sum(r['same'] for r in rs)}/{sum(r['requests'] for r in rs)} |")
    if args.rounds > 1:
        print("tokens/s per round: " + "; ".join(f"c={c}: " + ", ".join(f"{r['rate']:.0f}" for r in rs)
                                                 for c, rs in runs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
