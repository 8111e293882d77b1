"""evaluate: the fine-tuned model vs its base on the test split.

Perplexity over response tokens only (streamed), batched greedy generation (both models),
BLEU (sacrebleu), ROUGE-1/2/L/Lsum (rouge-score, stemming), exact match, and the LLM judge
(instructflow.judge). Output: report.json, examples.json (the per-example table, logged with
mlflow.log_table), scores.png. Figures go into the manifest meta for tracking.log_stage.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from instructflow import plots, progress, suites, templates
from instructflow.artifacts import ArtifactRef, write_artifact
from instructflow.caching import local_files_digest, stage_task
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


# -- stage ------------------------------------------------------------------------------------
def evaluate(
    splits: ArtifactRef,
    tokenized: ArtifactRef,
    model: ArtifactRef,
    base: ArtifactRef,
    tokenize_cfg: TokenizeConfig,
    cfg: EvaluateConfig,
    judge_cfg: JudgeConfig,
) -> ArtifactRef:
    """The fine-tuned model vs its base on the test split (pairwise judging: against the
    base; the gate compares the other figures with the registered champion's)."""
    import torch

    from instructflow import generation, judge, judge_prompts, loading, semantic

    rows = load_rows(splits, cfg.max_examples)
    scored = scored_examples(tokenized, cfg.max_examples)
    template = tokenize_cfg.template
    ft_model, tok = loading.load_finetuned(model, base)
    prompts = [templates.generation_prompt(r, template, tok) for r in rows]
    refs = [templates.reference(r) for r in rows]
    asked = [templates.instruction_and_context(r) for r in rows]
    stops = [*templates.stop_strings(template, tok), *cfg.stop_strings]
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
    metrics: dict[str, float] = {"test_examples": len(rows)}
    # The MT-Bench-style suite is graded by the judge (calibrated below with the rest).
    grader = judge.make_backend(judge_cfg) if cfg.mt_bench else None
    suite_tables: dict[str, list[dict[str, Any]]] = {}

    def run_suites(m, label: str, suffix: str) -> None:
        if not (cfg.lm_eval_tasks or grader):
            return
        progress.notify("stage_progress", stage="evaluate", message=f"benchmark suites {label}")
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
    outputs = {"": ft_out, **({"_base": base_out} if base_out is not None else {})}
    groups = per_group(rows, cfg.group_by, outputs, refs) if cfg.group_by else {}
    for key, entry in groups.items():
        for suffix in outputs:
            metrics[f"em.{metric_key(key)}{suffix}"] = entry[f"exact_match{suffix}"]
    if groups:
        columns["group"] = [column(r, cfg.group_by) for r in rows]
    # Several data.sources (tasks/mix.py): every figure per source too.
    by_source = per_group(rows, "source", outputs, refs) if cfg.group_by != "source" else {}
    for key, entry in by_source.items():
        for suffix in outputs:
            for figure, name in (("exact_match", "em"), ("rougeL", "rougeL")):
                metrics[f"source.{name}.{metric_key(key)}{suffix}"] = entry[f"{figure}{suffix}"]
    if by_source:
        columns["source"] = [column(r, "source") for r in rows]
    if cfg.semantic_model:
        progress.notify("stage_progress", stage="evaluate", message="BERTScore")
        for suffix, outs in outputs.items():
            bs = semantic.bertscore(outs, refs, semantic.resolve(cfg.semantic_model))
            for part in ("precision", "recall", "f1"):
                metrics[f"bertscore_{part}{suffix}"] = bs[f"{part}_mean"]
            columns[f"bertscore_f1{suffix}"] = bs["f1"]
            metrics[f"bertscore_empty{suffix}"] = bs["empty"]
        metrics["bertscore_layer"] = bs["num_layers"]

    items = [judge.Item(i, c, ref) for (i, c), ref in zip(asked, refs, strict=True)]
    opponent_name = "base"
    verdicts = judge.run_judge(
        judge_cfg,
        items,
        ft_out,
        base_out,
        progress=lambda m: progress.notify("stage_progress", stage="evaluate", message=m),
    )
    metrics.update(verdicts.metrics)
    if verdicts.status and not verdicts.usable:
        progress.notify("warning", stage="evaluate", message=verdicts.status)
    if verdicts.length_note.startswith("length alone explains"):
        progress.notify("warning", stage="evaluate", message=verdicts.length_note)
    n_judged = len(next(iter(verdicts.columns.values()), []))
    for name, values in verdicts.columns.items():
        columns[name] = values + [None] * (len(rows) - n_judged)

    params = {
        **judge.judge_params(judge_cfg),
        "pairwise_opponent": opponent_name,
        "template": template,
        # Not "stop_strings": the config param evaluate.stop_strings holds the requested ones.
        "effective_stop_strings": json.dumps(stops),
        "scored_tokens": n_tokens,
    }
    bleu_note = bleu_signal_note(refs)
    report = {
        "metrics": metrics,
        "bleu_note": bleu_note,
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

    def write(tmp: Path) -> dict[str, Any]:
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
        (tmp / "examples.json").write_text(json.dumps(columns, indent=1, default=str))
        tables = [{"file": "examples.json", "artifact_file": "evaluate/examples.json"}]
        extra = {
            "groups.json": [{"group": key, **entry} for key, entry in groups.items()],
            "sources.json": [{"source": key, **entry} for key, entry in by_source.items()],
            "judge_calibration.json": verdicts.calibration.get("table") or [],
            **suite_tables,
        }
        for name, records in extra.items():
            if records:
                (tmp / name).write_text(json.dumps(as_columns(records), indent=1, default=str))
                tables.append({"file": name, "artifact_file": f"evaluate/{name}"})
        plots.score_histograms(columns, tmp / "scores.png")
        compared = plots.base_vs_tuned(metrics, tmp / "base_vs_tuned.png")
        summary = f"ppl {metrics['perplexity']:.2f}"
        if "perplexity_base" in metrics:
            summary += f" (base {metrics['perplexity_base']:.2f})"
        summary += f", EM {metrics['exact_match']:.2f}"
        if "exact_match_base" in metrics:
            summary += f" (base {metrics['exact_match_base']:.2f})"
        summary += f", ROUGE-L {metrics['rougeL']:.3f}"
        if "win_rate" in metrics:
            summary += f", win rate {metrics['win_rate']:.2f}"
            if not verdicts.usable:
                summary += " (judge untrusted, not used)"
        counts = {k: v for k, v in metrics.items() if k in BOOKKEEPING or k.endswith(".failures")}
        if bleu_note:  # not charted as if it measured something: figures.json + a tag say why
            counts.update({k: metrics[k] for k in ("bleu", "bleu_base") if k in metrics})
        return {
            "metrics": {k: v for k, v in metrics.items() if k not in counts},
            "figures": counts,
            "tags": {"instructflow.bleu_note": bleu_note} if bleu_note else {},
            "params": params,
            "log_files": ["report.json", "scores.png"]
            + (["base_vs_tuned.png"] if compared else []),
            # A chart in the MLflow UI (base and tuned in one), not only a file.
            "images": ["base_vs_tuned.png"] if compared else [],
            "tables": tables,
            # The figures are also the fine-tuned model's own (its final LoggedModel).
            "measured_model": model.digest,
            "summary": summary,
        }

    return write_artifact("evaluate", write)


def as_columns(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Records -> {column: values} (the shape mlflow.log_table takes); missing cells None."""
    keys = dict.fromkeys(k for r in records for k in r)
    return {k: [r.get(k) for r in records] for k in keys}


def suite_files(inputs: dict[str, Any]) -> dict[str, str]:
    """Cache-key material: the contents of the local files the evaluate config names."""
    cfg: EvaluateConfig = inputs["cfg"]
    mt = suites.MT_BENCH_TINY if cfg.mt_bench == "builtin" else cfg.mt_bench
    return local_files_digest([mt, cfg.lm_eval_include_path, cfg.semantic_model])


evaluate_task = stage_task(
    "evaluate",
    key_extra=suite_files,
)(evaluate)
