"""`instructflow sweep`: the lecture's method table, measured by the pipeline itself.

One `instructflow run` per method, each in its own process (a clean peak-memory figure, and a
method that crashes cannot take the others down), all in one workspace: the data stages run
for the first method and are Cached for the rest; only train and evaluate run per method.
Every run is an MLflow child of the sweep's own run, which holds the table (markdown, JSON
table), the quality-vs-trainable-share plot, and per-method metrics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from instructflow import workspace
from instructflow.config import PipelineConfig
from instructflow.pipeline import SWEEP_PARENT_ENV
from instructflow.training import methods

OUTPUT_NEUTRAL = True
DATA_STAGES = ("download", "validate", "augment", "split", "tokenize")
# (key, header, format) of the table, in the lecture's order: cost, then quality, then speed.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("method", "method", "{}"),
    ("status", "status", "{}"),
    ("trainable_parameters", "trainable params", "{:,.0f}"),
    ("trainable_percent", "% of model", "{:.3g}"),
    ("peak_memory_mb", "peak memory (MB)", "{:,.0f}"),
    ("train_tokens_per_s", "train tokens/s", "{:,.0f}"),
    ("train_time_s", "train time (s)", "{:.1f}"),
    ("saved_mb", "saved size (MB)", "{:.3g}"),
    ("perplexity", "test ppl", "{:.3g}"),
    ("exact_match", "exact match", "{:.2f}"),
    ("rougeL", "ROUGE-L", "{:.3f}"),
    ("judge_win_rate", "judge win rate", "{:.2f}"),
    ("generation_tokens_per_s", "gen tokens/s", "{:,.0f}"),
    ("run_wall_s", "run wall (s)", "{:.0f}"),
)


def method_overrides(cfg: PipelineConfig, names: list[str]) -> list[dict[str, Any]]:
    """The train.method value per name: its knobs from sweep.methods, else from train.method
    when that is the same method, else the method's defaults. (A bare name in sweep.methods
    sets no knobs: it means the method as train.method configures it, if it does.)"""
    chosen = {m.name: m for m in cfg.sweep.methods if m.model_fields_set - {"name"}}
    out = []
    for name in names:
        methods.get(name)  # an unknown name fails before anything runs
        if name in chosen:
            knobs = chosen[name]
        elif cfg.train.method.name == name:
            knobs = cfg.train.method
        else:
            knobs = methods.get(name).config()
        out.append(knobs.model_dump(mode="json"))
    return out


def default_names(cfg: PipelineConfig) -> list[str]:
    return [m.name for m in cfg.sweep.methods] or list(methods.METHODS)


def _artifact_json(stage: str, digest: str | None, name: str) -> dict[str, Any]:
    if not digest:
        return {}
    path = workspace.artifacts_dir() / stage / digest / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def method_row(method: str, summary: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """One table row from a run's summary and the artifacts it names."""
    stages = summary.get("stages", {})
    row: dict[str, Any] = {
        "method": method,
        "status": "failed" if summary.get("error") else "ok",
        "error": summary.get("error"),
        "mlflow_run_id": summary.get("mlflow_run_id"),
        "run_wall_s": wall_s,
        "cached_stages": [s for s, r in stages.items() if r.get("state") == "Cached"],
    }
    train = _artifact_json("train", stages.get("train", {}).get("artifact_digest"), "train.json")
    m = train.get("metrics", {})
    if m:
        row.update(
            trainable_parameters=m.get("trainable_parameters"),
            total_parameters=m.get("total_parameters"),
            trainable_percent=m.get("trainable_percent"),
            peak_memory_mb=m["peak_memory_bytes"] / 2**20 if m.get("peak_memory_bytes") else None,
            train_tokens_per_s=m.get("mean_useful_tokens_per_s"),
            train_time_s=m.get("train_runtime_s"),
            saved_mb=m["saved_bytes"] / 1e6 if m.get("saved_bytes") else None,
        )
    report = _artifact_json(
        "evaluate", stages.get("evaluate", {}).get("artifact_digest"), "report.json"
    )
    e = report.get("metrics", {})
    if e:
        row.update(
            perplexity=e.get("perplexity"),
            exact_match=e.get("exact_match"),
            rougeL=e.get("rougeL"),
            generation_tokens_per_s=e.get("generation_tokens_per_s"),
            base={k[: -len("_base")]: v for k, v in e.items() if k.endswith("_base")},
        )
        judge = report.get("judge", {})
        if "win_rate" in e:
            # An untrusted judge's figure is not shown as if it measured something.
            row["judge_win_rate"] = e["win_rate"] if judge.get("usable") else None
            row["judge_note"] = None if judge.get("usable") else "untrusted"
    return row


