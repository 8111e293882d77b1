"""Benchmark: near-duplicate search (validate) and decontamination (split), exact vs MinHash +
LSH, on Alpaca-like rows at growing sizes.

    python bench/near_duplicates.py [--sizes 25000,100000] [--exact-max 100000]

Rows: random recombinations (instruction, input, output of three different rows) of the
12,340 shared Stanford Alpaca rows, seeded, plus a planted near copy (one word dropped) of
every 50th row, so there is something to find. Per size: tasks.validate.near_duplicates with
the exact search and with lsh_min_rows=2 (same process, same texts), their agreement, and
tasks.split.decontaminate of 85 % against 15 % both ways. Exact runs only up to --exact-max
(it is quadratic). Writes bench/results/near_duplicates.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "datasets" / "stanford_alpaca_subsets"
FILES = ("random_9k.json", "cherry_alpaca_5_percent.json")


def make_texts(n: int, seed: int = 0) -> tuple[list[str], int]:
    rows = [r for name in FILES for r in json.loads((DATA / name).read_text(encoding="utf-8"))]
    rng = random.Random(seed)
    texts, planted = [], 0
    while len(texts) < n:
        a, b, c = rng.choice(rows), rng.choice(rows), rng.choice(rows)
        text = f"user: {a['instruction']}\n{b['input']}\nassistant: {c['output']}"
        texts.append(text)
        if len(texts) % 50 == 0 and len(texts) < n:
            words = text.split(" ")
            if len(words) > 20:
                words.pop(rng.randrange(1, len(words)))
                texts.append(" ".join(words))
                planted += 1
    return texts[:n], planted


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    from tasks.split import decontaminate
    from tasks.validate import near_duplicates

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="25000,100000")
    ap.add_argument("--exact-max", type=int, default=100_000)
    args = ap.parse_args()
    lines = []
    for n in [int(s) for s in args.sizes.split(",")]:
        texts, planted = make_texts(n)
        lsh, t_lsh = timed(lambda t=texts: near_duplicates(t, 0.95, lsh_min_rows=2))
        row = {"rows": n, "planted": planted, "lsh_s": t_lsh, "lsh_found": len(lsh)}
        cut = int(0.85 * n)
        answer = {"role": "assistant", "content": "-"}
        rows = [{"messages": [{"role": "user", "content": t}, answer]} for t in texts]
        train, held = rows[:cut], rows[cut:]
        (_, dropped_lsh), t_dl = timed(lambda: decontaminate(train, held, 0.9, 2))  # noqa: B023
        row.update(decon_lsh_s=t_dl, decon_lsh=len(dropped_lsh))
        if n <= args.exact_max:
            exact, t_exact = timed(lambda t=texts: near_duplicates(t, 0.95))
            (_, dropped_ex), t_de = timed(lambda: decontaminate(train, held, 0.9))  # noqa: B023
            row.update(
                exact_s=t_exact,
                exact_found=len(exact),
                agree=exact == lsh,
                decon_exact_s=t_de,
                decon_exact=len(dropped_ex),
                decon_agree=[id(r) for r in dropped_ex] == [id(r) for r in dropped_lsh],
            )
        print(json.dumps(row), flush=True)
        lines.append(row)

    def cell(r, k, fmt="{:.1f}"):
        return fmt.format(r[k]) if k in r else "—"

    md = [
        f"Near-duplicate search, {platform.machine()} {platform.processor() or ''}, "
        f"{time.strftime('%Y-%m-%d')}, `python bench/near_duplicates.py --sizes {args.sizes} "
        f"--exact-max {args.exact_max}` (the exact search skipped above --exact-max)",
        "",
        "| rows | planted copies | dedup exact (s) | dedup LSH (s) | found exact / LSH | "
        "same pairs | decontam. exact (s) | decontam. LSH (s) | dropped exact / LSH | same rows |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in lines:
        md.append(
            f"| {r['rows']:,} | {r['planted']:,} | {cell(r, 'exact_s')} | {r['lsh_s']:.1f} | "
            f"{cell(r, 'exact_found', '{:,}')} / {r['lsh_found']:,} | {cell(r, 'agree', '{}')} | "
            f"{cell(r, 'decon_exact_s')} | {r['decon_lsh_s']:.1f} | "
            f"{cell(r, 'decon_exact', '{:,}')} / {r['decon_lsh']:,} | "
            f"{cell(r, 'decon_agree', '{}')} |"
        )
    out = ROOT / "bench" / "results" / "near_duplicates.md"
    out.write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md))


if __name__ == "__main__":
    main()
