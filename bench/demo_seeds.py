"""Does the demo's figure hang on one lucky pre-training? `make demo`'s fine-tune on bases
pre-trained with different seeds (and, optionally, thread counts), same data and recipe.

    python bench/demo_seeds.py [--seeds 0,1,2,3] [--threads 0] [--steps N]

For each seed, builtin:tiny is pre-trained with `RECIPE["seed"] = seed` (cached per user like
the default base; seed 0 *is* the default base), then the demo config runs on it
(`model.name_or_path` = that bundle's model folder; judge and registry off, they do not change
the fine-tune) in a fresh workspace. `--threads N` pins torch to N threads for pre-training and
fine-tuning (0: torch's default): float sums are ordered by the thread count, so a base built
on another machine differs in its last bits, and this shows whether that matters.
Writes bench/results/demo_seeds.md: tuned and base exact match, per task, perplexities.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ("capital", "opposite", "plural", "uppercase")


def pretrained_base(seed: int) -> Path:
    from instructflow.builtin import model as builtin

    bundle, cached = builtin.ensure_pretrained(
        builtin.cached_tokenizer_dir(), recipe={"seed": seed}
    )
    print(f"seed {seed}: base {'cached' if cached else 'pre-trained'} at {bundle}", flush=True)
    return bundle / "model"


def finetune(
    base: Path | None, steps: int | None, threads: int, extra: list[str]
) -> tuple[dict, float]:
    home = Path(tempfile.mkdtemp(prefix="bench-seeds-")) / "home"
    summary = home.parent / "summary.json"
    cmd = [sys.executable, "-m", "instructflow.cli", "--home", str(home), "run", "--plain"]
    cmd += ["-c", "demo", "--summary-json", str(summary)]
    cmd += ["--set", "judge.backend=none", "--set", "register.enabled=false"]
    if base is not None:
        cmd += ["--set", f"model.name_or_path={base}"]
    if steps:
        cmd += ["--set", f"train.max_steps={steps}"]
    for item in extra:
        cmd += ["--set", item]
    # Prefect's per-run API: no workspace server is left behind by these throwaway workspaces.
    env = {**os.environ, "INSTRUCTFLOW_PREFECT_SERVER": "0"}
    env.pop("PREFECT_API_URL", None)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    return json.loads(summary.read_text())["metrics"], seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps (default: config)")
    ap.add_argument("--set", action="append", default=[], help="config override for the runs")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "demo_seeds.md"))
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        base = pretrained_base(seed)
        m, seconds = finetune(base, args.steps, args.threads, args.set)
        row = {
            "seed": seed,
            "em": m["evaluate/exact_match"],
            "em_base": m["evaluate/base/exact_match"],
            "tasks": [m[f"evaluate/em/{t}"] for t in TASKS],
            "ppl": m["evaluate/perplexity"],
            "ppl_base": m["evaluate/base/perplexity"],
            "seconds": seconds,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    ems = [r["em"] for r in rows]
    import torch
    import transformers

    lines = [
        "# The demo over pre-training seeds (`python bench/demo_seeds.py "
        f"--seeds {args.seeds} --threads {args.threads}"
        + "".join(f" --set {s}" for s in args.set)
        + "`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; threads: "
        f"{args.threads or 'torch default'}; {time.strftime('%Y-%m-%d')}.",
        "",
        "| pre-training seed | tuned EM | base EM | capital / opposite / plural / uppercase "
        "| perplexity tuned (base) | fine-tune run, s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        tasks = " / ".join(f"{v:.2f}" for v in r["tasks"])
        lines.append(
            f"| {r['seed']} | {r['em']:.2f} | {r['em_base']:.2f} | {tasks} "
            f"| {r['ppl']:.2f} ({r['ppl_base']:,.0f}) | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        f"Tuned exact match: mean {statistics.mean(ems):.2f}, range {min(ems):.2f}-{max(ems):.2f} "
        f"over {len(ems)} seeds.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
