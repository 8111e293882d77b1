"""Scoring a fine-tuned model against its base on the test split: perplexity over response
tokens only (streamed), batched greedy generation (both models), BLEU (sacrebleu), ROUGE
(rouge-score), exact match per group and per source, BERTScore, benchmark suites and the LLM
judge (instructflow.judge). The evaluate stage reads its inputs, calls `evaluate_models` and
writes what it returns; the figures' names are the ones tracking and the gate read.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from instructflow import progress, suites, templates
from instructflow.artifacts import ArtifactRef
from instructflow.config import EvaluateConfig, JudgeConfig, TokenizeConfig
from instructflow.metrics import bleu_signal_note, metric_key, per_group, text_metrics
from instructflow.rows import column
from instructflow.scoring import load_rows, score_model, scored_examples

# Counts, not quality: they go to evaluate/figures.json, not to MLflow charts.
BOOKKEEPING = (
    "test_examples",
    "wins",
    "ties",
    "losses",
    "judge_failed_single",
    "judge_failed_pairs",
    "bertscore_layer",
    "bertscore_empty",
    "bertscore_empty_base",
)


def showcase(
    rows: list[dict[str, Any]], by: str | None, ft: list[str], base: list[str] | None, n: int = 3
) -> list[dict[str, Any]]:
    """`n` test rows to print side by side: the first row of each of the first `n` groups
    (sorted), else the first `n` rows. Chosen by position, never by how well they came out."""
    picks: list[int] = []
    if by:
        first: dict[str, int] = {}
        for i, r in enumerate(rows):
            first.setdefault(column(r, by), i)
        picks = [first[k] for k in sorted(first) if k][:n]
    picks = picks or list(range(min(n, len(rows))))
    out = []
    for i in picks:
        r = rows[i]
        out.append(
            {
                "group": column(r, by) if by else "",
                "instruction": r.get("instruction", ""),
                "input": r.get("input", ""),
                "reference": templates.reference(r),
                "finetuned": ft[i],
                "base": base[i] if base is not None else None,
            }
        )
    return out


def as_columns(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Records -> {column: values} (the shape mlflow.log_table takes); missing cells None."""
    keys = dict.fromkeys(k for r in records for k in r)
    return {k: [r.get(k) for r in records] for k in keys}


@dataclass
class Evaluation:
    """What evaluate writes: report.json, examples.json (`columns`), the per-group, per-source
    and judge-calibration tables, and the suites' own tables."""

    report: dict[str, Any]
    columns: dict[str, list[Any]]
    groups: dict[str, dict[str, Any]]
    by_source: dict[str, dict[str, Any]]
    calibration_table: list[dict[str, Any]]
    judge_usable: bool
    params: dict[str, Any]
    suite_tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.report["metrics"]


def _notify(message: str) -> None:
    progress.notify("stage_progress", stage="evaluate", message=message)


