"""Every plot a stage writes, with matplotlib's object API (a `Figure` per plot, rendered by
the Agg canvas): no pyplot state and no global backend switch, so plotting from a stage never
changes what a user's own matplotlib session does."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(fig, path: Path, dpi: int) -> None:
    fig.tight_layout()
    # No version stamp in the file: equal data gives byte-equal artifacts.
    fig.savefig(path, dpi=dpi, metadata={"Software": None})


def loss_curve(series: dict[str, list[list[float]]], path: Path) -> None:
    """Training loss per step, with validation loss points when there are some."""
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    for name in ("loss", "eval_loss"):
        if series.get(name):
            steps, values = zip(*series[name], strict=True)
            ax.plot(steps, values, marker="." if name == "eval_loss" else None, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path, 100)


def text_lengths(prompt: Sequence[int], output: Sequence[int], path: Path) -> None:
    """Histograms of prompt and output lengths in characters (the validate stage's rows)."""
    fig = _figure(9, 3.5)
    for k, (label, values) in enumerate((("prompt", prompt), ("output", output))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.hist(values, bins=50, color="tab:blue" if k == 0 else "tab:orange")
        ax.set_title(f"{label} length (chars), n={len(values)}")
        ax.set_xlabel("characters")
        ax.set_ylabel("rows")
    _save(fig, path, 80)


def token_lengths(per_split: dict[str, Sequence[int]], max_length: int, path: Path) -> None:
    """Histogram of tokens per example for each split, with the max_length cut."""
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    for name, lengths in per_split.items():
        if len(lengths):
            ax.hist(lengths, bins=40, alpha=0.6, label=f"{name} ({len(lengths)})")
    ax.axvline(max_length, color="k", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.legend()
    _save(fig, path, 100)


def score_histograms(columns: dict[str, list[Any]], path: Path) -> None:
    """Per-example BLEU, ROUGE-L and judge score, fine-tuned vs base (panels with data only)."""
    panels = [("bleu", "BLEU"), ("rougeL", "ROUGE-L F1"), ("judge_score", "judge score (1-10)")]
    panels = [p for p in panels if any(v is not None for v in columns.get(p[0], []))]
    fig = _figure(4.2 * len(panels), 3.2)
    for i, (key, title) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        for suffix, label in (("", "fine-tuned"), ("_base", "base")):
            values = [v for v in columns.get(key + suffix, []) if v is not None]
            if values:
                ax.hist(values, bins=20, alpha=0.6, label=label)
        ax.set_title(title)
        ax.legend()
    _save(fig, path, 90)


def base_vs_tuned(metrics: dict[str, Any], path: Path) -> bool:
    """Each score of the base and the fine-tuned model side by side, numbers printed on the
    bars (a base's 0.00 shows as "0.00", not as an empty chart); perplexity on its own axis
    (lower is better, another scale). False, and no file, when the base was not evaluated."""
    scores = [("exact_match", "exact match"), ("exact_match_normalized", "EM normalized")]
    scores += [("rougeL", "ROUGE-L F1"), ("bertscore_f1", "BERTScore F1")]
    scores += [(k, f"EM {k[3:]}") for k in sorted(metrics) if k.startswith("em.")]
    scores = [
        (k, label)
        for k, label in scores
        if not k.endswith("_base") and _finite(metrics.get(k)) and _finite(metrics.get(k + "_base"))
    ]
    if not scores:
        return False
    perplexity = _finite(metrics.get("perplexity")) and _finite(metrics.get("perplexity_base"))
    fig = _figure(9 if perplexity else 6.5, 0.5 * len(scores) + 1.4)
    grid = fig.add_gridspec(1, 2, width_ratios=[3, 1]) if perplexity else fig.add_gridspec(1, 1)
    ax = fig.add_subplot(grid[0])
    rows = range(len(scores))
    for offset, (suffix, label, color) in enumerate(
        (("_base", "base", "#9e9e9e"), ("", "fine-tuned", "#1f77b4"))
    ):
        values = [metrics[k + suffix] for k, _ in scores]
        y = [r + (offset - 0.5) * 0.38 for r in rows]
        bars = ax.barh(y, values, height=0.36, label=label, color=color)
        ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=8)
    ax.set_yticks(list(rows), [label for _, label in scores])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_title("base vs fine-tuned (higher is better)")
    ax.legend(loc="lower right", fontsize=8)
    if perplexity:
        pax = fig.add_subplot(grid[1])
        values = [metrics["perplexity_base"], metrics["perplexity"]]
        bars = pax.bar(["base", "fine-tuned"], values, color=["#9e9e9e", "#1f77b4"])
        pax.bar_label(bars, fmt="%.4g", padding=2, fontsize=8)
        pax.set_yscale("log")
        pax.set_title("perplexity\n(lower is better)")
    _save(fig, path, 100)
    return True


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def method_tradeoff(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Quality against the share of trained parameters, one point per method (the sweep)."""
    fig = _figure(6.5, 4)
    ax = fig.add_subplot()
    for metric, marker in (("exact_match", "o"), ("rougeL", "^")):
        points = [
            (r["trainable_percent"], r[metric], r["method"])
            for r in rows
            if r.get("trainable_percent") and r.get(metric) is not None
        ]
        if not points:
            continue
        xs, ys, names = zip(*points, strict=True)
        ax.scatter(xs, ys, marker=marker, label=metric)
        if metric != "exact_match":
            continue
        # One label per method; a label near an earlier one (LoRA and QLoRA share x) goes
        # a line lower.
        placed: list[tuple[float, float]] = []
        for x, y, name in sorted(points, key=lambda p: -p[1]):
            near = sum(abs(math.log10(x / px)) < 0.2 and abs(y - py) < 0.1 for px, py in placed)
            placed.append((x, y))
            ax.annotate(
                name, (x, y), textcoords="offset points", xytext=(6, -3 - 9 * near), fontsize=7
            )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel("test score")
    ax.set_ylim(-0.02, 1.02)
    if ax.collections:
        ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    _save(fig, path, 100)


def compression(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """The distill report: test quality and generation speed of teacher and students."""
    fig = _figure(8, 3.5)
    quality, speed = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    names = [f"{r['model']}\n{r['parameters'] / 1e6:.2f}M" for r in rows]
    at = list(range(len(rows)))
    for offset, metric in ((-0.2, "exact_match"), (0.2, "rougeL")):
        values = [r.get(metric) or 0.0 for r in rows]
        quality.bar([x + offset for x in at], values, width=0.4, label=metric)
    quality.set_xticks(at, names, fontsize=7)
    quality.set_ylim(0, 1.05)
    quality.set_ylabel("test score")
    quality.legend(fontsize=7)
    speed.bar(at, [r.get("generation_tokens_per_s") or 0.0 for r in rows], width=0.5)
    speed.set_xticks(at, names, fontsize=7)
    speed.set_ylabel("generated tokens/s")
    for ax in (quality, speed):
        ax.grid(alpha=0.3, axis="y")
    _save(fig, path, 100)
