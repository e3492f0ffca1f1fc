"""guidellm's fixed-length benchmark against `qwenjax serve`: TTFT, ITL and output tokens/s at concurrency 1, 4, 16.

    python scripts/bench_guidellm.py --guidellm /path/to/venv/bin/guidellm            # the bundled model
    python scripts/bench_guidellm.py --rounds 16 --out guidellm.json                  # longer, for BENCHMARKS

guidellm (https://github.com/vllm-project/guidellm, 0.8.x; install it in its own venv: it pulls many packages)
sends synthetic prompts of exactly --prompt-tokens tokens (its own tokenizer: transformers' AutoTokenizer on the
model directory) to /v1/completions, streamed, with `max_tokens` N and `ignore_eos: true`, so every reply is
exactly N tokens. Its profile `concurrent` keeps S streams busy, for each S in --streams, until S x --rounds
requests have completed. Before it, one discarded guidellm run at the largest S (other seed: other prompts, so no
prefix-cache hits carry over) compiles what the server's own warm-up left out. Afterwards the script checks every
request's length, prints the table and, with --baseline, runs every prompt guidellm sent through sequential
`qwenjax.generate` calls in this process (greedy, eos ignored, N new tokens each), for the ratio the issue asks
about; it also counts the served replies whose text is generate's (all of them in float32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

WARMUP_SEED = 1042  # guidellm's synthetic prompts follow its seed; the measured run keeps guidellm's default, 42


def guidellm_command(guidellm: str, port: int, args, streams: list[int], counts: list[int], seed: int | None,
                     out: str) -> list[str]:
    """The guidellm command line of one run: one concurrent benchmark per stream count, `counts` requests each."""
    backend = f"kind=openai_http,target=http://127.0.0.1:{port},request_format=/v1/completions"
    if args.temperature is not None:
        backend += f",extras.body.temperature={args.temperature}"
    cmd = [guidellm, "run", "--backend", backend,
           "--profile", f"kind=concurrent,streams={streams[0]}",
           "--constraint", f"kind=max_requests,count={counts[0]}",
           "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
           "--tokenizer", f"kind=hf_auto,model={args.model}",
           "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    if len(streams) > 1:  # one value per sub-benchmark (guidellm 0.8 deprecates lists inside --profile)
        cmd += ["--override", "profile.streams", ",".join(map(str, streams)),
                "--override", "constraints[0].count", ",".join(map(str, counts))]
    if seed is not None:
        cmd += ["--seed", f"kind=static,value={seed}"]
    return cmd


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux /proc), 0 elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def run_guidellm(cmd: list[str], log_path: str) -> float:
    """Runs guidellm; returns the CPU seconds it and its workers took (on 2 cores the client competes with the
    server, so the summary shows both)."""
    print("$ " + " ".join(f"'{c}'" if any(ch in c for ch in "[], ") else c for c in cmd), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc:
        with open(log_path) as log:
            tail = log.read()[-4000:]
        raise RuntimeError(f"guidellm exited with {rc} (log {log_path}):\n{tail}")
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def check_lengths(report: dict, streams: list[int], counts: list[int], n: int) -> list[str]:
    """Every benchmark's every request completed with exactly `n` output tokens by the server's count (its usage,
    guidellm's output_tokens), having asked for them (max_tokens `n`, ignore_eos). Returns the problems found
    (empty: all exact). Streamed chunks are no count: the server sends no chunk for a token whose text is held
    back (an incomplete character or a possible stop string), so they are 60-64 here."""
    problems = []
    for b, s, c in zip(report["benchmarks"], streams, counts, strict=True):
        totals = b["metrics"]["request_totals"]
        if totals["errored"] or totals["incomplete"]:
            problems.append(f"c={s}: {totals} (expected {c} successful, none errored or incomplete)")
        elif totals["successful"] != c:  # seen once on a loaded machine: guidellm closed the level with one in flight
            problems.append(f"c={s}: guidellm's report holds {totals['successful']} of the {c} requests, none errored "
                            "or incomplete: it left the rest out (rerun)")
        for r in b["requests"]["successful"]:
            body = json.loads(r["request_args"])["body"]
            sent = (body.get("max_tokens"), body.get("ignore_eos"))
            if r["output_tokens"] != n or sent != (n, True):
                problems.append(f"c={s} request {r['request_id']}: output_tokens {r['output_tokens']}, "
                                f"sent max_tokens/ignore_eos {sent} (expected {n}, True)")
    return problems


def summarize(report: dict, streams: list[int]) -> list[dict]:
    rows = []
    for b, s in zip(report["benchmarks"], streams, strict=True):
        m, reqs = b["metrics"], b["requests"]["successful"]
        ttft, itl = m["time_to_first_token_ms"]["successful"], m["inter_token_latency_ms"]["successful"]
        tokens = sum(r["output_tokens"] for r in reqs)
        rows.append(dict(streams=s, requests=len(reqs), tokens=tokens, seconds=b["duration"],
                         rate=tokens / b["duration"], prompt=m["prompt_token_count"]["successful"]["median"],
                         ttft50=ttft["median"], ttft90=ttft["percentiles"]["p90"],
                         itl50=itl["median"], itl90=itl["percentiles"]["p90"]))
    return rows


def baseline(args, prompts: list[str]) -> tuple[float, list[str]]:
    """Seconds of sequential `qwenjax.generate` calls over `prompts` (as the server tokenizes them), each exactly
    --output-tokens new tokens (checked), and their texts."""
    import qwenjax
    from qwenjax.inference.tokenizer import Tokenizer

    m, tok = qwenjax.from_pretrained(args.model, dtype=args.dtype), Tokenizer(args.model)
    ids = [tok.encode(p) for p in prompts]
    kw = dict(max_new_tokens=args.output_tokens, ignore_eos=True, temperature=0.0)
    qwenjax.generate(m, [ids[0]], **kw)  # compile
    t0, outs = time.perf_counter(), []
    for p in ids:
        outs.append(qwenjax.generate(m, [p], **kw)[0])
    seconds = time.perf_counter() - t0
    if wrong := [len(o) for o in outs if len(o) != args.output_tokens]:
        raise RuntimeError(f"generate gave {wrong} tokens, not {args.output_tokens}")
    return seconds, [tok.decode(o) for o in outs]


def wait_healthy(server: subprocess.Popen, port: int, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qwenjax serve did not come up (exit code {server.poll()})") from None
            time.sleep(0.5)


def cpu_name() -> str:
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    from qwenjax.demo import DEFAULT_MODEL_DIR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--guidellm", default=shutil.which("guidellm"), help="the guidellm executable (default: on PATH)")
    p.add_argument("--model", default=DEFAULT_MODEL_DIR, help="served, and guidellm's tokenizer")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="server and baseline")
    p.add_argument("--streams", default="1,4,16")
    p.add_argument("--rounds", type=int, default=4, help="requests per stream at each level (S x rounds in all)")
    p.add_argument("--warmup-rounds", type=int, default=2, help="of the discarded run at the largest level; 0: none")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--temperature", default="0",
                   help="sent in every request (default 0: greedy, as the baseline); 'server': not sent, the "
                        "server's default sampling (generation_config.json)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--port", type=int, default=0, help="0: a free one")
    p.add_argument("--out", default=None, help="guidellm's JSON report of the measured run (default: in the logs "
                   "folder the script prints)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="sequential qwenjax.generate over every prompt guidellm sent, after the server stops")
    args = p.parse_args()
    if not args.guidellm:
        p.error("guidellm not found: pass --guidellm /path/to/bin/guidellm")
    args.temperature = None if args.temperature == "server" else float(args.temperature)
    if args.baseline and args.temperature != 0:
        p.error(f"--temperature {args.temperature}: the baseline is greedy (--temperature 0, or --no-baseline)")
    streams = [int(s) for s in args.streams.split(",")]
    counts = [s * args.rounds for s in streams]
    port = args.port
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]

    serve = [sys.executable, "-m", "qwenjax.cli", "serve", "--model", args.model, "--port", str(port),
             "--max-batch", str(args.max_batch), "--max-len", str(args.max_len), "--dtype", args.dtype,
             "--log-level", "warning"]
    print("$ " + " ".join(serve), flush=True)
    logs = tempfile.mkdtemp(prefix="bench_guidellm_")
    args.out = args.out or os.path.join(logs, "guidellm.json")
    server_log = open(os.path.join(logs, "server.log"), "w")
    server = subprocess.Popen(serve, stdout=server_log, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        wait_healthy(server, port)
        print(f"server healthy after {time.monotonic() - t0:.0f} s", flush=True)
        if args.warmup_rounds:
            top = max(streams)
            run_guidellm(guidellm_command(args.guidellm, port, args, [top], [top * args.warmup_rounds], WARMUP_SEED,
                                          os.path.join(logs, "warmup.json")), os.path.join(logs, "warmup.log"))
        server_cpu, t0 = cpu_seconds(server.pid), time.monotonic()
        client_cpu = run_guidellm(guidellm_command(args.guidellm, port, args, streams, counts, None, args.out),
                                  os.path.join(logs, "guidellm.log"))
        wall, server_cpu = time.monotonic() - t0, cpu_seconds(server.pid) - server_cpu
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server_log.close()

    with open(args.out) as f:
        report = json.load(f)
    problems = check_lengths(report, streams, counts, args.output_tokens)
    rows = summarize(report, streams)
    base_rate = None
    if args.baseline:  # every prompt guidellm sent, once each
        served = [r for b in report["benchmarks"] for r in b["requests"]["successful"]]
        prompts = [json.loads(r["request_args"])["body"]["prompt"] for r in served]
        seconds, texts = baseline(args, prompts)
        base_rate = len(prompts) * args.output_tokens / seconds
        same = sum(r["output"] == t for r, t in zip(served, texts, strict=True))

    import jax

    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cpus; jax {jax.__version__}; model {args.model} "
          f"({args.dtype}); --max-batch {args.max_batch} --max-len {args.max_len}; "
          f"guidellm logs in {logs}")
    print(f"{args.prompt_tokens}-token synthetic prompts, exactly {args.output_tokens} output tokens (ignore_eos), "
          f"temperature {args.temperature if args.temperature is not None else 'server default'}; prompt tokens "
          f"as the server counts them, median per level: {[r['prompt'] for r in rows]}")
    if base_rate:
        print(f"baseline: {len(prompts)} sequential qwenjax.generate calls (the prompts guidellm sent), "
              f"{args.output_tokens} tokens each, in {seconds:.1f} s = {base_rate:.0f} tokens/s; {same} of "
              f"{len(prompts)} served replies are their text exactly (greedy; batching can flip near-ties in bf16)")
    print(f"measured guidellm run: {wall:.0f} s wall (its start-up included), CPU: guidellm {client_cpu:.0f} s, "
          f"server {server_cpu:.0f} s")
    print("| concurrency | requests | output tokens/s | vs sequential generate | TTFT p50 / p90 (ms) | "
          "ITL p50 / p90 (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"**{r['rate'] / base_rate:.2f}x**" if base_rate else "-"
        print(f"| {r['streams']} | {r['requests']} | {r['rate']:.0f} | {ratio} | {r['ttft50']:.0f} / {r['ttft90']:.0f} "
              f"| {r['itl50']:.2f} / {r['itl90']:.2f} |")
    if problems:
        print(f"\nLENGTH CHECK FAILED ({len(problems)}):\n" + "\n".join(problems[:20]))
        return 1
    print(f"\nlength check: all {sum(counts)} requests asked for (max_tokens, ignore_eos) and returned (usage) exactly "
          f"{args.output_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
