"""What a finished run prints about its evaluation: base vs fine-tuned, per task, and a few
test prompts with both models' answers side by side (from the evaluate artifact's report)."""

from __future__ import annotations

import json
from typing import Any

from instructflow import workspace

HEADLINE = (
    ("perplexity", "perplexity (lower is better)", "{:.2f}"),
    ("exact_match", "exact match", "{:.2f}"),
    ("rougeL", "ROUGE-L F1", "{:.3f}"),
)


def load_report(digest: str) -> dict[str, Any] | None:
    path = workspace.artifacts_dir() / "evaluate" / digest / "report.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _clip(text: str | None, width: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def tables(report: dict[str, Any]) -> list[Any]:
    """Rich renderables: the headline table, the per-group table, the side-by-side examples."""
    from rich.table import Table

    metrics = report.get("metrics", {})
    n = int(metrics.get("test_examples", 0))
    has_base = "exact_match_base" in metrics
    out: list[Any] = []

    head = Table(title=f"evaluation on {n} held-out test rows", title_justify="left")
    head.add_column("metric")
    if has_base:
        head.add_column("base", justify="right")
    head.add_column("fine-tuned", justify="right")
    for key, label, fmt in HEADLINE:
        if key not in metrics:
            continue
        cells = [fmt.format(metrics[f"{key}_base"])] if has_base else []
        head.add_row(label, *cells, fmt.format(metrics[key]))
    out.append(head)

    groups = (report.get("groups") or {}).get("table") or {}
    if groups:
        by = report["groups"]["by"]
        table = Table(title=f"exact match per {by}", title_justify="left")
        for col in (by, "rows", *(["base"] if has_base else []), "fine-tuned"):
            table.add_column(col, justify="left" if col == by else "right")
        for key, entry in groups.items():
            base = [f"{entry['exact_match_base']:.2f}"] if has_base else []
            table.add_row(key, str(int(entry["n"])), *base, f"{entry['exact_match']:.2f}")
        out.append(table)

    examples = report.get("showcase") or []
    if examples:
        table = Table(title="test prompts, answered by both models", title_justify="left")
        for col in ("prompt", "reference", *(["base"] if has_base else []), "fine-tuned"):
            table.add_column(col, overflow="fold")
        for ex in examples:
            prompt = ex["instruction"] + (f" [{ex['input']}]" if ex.get("input") else "")
            base = [_clip(repr(ex["base"]), 40)] if has_base else []
            tuned = _clip(repr(ex["finetuned"]), 40)
            table.add_row(_clip(prompt, 48), _clip(ex["reference"], 24), *base, tuned)
        out.append(table)
    return out


def print_evaluation(console, digest: str) -> None:
    report = load_report(digest)
    if report is None:
        return
    for renderable in tables(report):
        console.print(renderable)
