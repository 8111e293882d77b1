"""evaluate: the fine-tuned model vs its base on the test split (instructflow.evaluation:
perplexity, BLEU, ROUGE, exact match, BERTScore, suites, the LLM judge). Output: report.json,
examples.json (the per-example table, logged with mlflow.log_table), the per-group, per-source
and calibration tables, scores.png and base_vs_tuned.png. Figures go into the manifest meta
for tracking.log_stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from instructflow import plots, suites
from instructflow.artifacts import ArtifactRef, write_artifact
from instructflow.caching import local_files_digest, stage_task
from instructflow.config import EvaluateConfig, JudgeConfig, TokenizeConfig
from instructflow.evaluation import BOOKKEEPING, Evaluation, as_columns, evaluate_models


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
    result = evaluate_models(splits, tokenized, model, base, tokenize_cfg, cfg, judge_cfg)
    return write_artifact("evaluate", lambda tmp: _write(tmp, result, model))


def _write(tmp: Path, result: Evaluation, model: ArtifactRef) -> dict[str, Any]:
    metrics, columns = result.metrics, result.columns
    (tmp / "report.json").write_text(json.dumps(result.report, indent=1, default=str))
    (tmp / "examples.json").write_text(json.dumps(columns, indent=1, default=str))
    tables = [{"file": "examples.json", "artifact_file": "evaluate/examples.json"}]
    extra = {
        "groups.json": [{"group": key, **entry} for key, entry in result.groups.items()],
        "sources.json": [{"source": key, **entry} for key, entry in result.by_source.items()],
        "judge_calibration.json": result.calibration_table,
        **result.suite_tables,
    }
    for name, records in extra.items():
        if records:
            (tmp / name).write_text(json.dumps(as_columns(records), indent=1, default=str))
            tables.append({"file": name, "artifact_file": f"evaluate/{name}"})
    plots.score_histograms(columns, tmp / "scores.png")
    compared = plots.base_vs_tuned(metrics, tmp / "base_vs_tuned.png")
    bleu_note = result.report["bleu_note"]
    counts = {k: v for k, v in metrics.items() if k in BOOKKEEPING or k.endswith(".failures")}
    if bleu_note:  # not charted as if it measured something: figures.json + a tag say why
        counts.update({k: metrics[k] for k in ("bleu", "bleu_base") if k in metrics})
    return {
        "metrics": {k: v for k, v in metrics.items() if k not in counts},
        "figures": counts,
        "tags": {"instructflow.bleu_note": bleu_note} if bleu_note else {},
        "params": result.params,
        "log_files": ["report.json", "scores.png"] + (["base_vs_tuned.png"] if compared else []),
        # A chart in the MLflow UI (base and tuned in one), not only a file.
        "images": ["base_vs_tuned.png"] if compared else [],
        "tables": tables,
        # The figures are also the fine-tuned model's own (its final LoggedModel).
        "measured_model": model.digest,
        "summary": _summary(metrics, result.judge_usable),
    }


def _summary(metrics: dict[str, Any], judge_usable: bool) -> str:
    summary = f"ppl {metrics['perplexity']:.2f}"
    if "perplexity_base" in metrics:
        summary += f" (base {metrics['perplexity_base']:.2f})"
    summary += f", EM {metrics['exact_match']:.2f}"
    if "exact_match_base" in metrics:
        summary += f" (base {metrics['exact_match_base']:.2f})"
    summary += f", ROUGE-L {metrics['rougeL']:.3f}"
    if "win_rate" in metrics:
        summary += f", win rate {metrics['win_rate']:.2f}"
        if not judge_usable:
            summary += " (judge untrusted, not used)"
    return summary


def suite_files(inputs: dict[str, Any]) -> dict[str, str]:
    """Cache-key material: the contents of the local files the evaluate config names."""
    cfg: EvaluateConfig = inputs["cfg"]
    mt = suites.MT_BENCH_TINY if cfg.mt_bench == "builtin" else cfg.mt_bench
    return local_files_digest([mt, cfg.lm_eval_include_path, cfg.semantic_model])


evaluate_task = stage_task(
    "evaluate",
    key_extra=suite_files,
)(evaluate)