def _answers(splits, tokenized, model, base, tokenize_cfg, cfg, judge_cfg):
    """(rows, tokenizer, fine-tuned answers, base answers or None, metrics so far, generated
    tokens/s per model, suite tables, scored token count): both models score and answer."""
    import torch

    from instructflow import generation, judge, loading

    rows = load_rows(splits, cfg.max_examples)
    scored = scored_examples(tokenized, cfg.max_examples)
    template = tokenize_cfg.template
    ft_model, tok = loading.load_finetuned(model, base)
    prompts = [templates.generation_prompt(r, template, tok) for r in rows]
    total = 2 * len(rows) * (2 if cfg.compare_base else 1)
    done = [0]

    def tick(message: str) -> Callable[[int, int], None]:
        base_done = done[0]

        def report(completed: int, _n: int) -> None:
            done[0] = base_done + completed
            progress.notify(
                "stage_progress", stage="evaluate", completed=done[0], total=total, message=message
            )

        return report

    def run_model(m, label: str) -> tuple[float, int, list[str]]:
        ppl, n_tok, outs, speed[label] = score_model(
            m, tok, scored, prompts, template, tokenize_cfg, cfg, tick, label
        )
        return ppl, n_tok, outs

    torch.manual_seed(cfg.seed)
    speed: dict[str, float] = {}  # generated tokens/s per model (the serving speed)
    base_out: list[str] | None = None
    metrics: dict[str, Any] = {"test_examples": len(rows)}
    # The MT-Bench-style suite is graded by the judge (calibrated below with the rest).
    grader = judge.make_backend(judge_cfg) if cfg.mt_bench else None
    suite_tables: dict[str, list[dict[str, Any]]] = {}

    def run_suites(m, label: str, suffix: str) -> None:
        if not (cfg.lm_eval_tasks or grader):
            return
        _notify(f"benchmark suites {label}")
        out = suites.run_configured(m, tok, template, cfg, grader, label)
        metrics.update({k + suffix: v for k, v in out["metrics"].items()})
        for name, table in out["tables"].items():
            suite_tables.setdefault(name, []).extend(table)

    if cfg.compare_base:
        # A PEFT model is its base with the adapter switched off: no second copy in memory.
        # The base goes first: the fine-tuned pass then folds the adapter into these weights.
        if hasattr(ft_model, "disable_adapter"):
            base_model, ctx = ft_model, ft_model.disable_adapter()
        else:
            base_model, ctx = loading.load_base_model(base, dtype=torch.float32), nullcontext()
        with ctx:
            metrics["perplexity_base"], _, base_out = run_model(base_model, "base")
            run_suites(base_model, "base", "_base")
        del base_model
    ft_model = generation.fold_adapter(ft_model)
    metrics["perplexity"], n_tokens, ft_out = run_model(ft_model, "fine-tuned")
    run_suites(ft_model, "finetuned", "")
    if grader is not None:
        grader.close()
    # Free the evaluated model(s) before the judge loads its own (the hf backend).
    del ft_model
    gc.collect()
    return rows, tok, ft_out, base_out, metrics, speed, suite_tables, n_tokens


def _text_scores(rows, refs, asked, ft_out, base_out, metrics, speed):
    """BLEU / ROUGE / exact match into `metrics`; the per-example table's first columns."""
    auto, per = text_metrics(ft_out, refs)
    metrics.update(auto)
    metrics["reference_words"] = sum(len(r.split()) for r in refs) / max(len(refs), 1)
    metrics["generation_tokens_per_s"] = speed["fine-tuned"]
    if "base" in speed:
        metrics["generation_tokens_per_s_base"] = speed["base"]
    columns: dict[str, list[Any]] = {
        "id": [r.get("id") for r in rows],
        # For a conversation: the last user turn, and the earlier turns as a transcript.
        "instruction": [ic[0] for ic in asked],
        "input": [ic[1] for ic in asked],
        "reference": refs,
        "finetuned_output": ft_out,
        "bleu": per["bleu"],
        "rougeL": per["rougeL"],
    }
    if base_out is not None:
        auto_b, per_b = text_metrics(base_out, refs)
        metrics.update({f"{k}_base": v for k, v in auto_b.items()})
        columns.update(base_output=base_out, bleu_base=per_b["bleu"], rougeL_base=per_b["rougeL"])
    return columns


def _group_scores(rows, refs, outputs, cfg, metrics, columns):
    """Exact match per `evaluate.group_by` group and every figure per data source (several
    data.sources, tasks/mix.py) into `metrics` and `columns`; (groups, by_source)."""
    groups = per_group(rows, cfg.group_by, outputs, refs) if cfg.group_by else {}
    for key, entry in groups.items():
        for suffix in outputs:
            metrics[f"em.{metric_key(key)}{suffix}"] = entry[f"exact_match{suffix}"]
    if groups:
        columns["group"] = [column(r, cfg.group_by) for r in rows]
    by_source = per_group(rows, "source", outputs, refs) if cfg.group_by != "source" else {}
    for key, entry in by_source.items():
        for suffix in outputs:
            for figure, name in (("exact_match", "em"), ("rougeL", "rougeL")):
                metrics[f"source.{name}.{metric_key(key)}{suffix}"] = entry[f"{figure}{suffix}"]
    if by_source:
        columns["source"] = [column(r, "source") for r in rows]
    return groups, by_source