def base_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The untuned base on the same test rows (evaluate's `_base` figures), for reference."""
    for r in rows:
        if r.get("base"):
            b = r["base"]
            return {
                "method": "(base, untuned)",
                "status": "reference",
                "trainable_parameters": 0,
                "perplexity": b.get("perplexity"),
                "exact_match": b.get("exact_match"),
                "rougeL": b.get("rougeL"),
                "generation_tokens_per_s": b.get("generation_tokens_per_s"),
            }
    return None


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if key == "judge_win_rate" and value is None and row.get("judge_note"):
        return row["judge_note"]
    if value is None:
        return "—"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |")
    for r in rows:
        if r.get("error"):
            lines.append(f"\n{r['method']} failed: {r['error']}")
    return "\n".join(lines)


def run_method(
    config_path: str | None,
    overrides: list[str],
    method: dict[str, Any],
    parent_run_id: str,
    until: str | None,
    echo: Callable[[str], None],
) -> tuple[dict[str, Any], float]:
    """`instructflow run` for one method in a child process: (its summary, wall seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        summary_path = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "instructflow.cli", "run", "--plain"]
        cmd += ["--summary-json", str(summary_path)]
        if config_path:
            cmd += ["-c", config_path]
        for item in [*overrides, f"train.method={json.dumps(method)}"]:
            cmd += ["--set", item]
        if until:
            cmd += ["--until", until]
        env = {**os.environ, SWEEP_PARENT_ENV: parent_run_id}
        started = time.perf_counter()
        # Its own session: a Ctrl-C reaches the sweep alone, which passes exactly one SIGINT
        # on (the child's first signal = finish the step, checkpoint, stop; a second = at once).
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        tail: list[str] = []
        try:
            for line in proc.stdout:
                echo(line.rstrip())
                tail = (tail + [line.rstrip()])[-20:]
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            try:
                for line in proc.stdout:
                    echo(line.rstrip())
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        wall = time.perf_counter() - started
        if rc == 130:
            raise KeyboardInterrupt
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError):
            errors = [t for t in tail if t.startswith("error:")] or tail or ["no output"]
            summary = {"error": f"exit {rc}: {errors[-1]}"}
        if rc != 0 and not summary.get("error"):
            summary["error"] = f"exit {rc}"
    return summary, wall


def log_parent(run_id: str, rows: list[dict[str, Any]], table: str) -> None:
    """The sweep's own MLflow run: the table (markdown + MLflow table), the plot, and each
    method's figures as `<method>/<column>` metrics."""
    from mlflow.tracking import MlflowClient

    from instructflow import plots

    client = MlflowClient()
    numeric = [k for k, _, f in COLUMNS if f != "{}"]
    for r in rows:
        prefix = "base" if r["status"] == "reference" else r["method"]
        for k in numeric:
            if isinstance(r.get(k), int | float):
                client.log_metric(run_id, f"{prefix}/{k}", float(r[k]))
    columns = {k: [r.get(k) for r in rows] for k, _, _ in COLUMNS}
    columns["error"] = [r.get("error") for r in rows]
    client.log_table(run_id, data=columns, artifact_file="sweep/method_table.json")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "method_table.md").write_text(table + "\n", encoding="utf-8")
        plots.method_tradeoff(rows, Path(tmp) / "quality_vs_trainable.png")
        client.log_artifacts(run_id, tmp, "sweep")
    client.set_tag(run_id, "mlflow.note.content", table)
