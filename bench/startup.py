"""Start-up cost of a run: Prefect's per-run ephemeral API (how runs started before) vs the
workspace's own Prefect server (started once, reused), on the same workspace, in one run.

    python bench/startup.py [--repeats 3]

It runs `make demo`'s pipeline once to fill the workspace (the pre-trained base comes from
the per-user cache), then times, as wall clock of the whole `instructflow run` process:
- a fully cached re-run of the demo with `INSTRUCTFLOW_PREFECT_SERVER=0` (ephemeral API,
  the baseline) and with the workspace server already running;
- the first run's server start;
- a run whose data file is missing (reported before anything starts).
Writes bench/results/startup.md.
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


def timed(home: Path, *args: str, ephemeral: bool = False) -> tuple[float, dict | None, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL",)}
    if ephemeral:
        env["INSTRUCTFLOW_PREFECT_SERVER"] = "0"
    summary = home.parent / "summary.json"
    summary.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "instructflow.cli", "--home", str(home), "run", "--plain"]
    cmd += ["--summary-json", str(summary), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    data = json.loads(summary.read_text()) if summary.is_file() else None
    return seconds, data, proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each kind (best counts)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "startup.md"))
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="bench-startup-")) / "home"
    print("filling the workspace: one full demo run (its server start is timed)", flush=True)
    first, data, err = timed(home)
    assert data and data["stages"]["register"]["state"] == "Completed", err[-2000:]
    results: dict[str, list[float]] = {"ephemeral API": [], "workspace server": []}
    for _ in range(args.repeats):
        for name in results:
            seconds, data, err = timed(home, ephemeral=name == "ephemeral API")
            states = {s["state"] for s in data["stages"].values()} if data else {"none"}
            assert states <= {"Cached", "Completed"}, err[-2000:]
            assert all(
                s["state"] == "Cached" for k, s in data["stages"].items() if k != "register"
            ), data["stages"]
            results[name].append(seconds)
            print(f"{name}: cached re-run {seconds:.1f} s", flush=True)
    missing = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "instructflow.cli", "--home", str(home), "run", "--set",
             "data.source=/nonexistent/data.jsonl"],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        missing.append(time.perf_counter() - t0)
        assert proc.returncode == 2 and "no such file" in proc.stderr
    subprocess.run(
        [sys.executable, "-m", "instructflow.cli", "--home", str(home), "server", "stop"],
        cwd=ROOT,
        capture_output=True,
    )

    base = min(results["ephemeral API"])
    ours = min(results["workspace server"])
    lines = [
        "# Start-up: ephemeral Prefect API per run vs the workspace's Prefect server",
        "",
        f"Command: `python bench/startup.py --repeats {args.repeats}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; wall "
        "clock of the whole `instructflow run` process (Python start, imports, Prefect API, "
        "MLflow run, every stage Cached, register `unchanged`), best of "
        f"{args.repeats} [median].",
        "",
        "| run | ephemeral API (before) | workspace server | ratio |",
        "|---|---:|---:|---:|",
        f"| fully cached re-run of the demo | {base:.1f} s "
        f"[{statistics.median(results['ephemeral API']):.1f}] | {ours:.1f} s "
        f"[{statistics.median(results['workspace server']):.1f}] | {base / ours:.1f}x |",
        f"| a missing data file reported | - | {min(missing):.2f} s | - |",
        f"| first run of a new workspace (full demo, server start included) | - | "
        f"{first:.0f} s | - |",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
