"""Benchmark: `instructflow serve` under concurrent load, batched vs one request at a time.

    python bench/serve_load.py [--model builtin:tiny] [--clients 16] [--requests 160]
                               [--max-tokens 32]

Both servers are the same code in its own process on 127.0.0.1 with the same model: the
baseline with --max-batch 1 (one request generates at a time, as before batching), ours with
--max-batch 16. Each run: `--clients` threads send `--requests` greedy chat requests in all
(the demo's test prompts, cycled), closed-loop; measured: requests/s, generated tokens/s,
p50 / p99 latency. Correctness: every answer must equal the answer to the same prompt sent
alone (asserted; none lost: every request gets a 200).
Writes bench/results/serve_load.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompts() -> list[str]:
    from instructflow import demo_data

    rows = demo_data.generate(None, 0)[:64]
    return [f"{r['instruction']}\n\n{r['input']}".strip() for r in rows]


def start(model: str, max_batch: int, max_tokens: int):
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "instructflow.cli", "serve", "--model", model]
    cmd += ["--port", str(port), "--max-tokens", str(max_tokens), "--max-batch", str(max_batch)]
    cmd += ["--max-queue", "1024"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start")


def ask(client, url: str, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    t0 = time.perf_counter()
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    resp = client.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": max_tokens})
    resp.raise_for_status()
    data = resp.json()
    text = data["choices"][0]["message"]["content"]
    return text, data["usage"]["completion_tokens"], time.perf_counter() - t0


def load(url: str, asks: list[str], clients: int, max_tokens: int) -> dict:
    import httpx

    with httpx.Client(timeout=600) as client, ThreadPoolExecutor(clients) as pool:
        t0 = time.perf_counter()
        out = list(pool.map(lambda p: ask(client, url, p, max_tokens), asks))
        wall = time.perf_counter() - t0
    latencies = sorted(x[2] for x in out)
    return {
        "answers": [x[0] for x in out],
        "rps": len(asks) / wall,
        "tok_s": sum(x[1] for x in out) / wall,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "wall": wall,
    }


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    ps = prompts()
    asks = [ps[i % len(ps)] for i in range(args.requests)]
    results = {}
    reference: dict[str, str] = {}
    for name, batch in (("one at a time (--max-batch 1)", 1), ("batched (--max-batch 16)", 16)):
        proc, url = start(args.model, batch, args.max_tokens)
        try:
            if not reference:  # each prompt sent alone, nothing else running
                with httpx.Client(timeout=600) as client:
                    reference = {p: ask(client, url, p, args.max_tokens)[0] for p in ps}
            results[name] = load(url, asks, args.clients, args.max_tokens)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        same = sum(a == reference[p] for a, p in zip(results[name]["answers"], asks, strict=True))
        results[name]["same"] = same
        print(name, {k: v for k, v in results[name].items() if k != "answers"}, flush=True)
        assert same == len(asks), f"{name}: {len(asks) - same} answers differ from alone"
    base, ours = results.values()
    md = [
        f"`python bench/serve_load.py --model {args.model} --clients {args.clients} "
        f"--requests {args.requests} --max-tokens {args.max_tokens}`, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}",
        "",
        "| server | requests/s | generated tokens/s | p50 latency (s) | p99 latency (s) | "
        "answers equal to alone |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        md.append(
            f"| {name} | {r['rps']:.1f} | {r['tok_s']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | "
            f"{r['same']}/{args.requests} |"
        )
    md.append("")
    md.append(f"Throughput ratio (batched / one at a time): **{ours['rps'] / base['rps']:.1f}x**")
    out = ROOT / "bench" / "results" / "serve_load.md"
    out.write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md))


if __name__ == "__main__":
    main()
