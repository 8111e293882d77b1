"""What each stage produced, as Prefect artifacts: the flow run's page tells the night's story.

The Prefect UI showed flow and task runs with one log line per stage; whether last night's run
was any good took a trip to MLflow. Each stage now publishes a short markdown artifact (its
state, seconds, summary and figures; evaluate's base-vs-tuned table; register's gate decision
and reasons; the MLflow run), keyed by stage so the Artifacts page also shows each stage's
history over the nights, and the run ends with a summary of every stage. Publishing is a
courtesy: a Prefect API that refuses it costs a warning, never the run.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from instructflow import mlflow_view
from instructflow.artifacts import ArtifactRef

# Reporting never changes a stage's output (instructflow.codeid).
OUTPUT_NEUTRAL = True
MAX_ROWS = 40
# The judge's figures (evaluate's metrics and counts): no signal when the judge is untrusted.
JUDGE_FIGURES = ("judge_", "win_rate", "wins", "ties", "losses")
log = logging.getLogger(__name__)


def key(name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for a stage name."""
    return "instructflow-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _value(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v).replace("|", "/")
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def figures_table(
    metrics: dict[str, Any], figures: dict[str, Any], flags: dict[str, str] | None = None
) -> list[str]:
    """Markdown rows: metrics with a `_base` twin as base | fine-tuned, the rest as value.
    `flags`: {name prefix: why it carries no signal}, shown beside those names."""
    values = {**figures, **metrics}
    flags = flags or {}

    def label(k: str) -> str:
        why = next((w for prefix, w in flags.items() if k.startswith(prefix)), "")
        return f"{k} ({why})" if why else k

    twins = [k for k in values if f"{k}_base" in values]
    lines = []
    if twins:
        lines += ["| metric | base | fine-tuned |", "|---|---|---|"]
        lines += [
            f"| {label(k)} | {_value(values[f'{k}_base'])} | {_value(values[k])} |" for k in twins
        ]
        lines.append("")
    rest = [k for k in values if k not in twins and k.removesuffix("_base") not in twins]
    if rest:
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {label(k)} | {_value(values[k])} |" for k in rest[:MAX_ROWS]]
        if len(rest) > MAX_ROWS:
            lines.append(f"| … | {len(rest) - MAX_ROWS} more in MLflow |")
    return lines


def _notes(ref: ArtifactRef, flags: dict[str, str], gate: bool = True) -> list[str]:
    """What the figures alone would hide: an untrusted judge, a BLEU that measures nothing (both
    also added to `flags`), the gate's decision and reasons."""
    notes = []
    bleu = ref.meta.get("tags", {}).get("instructflow.bleu_note")
    if bleu:
        notes.append(f"**BLEU carries no signal here**: {bleu}")
        flags["bleu"] = "no signal"
    if ref.stage == "evaluate" and ref.file("report.json").is_file():
        judge = json.loads(ref.file("report.json").read_text()).get("judge", {})
        if judge.get("status") and not judge.get("usable", True):
            notes.append(f"**Judge untrusted, its scores not used**: {judge.get('status', '')}")
            flags.update(dict.fromkeys(JUDGE_FIGURES, "untrusted judge"))
    if gate and ref.file("decision.json").is_file():
        decision = json.loads(ref.file("decision.json").read_text())
        verdict = "promoted to champion" if decision.get("promoted") else "not promoted"
        if decision.get("version") is None:
            verdict = "nothing registered"
        notes.append(f"**Gate**: {verdict}")
        notes += [f"- {reason}" for reason in decision.get("reasons", [])]
    return notes


def comparison_markdown(ref: ArtifactRef) -> list[str]:
    """Evaluate's base | fine-tuned rows with their no-signal labels and notes (the MLflow
    run's description shows them: its UI draws a base's 0.00 as an empty chart)."""
    flags: dict[str, str] = {}
    notes = _notes(ref, flags, gate=False)
    metrics = ref.meta.get("metrics", {})
    twins = {k: v for k, v in metrics.items() if f"{k}_base" in metrics or k.endswith("_base")}
    return [*notes, "", *figures_table(twins, {}, flags)] if twins else []


def stage_markdown(name: str, state: str, seconds: float, ref: ArtifactRef, mlflow: str) -> str:
    meta = ref.meta
    flags: dict[str, str] = {}
    notes = _notes(ref, flags)
    lines = [
        f"### {name}: {state} in {seconds:.1f} s",
        "",
        meta.get("summary", "") or "",
        "",
        *notes,
        "",
        *figures_table(meta.get("metrics", {}), meta.get("figures", {}), flags),
        "",
        f"Artifact `{ref.digest[:16]}` · {mlflow}",
    ]
    return "\n".join(lines)


def mlflow_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where the run is in the MLflow UI (a tracking server's own address, else the one
    `instructflow ui` serves by default)."""
    remote = tracking_uri.startswith(("http://", "https://"))
    base = tracking_uri.rstrip("/") if remote else "http://127.0.0.1:5000"
    link = f"[MLflow run {run_id[:8]}]({mlflow_view.run_url(base, experiment_id, run_id)})"
    return link if remote else f"{link} (`instructflow ui`)"


def publish(name: str, markdown: str, description: str) -> None:
    """A markdown artifact on the current flow run; a warning if Prefect refuses it."""
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown, key=key(name), description=description)
    except Exception as exc:  # a report, not a result: the run goes on
        log.warning("could not publish the %s report to Prefect: %s", name, exc)