def _bertscore(model_name, refs, outputs, metrics, columns) -> None:
    from instructflow import semantic

    _notify("BERTScore")
    for suffix, outs in outputs.items():
        bs = semantic.bertscore(outs, refs, semantic.resolve(model_name))
        for part in ("precision", "recall", "f1"):
            metrics[f"bertscore_{part}{suffix}"] = bs[f"{part}_mean"]
        columns[f"bertscore_f1{suffix}"] = bs["f1"]
        metrics[f"bertscore_empty{suffix}"] = bs["empty"]
    metrics["bertscore_layer"] = bs["num_layers"]


def _judged(judge_cfg, asked, refs, ft_out, base_out, n_rows, metrics, columns):
    """The LLM judge's verdicts (pairwise against the base) into `metrics` and `columns`."""
    from instructflow import judge

    items = [judge.Item(i, c, ref) for (i, c), ref in zip(asked, refs, strict=True)]
    verdicts = judge.run_judge(judge_cfg, items, ft_out, base_out, progress=_notify)
    metrics.update(verdicts.metrics)
    if verdicts.status and not verdicts.usable:
        progress.notify("warning", stage="evaluate", message=verdicts.status)
    if verdicts.length_note.startswith("length alone explains"):
        progress.notify("warning", stage="evaluate", message=verdicts.length_note)
    n_judged = len(next(iter(verdicts.columns.values()), []))
    for name, values in verdicts.columns.items():
        columns[name] = values + [None] * (n_rows - n_judged)
    return verdicts


def evaluate_models(
    splits: ArtifactRef,
    tokenized: ArtifactRef,
    model: ArtifactRef,
    base: ArtifactRef,
    tokenize_cfg: TokenizeConfig,
    cfg: EvaluateConfig,
    judge_cfg: JudgeConfig,
) -> Evaluation:
    """The fine-tuned model vs its base on the test split (pairwise judging: against the
    base; the gate compares the other figures with the registered champion's)."""
    from instructflow import judge, judge_prompts, semantic

    rows, tok, ft_out, base_out, metrics, speed, suite_tables, n_tokens = _answers(
        splits, tokenized, model, base, tokenize_cfg, cfg, judge_cfg
    )
    template = tokenize_cfg.template
    refs = [templates.reference(r) for r in rows]
    asked = [templates.instruction_and_context(r) for r in rows]
    stops = [*templates.stop_strings(template, tok), *cfg.stop_strings]
    columns = _text_scores(rows, refs, asked, ft_out, base_out, metrics, speed)
    outputs = {"": ft_out, **({"_base": base_out} if base_out is not None else {})}
    groups, by_source = _group_scores(rows, refs, outputs, cfg, metrics, columns)
    if cfg.semantic_model:
        _bertscore(cfg.semantic_model, refs, outputs, metrics, columns)
    verdicts = _judged(judge_cfg, asked, refs, ft_out, base_out, len(rows), metrics, columns)

    params = {
        **judge.judge_params(judge_cfg),
        "pairwise_opponent": "base",
        "template": template,
        # Not "stop_strings": the config param evaluate.stop_strings holds the requested ones.
        "effective_stop_strings": json.dumps(stops),
        "scored_tokens": n_tokens,
    }
    report = {
        "metrics": metrics,
        "bleu_note": bleu_signal_note(refs),
        "bertscore_note": semantic.PACKAGE_NOTE if cfg.semantic_model else None,
        "groups": {"by": cfg.group_by, "table": groups},
        "sources": {"by": "source", "table": by_source},
        "showcase": showcase(rows, cfg.group_by if groups else None, ft_out, base_out),
        "judge": {
            **params,
            "usable": verdicts.usable,
            "status": verdicts.status,
            "length_note": verdicts.length_note,
            "calibration": {k: v for k, v in verdicts.calibration.items() if k != "table"},
            "config": judge_cfg.model_dump(mode="json"),
            "failures": verdicts.failures[:20],
        },
        "generation": cfg.model_dump(mode="json"),
        "prompt_version": judge_prompts.PROMPT_VERSION,
    }
    return Evaluation(
        report=report,
        columns=columns,
        groups=groups,
        by_source=by_source,
        calibration_table=verdicts.calibration.get("table") or [],
        judge_usable=verdicts.usable,
        params=params,
        suite_tables=suite_tables,
    )
