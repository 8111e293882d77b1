"""Benchmark: the data stages at growing row counts: wall time, rows/s and peak memory of
`instructflow run --until tokenize`, on the local engine or on Ray.

    python bench/scale.py [--sizes 25000,100000] [--engine local|ray]

Rows: Alpaca-format records made from the 12,340 shared Stanford Alpaca rows, seeded: the
instruction, input and output of three different rows, a quarter of each one's words replaced
by words drawn from the whole set; then 2% of rows are exact repeats of an earlier row and 2%
near repeats (one word dropped). Plain recombination would repeat each output ~80 times at
1M rows (near-duplicate density growing with the size); this keeps the share of
duplicates the same at every size. Written as JSON Lines, the format large sets come in (a
JSON array is parsed whole; JSON Lines and Parquet are streamed). Each size runs in
a fresh workspace (nothing cached; the built-in tokenizer comes from INSTRUCTFLOW_CACHE) as
its own `instructflow run` process, whose resident memory is sampled every 0.1 s. The issue's
targets: peak RSS <= 2.5 GB at 1,000,000 rows, and rows/s at the largest size within 1.5x of
rows/s at the smallest (cost growing linearly); rows/s here is over the five stages' seconds.
Writes bench/results/scale-<engine>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "stanford_alpaca_subsets"
FILES = ("random_9k.json", "cherry_alpaca_5_percent.json")
STAGES = ("download", "validate", "augment", "split", "tokenize")


def make_rows(n: int, seed: int = 0) -> Iterator[dict[str, str]]:
    rows = [r for name in FILES for r in json.loads((DATA / name).read_text(encoding="utf-8"))]
    words = sorted({w for r in rows for k in ("instruction", "output") for w in r[k].split()})
    rng = random.Random(seed)

    def vary(text: str) -> str:
        parts = text.split(" ")
        for i in rng.sample(range(len(parts)), len(parts) // 4):
            parts[i] = rng.choice(words)
        return " ".join(parts)

    made: list[dict[str, str]] = []  # a ring of the last 10,000 rows, for repeats
    for k in range(n):
        u = rng.random()
        if made and u < 0.02:
            row = dict(rng.choice(made))
        elif made and u < 0.04:
            row = dict(rng.choice(made))
            out = row["output"].split(" ")
            out.pop(rng.randrange(len(out)))
            row["output"] = " ".join(out)
        else:
            a, b, c = rng.choice(rows), rng.choice(rows), rng.choice(rows)
            row = {"instruction": vary(a["instruction"]), "input": vary(b["input"])}
            row["output"] = vary(c["output"])
        if len(made) < 10_000:
            made.append(row)
        else:
            made[k % 10_000] = row
        yield row


def run_once(data: Path, home: Path, engine: str) -> dict:
    """Wall time, peak RSS (bytes) and per-stage seconds of one `--until tokenize` run."""
    import psutil

    summary = home / "summary.json"
    cmd = [sys.executable, "-m", "instructflow.cli", "--home", str(home), "run", "-c", "demo"]
    cmd += ["--set", f"data.source={data}", "--set", f"engine={engine}", "--until", "tokenize"]
    cmd += ["--plain", "--summary-json", str(summary)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {err[-2000:]}")
    stages = json.loads(summary.read_text())["stages"]
    subprocess.run([sys.executable, "-m", "instructflow.cli", "--home", str(home), "server",
                    "stop"], capture_output=True)  # fmt: skip
    return {"wall": wall, "peak": peak, "stages": {s: stages[s]["seconds"] for s in STAGES}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="25000,100000")
    ap.add_argument("--engine", choices=["local", "ray"], default="local")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        for n in sizes:
            data = Path(tmp) / f"rows-{n}.jsonl"
            with open(data, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(row) + "\n" for row in make_rows(n))
            results[n] = run_once(data, Path(tmp) / f"home-{n}", args.engine)
            print(n, json.dumps(results[n]), flush=True)
    first, last = results[sizes[0]], results[sizes[-1]]
    # rows/s over the stages' own seconds: the process start (~15-20 s: imports, the
    # workspace's Prefect server) does not grow with rows and would flatter large sizes.
    rate = {n: n / sum(r["stages"].values()) for n, r in results.items()}
    md = [
        f"`python bench/scale.py --sizes {args.sizes} --engine {args.engine}`, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}",
        "",
        "| rows | "
        + " | ".join(f"{s} (s)" for s in STAGES)
        + " | wall (s) | rows/s (stages) | peak RSS |",
        "|---|" + "---|" * (len(STAGES) + 3),
    ]
    for n, r in results.items():
        secs = " | ".join(f"{r['stages'][s]:.1f}" for s in STAGES)
        md.append(
            f"| {n:,} | {secs} | {r['wall']:.0f} | {rate[n]:,.0f} | {r['peak'] / 2**30:.2f} GB |"
        )
    slowdown = rate[sizes[0]] / rate[sizes[-1]]
    md += [
        "",
        f"rows/s at {sizes[0]:,} / rows/s at {sizes[-1]:,}: **{slowdown:.2f}x** (target <= 1.5x); "
        f"peak RSS {first['peak'] / 2**30:.2f} -> {last['peak'] / 2**30:.2f} GB "
        "(target <= 2.5 GB at 1,000,000 rows).",
    ]
    out = ROOT / "bench" / "results" / f"scale-{args.engine}.md"
    out.write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md))


if __name__ == "__main__":
    main()
