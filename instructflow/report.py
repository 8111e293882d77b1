"""What a finished run prints about its evaluation: base vs fine-tuned, per task, and a few
test prompts with both models' answers side by side (from the evaluate artifact's report)."""

from __future__ import annotations

import json
from typing import Any

from instructflow import workspace

# Its code changes no stage's output (instructflow.codeid does not follow it).
OUTPUT_NEUTRAL = True

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
    """One line of at most `width` characters, escaped: data is never rich markup."""
    from rich.markup import escape

    text = " ".join(str(text or "").split())
    return escape(text if len(text) <= width else text[: width - 1] + "…")


def tables(report: dict[str, Any]) -> list[Any]:
    """Rich renderables: the headline table, the per-group table, the side-by-side examples."""
    from rich.markup import escape
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
    rows = list(HEADLINE)
    if "bleu" in metrics and not report.get("bleu_note"):  # BLEU on one-word answers is noise
        rows.append(("bleu", "BLEU", "{:.1f}"))
    if "answer_words" in metrics:
        ref_words = metrics.get("reference_words")
        of_refs = f" (references {ref_words:.1f})" if ref_words is not None else ""
        rows.append(("answer_words", f"answer length, words{of_refs}", "{:.1f}"))
    if "bertscore_f1" in metrics:
        rows.append(("bertscore_f1", "BERTScore F1", "{:.3f}"))
    for key in sorted(k for k in metrics if k.startswith("lm_eval.") and k.endswith(".acc")):
        rows.append(
            (
                key,
                f"{key.removeprefix('lm_eval.').removesuffix('.acc')} accuracy (lm-eval)",
                "{:.3f}",
            )
        )
    for key, label, fmt in rows:
        if key not in metrics:
            continue
        base = metrics.get(f"{key}_base")
        cells = [fmt.format(base) if base is not None else "-"] if has_base else []
        head.add_row(label, *cells, fmt.format(metrics[key]))
    out.append(head)
    if "bertscore_f1" in metrics and report.get("bertscore_note"):
        empty = ", ".join(
            f"{who} {int(metrics[k])}"
            for who, k in (("base", "bertscore_empty_base"), ("fine-tuned", "bertscore_empty"))
            if metrics.get(k)
        )
        note = f"BERTScore F1: {report['bertscore_note']}"
        out.append(escape(note + (f"; empty answers scored 0: {empty}" if empty else "")))
    line = judge_line(report)
    if line:
        out.append(line)

    for section in ("groups", "sources"):  # per meta.task (say), per data source
        groups = (report.get(section) or {}).get("table") or {}
        if not groups:
            continue
        by = report[section]["by"]
        table = Table(title=f"exact match per {escape(by)}", title_justify="left")
        for col in (by, "rows", *(["base"] if has_base else []), "fine-tuned"):
            table.add_column(col, justify="left" if col == by else "right")
        for key, entry in groups.items():
            base = [f"{entry['exact_match_base']:.2f}"] if has_base else []
            table.add_row(escape(key), str(int(entry["n"])), *base, f"{entry['exact_match']:.2f}")
        out.append(table)

    examples = report.get("showcase") or []
    if examples:
        table = Table(title="test prompts, answered by both models", title_justify="left")
        for col in ("prompt", "reference", *(["base"] if has_base else []), "fine-tuned"):
            table.add_column(col, overflow="fold")
        for ex in examples:
            prompt = ex["instruction"] + (f" ({ex['input']})" if ex.get("input") else "")
            base = [_clip(repr(ex["base"]), 40)] if has_base else []
            tuned = _clip(repr(ex["finetuned"]), 40)
            table.add_row(_clip(prompt, 48), _clip(ex["reference"], 24), *base, tuned)
        out.append(table)
    return out


def _interval(m: dict[str, Any], key: str) -> str:
    low, high = m.get(f"{key}_low", float("nan")), m.get(f"{key}_high", float("nan"))
    return f"{m[key]:.2f} [{low:.2f}, {high:.2f}]"


def _pairwise_figures(m: dict[str, Any], judge: dict[str, Any]) -> list[str]:
    """Win rate (tie = half), the decisive one the gate reads, and the length-controlled one
    with whether it is evidence."""
    if "win_rate" not in m:
        return []
    out = [f"win rate vs {judge.get('pairwise_opponent', 'base')} {_interval(m, 'win_rate')}"]
    tally = f"{int(m.get('wins', 0))}/{int(m.get('ties', 0))}/{int(m.get('losses', 0))} W/T/L"
    if "decisive_win_rate" in m:
        out.append(f"decisive {_interval(m, 'decisive_win_rate')} ({tally})")
    else:
        out.append(f"no decisive comparison ({tally}): a tie is not a win")
    if "win_rate_lc" in m:
        lc = f"length-controlled {_interval(m, 'win_rate_lc')}"
        if m.get("win_rate_lc_evidence") != 1.0:
            lc += f" NOT EVIDENCE ({judge.get('length_note') or 'too few comparisons'})"
        out.append(lc)
    return out


def judge_line(report: dict[str, Any]) -> str | None:
    """One line on the judge: its figures, and whether they are evidence (calibrated) or not;
    a second one when answer length alone explains the pairwise outcome."""
    from rich.markup import escape

    judge = report.get("judge") or {}
    m = report.get("metrics", {})
    if judge.get("judge_backend") in (None, "none"):
        return None
    figures = _pairwise_figures(m, judge)
    if "judge_score" in m:
        base = f" (base {m['judge_score_base']:.1f})" if "judge_score_base" in m else ""
        figures.append(f"score {m['judge_score']:.1f}/10{base}")
    if "mt_bench.overall" in m:
        base = f" (base {m['mt_bench.overall_base']:.1f})" if "mt_bench.overall_base" in m else ""
        turns = sorted(
            k.removeprefix("mt_bench.")
            for k in m
            if k.startswith("mt_bench.turn") and not k.endswith("_base")
        )
        per_turn = ", ".join(f"{t} {m[f'mt_bench.{t}']:.1f}" for t in turns)
        figures.append(f"MT-Bench-style {m['mt_bench.overall']:.1f}/10{base} ({per_turn})")
    who = escape(f"judge {judge.get('judge_model')}")
    note = judge.get("length_note") or ""
    warning = (
        f"\n[bold yellow]warning[/]: {escape(note)}" if note.startswith("length alone") else ""
    )
    if judge.get("usable"):
        status = escape(judge.get("status") or "")
        return f"{who}: {escape(', '.join(figures))} — {status}{warning}"
    return (
        f"[bold yellow]{who}: NOT EVIDENCE[/] — {escape(judge.get('status') or '')}; its "
        f"figures ({escape(', '.join(figures))}) are logged but not used by the gate{warning}"
    )


def print_evaluation(console, digest: str) -> None:
    report = load_report(digest)
    if report is None:
        return
    for renderable in tables(report):
        console.print(renderable)


def print_compression(console, digest: str) -> None:
    """The distill report's compression table (tasks/distill_report.py), as it wrote it."""
    from rich.markdown import Markdown

    path = workspace.artifacts_dir() / "distill_report" / digest / "compression.md"
    if path.is_file():
        console.print("[bold]Knowledge distillation[/]: teacher vs students on the test split")
        console.print(Markdown(path.read_text(encoding="utf-8")))
