"""Benchmark: `instructflow serve` under concurrent load, batched vs one request at a time.

    python bench/serve_load.py [--model builtin:tiny] [--clients 16] [--requests 160]
                               [--max-tokens 32]

Both servers are the same code in its own process on 127.0.0.1 with the same model: the
baseline with --max-batch 1 (one request generates at a time, as before batching), ours with
--max-batch 16. Each run: `--clients` threads send `--requests` greedy chat requests in all
(the demo's test prompts, cycled), closed-loop; measured: requests/s, generated tokens/s,
p50 / p99 latency and time to first token. Ours is run a second time with `stream: true`
requests, whose first token arrives before the answer is done (a plain request's first token
arrives with the whole answer). Correctness: every answer, streamed ones joined, must equal the
answer to the same prompt sent alone (asserted; none lost: every request gets a 200).
Writes bench/results/serve_load.md.
"""

from __future__ import annotations

import argparse
import json
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


def _launch(command, failure: str):
    """Start `command(port)` on a free port of 127.0.0.1 and wait for its /health: (proc, url)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(failure)


def start(model: str, max_batch: int, max_tokens: int):
    def command(port: int) -> list[str]:
        cmd = [sys.executable, "-m", "instructflow.cli", "serve", "--model", model]
        cmd += ["--port", str(port), "--max-tokens", str(max_tokens)]
        return cmd + ["--max-batch", str(max_batch), "--max-queue", "1024"]

    return _launch(command, "server did not start")


def builtin_dir() -> Path:
    """The HF folder of builtin:tiny (config, safetensors, tokenizer with a chat template)."""
    from instructflow.builtin import model as builtin

    return builtin.ensure_pretrained(builtin.cached_tokenizer_dir())[0] / "model"


def start_transformers_serve(model_dir: Path, continuous: bool):
    """`transformers serve` (transformers' own OpenAI-compatible server) on the same weights."""
    cli = Path(sys.executable).with_name("transformers")

    def command(port: int) -> list[str]:
        cmd = [str(cli), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
        return cmd + ["--continuous-batching" if continuous else "--no-continuous-batching"]

    failure = "transformers serve did not start (pip install 'transformers[serving]')"
    return _launch(command, failure)


MODEL_FIELD = "m"  # transformers serve needs the served model's own name here


def _body(prompt: str, max_tokens: int, stream: bool) -> dict:
    messages = [{"role": "user", "content": prompt}]
    return {"model": MODEL_FIELD, "messages": messages, "max_tokens": max_tokens,
            "stream": stream, "temperature": 0}  # fmt: skip


def ask(client, url: str, prompt: str, max_tokens: int) -> tuple[str, int, float, float]:
    """(answer, completion tokens, latency, time to first token: the latency)."""
    t0 = time.perf_counter()
    resp = client.post(f"{url}/v1/chat/completions", json=_body(prompt, max_tokens, False))
    resp.raise_for_status()
    data = resp.json()
    text = data["choices"][0]["message"]["content"]
    latency = time.perf_counter() - t0
    return text, data["usage"]["completion_tokens"], latency, latency


def ask_streamed(client, url: str, prompt: str, max_tokens: int) -> tuple[str, float, float]:
    """(answer joined from its chunks, latency, time to its first content chunk)."""
    t0 = time.perf_counter()
    first, pieces = None, []
    body = _body(prompt, max_tokens, True)
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            content = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if content:
                first = first or time.perf_counter() - t0
                pieces.append(content)
    latency = time.perf_counter() - t0
    return "".join(pieces), latency, first or latency


def _quantiles(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    return statistics.median(values), values[min(len(values) - 1, int(0.99 * len(values)))]


def load(url: str, asks: list[str], clients: int, ask_one) -> dict:
    """`ask_one(client, url, prompt)` -> (answer, completion tokens, latency, time to first
    token)."""
    import httpx

    with httpx.Client(timeout=600) as client, ThreadPoolExecutor(clients) as pool:
        t0 = time.perf_counter()
        out = list(pool.map(lambda p: ask_one(client, url, p), asks))
        wall = time.perf_counter() - t0
    (p50, p99), (ttft50, ttft99) = _quantiles([x[2] for x in out]), _quantiles([x[3] for x in out])
    return {
        "answers": [x[0] for x in out],
        "rps": len(asks) / wall,
        "tok_s": sum(x[1] for x in out) / wall,
        "p50": p50,
        "p99": p99,
        "ttft50": ttft50,
        "ttft99": ttft99,
        "wall": wall,
    }


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--transformers-serve",
        action="store_true",
        help="also load `transformers serve` on the same weights (builtin:tiny only; it renders "
        "prompts with the tokenizer's chat template, so its answers differ from ours)",
    )
    args = ap.parse_args()
    ps = prompts()
    asks = [ps[i % len(ps)] for i in range(args.requests)]
    results = {}
    reference: dict[str, tuple[str, int]] = {}  # prompt -> (answer, completion tokens)

    def plain(client, url: str, prompt: str):
        return ask(client, url, prompt, args.max_tokens)

    def streamed(client, url: str, prompt: str):
        text, latency, ttft = ask_streamed(client, url, prompt, args.max_tokens)
        return text, reference[prompt][1], latency, ttft  # greedy: the same tokens as alone

    runs = {
        "one at a time (--max-batch 1)": (1, {"plain": plain}),
        "batched (--max-batch 16)": (16, {"plain": plain, "streamed": streamed}),
    }
    for server, (batch, kinds) in runs.items():
        proc, url = start(args.model, batch, args.max_tokens)
        try:
            if not reference:  # each prompt sent alone, nothing else running
                with httpx.Client(timeout=600) as client:
                    reference = {p: ask(client, url, p, args.max_tokens)[:2] for p in ps}
            for kind, ask_one in kinds.items():
                name = server if kind == "plain" else f"{server}, streamed"
                results[name] = load(url, asks, args.clients, ask_one)
                answers = zip(results[name]["answers"], asks, strict=True)
                same = sum(a == reference[p][0] for a, p in answers)
                results[name]["same"] = same
                print(name, {k: v for k, v in results[name].items() if k != "answers"}, flush=True)
                assert same == len(asks), f"{name}: {len(asks) - same} answers differ from alone"
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if args.transformers_serve:
        theirs = transformers_serve_rows(builtin_dir(), asks, ps, args)
        results.update(theirs)
    base, ours, ours_streamed = list(results.values())[:3]
    md = [
        f"`python bench/serve_load.py --model {args.model} --clients {args.clients} "
        f"--requests {args.requests} --max-tokens {args.max_tokens}`, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}",
        "",
        "| server | requests/s | generated tokens/s | p50 latency (s) | p99 latency (s) | "
        "p50 time to first token (s) | p99 time to first token (s) | answers equal to alone |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        md.append(
            f"| {name} | {r['rps']:.1f} | {r['tok_s']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | "
            f"{r['ttft50']:.2f} | {r['ttft99']:.2f} | {r['same']}/{args.requests} |"
        )
    md.append("")
    md.append(f"Throughput ratio (batched / one at a time): **{ours['rps'] / base['rps']:.1f}x**")
    for name, r in results.items():
        if name.startswith("transformers serve"):
            md.append(
                f"Batched instructflow / {name}: **{ours['rps'] / r['rps']:.1f}x** requests/s, "
                f"**{ours['tok_s'] / r['tok_s']:.1f}x** generated tokens/s (its prompts use the "
                "tokenizer's chat template, ours the training template: answers differ)."
            )
    md.append(
        "A plain request's first token arrives with its whole answer; streamed, p50 time to first "
        f"token is {ours_streamed['ttft50'] / ours['ttft50']:.2f}x the plain p50 latency."
    )
    out = ROOT / "bench" / "results" / "serve_load.md"
    out.write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md))


def transformers_serve_rows(model_dir: Path, asks: list[str], ps: list[str], args) -> dict:
    """The same load on `transformers serve`, with and without its continuous batching; its
    answers are checked against its own one-at-a-time answers."""
    import httpx

    global MODEL_FIELD
    MODEL_FIELD = str(model_dir)
    rows = {}
    for continuous in (False, True):
        name = f"transformers serve{' --continuous-batching' if continuous else ''}"
        proc, url = start_transformers_serve(model_dir, continuous)
        try:
            with httpx.Client(timeout=600) as client:
                alone = {p: ask(client, url, p, args.max_tokens)[0] for p in ps}
            rows[name] = load(
                url, asks, args.clients, lambda c, u, p: ask(c, u, p, args.max_tokens)
            )
            answers = zip(rows[name]["answers"], asks, strict=True)
            rows[name]["same"] = sum(a == alone[p] for a, p in answers)
            print(name, {k: v for k, v in rows[name].items() if k != "answers"}, flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    MODEL_FIELD = "m"
    return rows


if __name__ == "__main__":
    main()
