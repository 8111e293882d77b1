"""distill_report stage: the lecture's compression table, measured. Teacher, distilled
student and the alpha = 0 student are scored here, one after the other in one process, on the
same test rows with the same decoding (tasks/evaluate.score_model): parameters, size on disk,
test perplexity / exact match / ROUGE-L, generated tokens/s, peak memory while scoring, and,
for each student, quality retained (student / teacher; teacher / student for perplexity,
where lower is better) and the speed-up. The judge is not run here (evaluate judges the
teacher); a retained share of a teacher score of 0 is not a figure and is left empty.

Output: compression.json (rows), compression.md (the table), compression.png, report.json
(the student's metrics, what `register_student` gates on), examples.json (outputs side by
side).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from instructflow import generation, loading, plots, progress, templates
from instructflow.artifacts import ArtifactRef, write_artifact
from instructflow.caching import stage_task
from instructflow.config import DistillTeacherConfig, EvaluateConfig, TokenizeConfig
from instructflow.metrics import text_metrics
from instructflow.scoring import load_rows, score_model, scored_examples
from instructflow.training.teacher import load_teacher, teacher_fingerprint
from instructflow.training.trainer import PeakMemory, parameter_count

QUALITY = ("exact_match", "rougeL")  # higher is better; perplexity: lower is better


def distill_report(
    splits: ArtifactRef,
    tokenized: ArtifactRef,
    student: ArtifactRef,
    baseline: ArtifactRef | None,
    student_base: ArtifactRef,
    model: ArtifactRef | None,
    base: ArtifactRef | None,
    teacher_cfg: DistillTeacherConfig,
    tokenize_cfg: TokenizeConfig,
    cfg: EvaluateConfig,
) -> ArtifactRef:
    rows = load_rows(splits, cfg.max_examples)
    scored = scored_examples(tokenized, cfg.max_examples)
    refs = [templates.reference(r) for r in rows]
    tok = loading.load_tokenizer(student.file("tokenizer"))
    prompts = [templates.generation_prompt(r, tokenize_cfg.template, tok) for r in rows]
    total = 2 * len(rows) * (3 if baseline else 2)
    done = [0]

    def tick(message: str):
        start = done[0]

        def report(completed: int, _n: int) -> None:
            done[0] = start + completed
            progress.notify(
                "stage_progress", stage="distill_report", completed=done[0], total=total,
                message=message,
            )  # fmt: skip

        return report

    def measure(name: str, m, size: int | None, train_json: dict | None) -> dict[str, Any]:
        m = generation.fold_adapter(m).eval()
        memory = PeakMemory()
        ppl, _, outs, speed = score_model(
            m, tok, scored, prompts, tokenize_cfg.template, tokenize_cfg, cfg, tick, name
        )
        row = {
            "model": name,
            "parameters": parameter_count(m),
            "size_bytes": size,
            "perplexity": ppl,
            **text_metrics(outs, refs)[0],
            "generation_tokens_per_s": speed,
            "peak_memory_bytes": memory.peak()["peak_memory_bytes"],
            "train_peak_memory_bytes": (train_json or {})
            .get("metrics", {})
            .get("peak_memory_bytes"),
        }
        outputs[name] = outs
        return row

    outputs: dict[str, list[str]] = {}
    teacher, about = load_teacher(teacher_cfg, model, base, tok)
    teacher_json = json.loads(model.file("train.json").read_text()) if model else None
    table = [measure("teacher", teacher, deployed_size(model, base), teacher_json)]
    del teacher
    for name, ref in (("student", student), ("student α=0", baseline)):
        if ref is None:
            continue
        m, _ = loading.load_finetuned(ref, student_base)
        info = json.loads(ref.file("train.json").read_text())
        table.append(measure(name, m, deployed_size(ref, student_base), info))
        del m
    add_ratios(table)
    student_info = json.loads(student.file("train.json").read_text())
    kd = student_info.get("distill", {})
    metrics = report_metrics(table)
    notes = signal_notes(table)
    markdown = to_markdown(table, about, kd, notes)

    def write(tmp: Path) -> dict[str, Any]:
        body = {"teacher": about, "distill": kd, "rows": table, "notes": notes}
        (tmp / "compression.json").write_text(json.dumps(body, indent=1))
        (tmp / "compression.md").write_text(markdown)
        columns = {k: [r.get(k) for r in table] for k in table[0]}
        (tmp / "compression_table.json").write_text(json.dumps(columns, indent=1))
        (tmp / "examples.json").write_text(
            json.dumps({"reference": refs, **{f"{k}_output": v for k, v in outputs.items()}})
        )
        plots.compression(table, tmp / "compression.png")
        student_row = table[1]
        own = {k: student_row[k] for k in ("perplexity", *QUALITY)}
        (tmp / "report.json").write_text(json.dumps({"metrics": own, "judge": {}}, indent=1))
        s = table[1]
        return {
            "metrics": metrics,
            "params": {"distill_teacher": about},
            "log_files": ["compression.md", "compression.json", "compression.png"],
            "tables": [
                {"file": "compression_table.json", "artifact_file": "distill/compression.json"},
                {"file": "examples.json", "artifact_file": "distill/examples.json"},
            ],
            "summary": (
                f"student {s['parameters'] / 1e6:.2f}M ({s['compression']:.1f}x smaller): "
                f"EM {s['exact_match']:.2f} vs teacher {table[0]['exact_match']:.2f}, "
                f"{s['speedup']:.1f}x faster"
                + (f"; alpha 0: EM {table[2]['exact_match']:.2f}" if len(table) > 2 else "")
            ),
        }

    return write_artifact("distill_report", write)


def artifact_size(ref: ArtifactRef) -> int:
    """Bytes of the weights a train-like artifact ships (model/, merged/ or adapter/)."""
    for name in ("merged", "model", "adapter"):
        folder = ref.file(name)
        if folder.is_dir():
            return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return 0


def deployed_size(model: ArtifactRef | None, base: ArtifactRef | None) -> int | None:
    """What serving the model loads: its own weights, plus the base's for an adapter (None
    when the base is a hub id, whose files are not here, or the teacher is named by URI)."""
    if model is None or base is None:
        return None
    own = artifact_size(model)
    if model.file("model").is_dir() or model.file("merged").is_dir():
        return own
    source, _ = loading.base_model_source(base)
    folder = Path(source)
    if not folder.is_dir():
        return None
    weights = [f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin")]
    return own + sum(f.stat().st_size for f in weights)


def add_ratios(table: list[dict[str, Any]]) -> None:
    """Per student: compression, speed-up and quality retained against the teacher row."""
    teacher = table[0]
    for row in table[1:]:
        row["compression"] = teacher["parameters"] / row["parameters"]
        row["speedup"] = row["generation_tokens_per_s"] / teacher["generation_tokens_per_s"]
        for metric in QUALITY:
            row[f"retained_{metric}"] = (
                row[metric] / teacher[metric] if teacher[metric] > 0 else None
            )
        row["retained_perplexity"] = teacher["perplexity"] / row["perplexity"]


def report_metrics(table: list[dict[str, Any]]) -> dict[str, float]:
    """Metrics <role>.<figure> (role: teacher, student, baseline), in MLflow
    distill_report/<role>/<figure>."""
    roles = {"teacher": "teacher", "student": "student", "student α=0": "baseline"}
    out: dict[str, float] = {}
    for row in table:
        for key, value in row.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"{roles[row['model']]}.{key}"] = float(value)
    return out


def signal_notes(table: list[dict[str, Any]]) -> list[str]:
    """What in the table carries no signal, said next to it."""
    teacher = table[0]
    notes = [
        f"teacher {metric} is 0: the retained share is not defined"
        for metric in QUALITY
        if teacher[metric] == 0
    ]
    if len(table) > 2 and table[1]["exact_match"] == table[2]["exact_match"] == 0:
        notes.append("both students score exact match 0: the table shows no distillation effect")
    return notes


def _pct(value: float | None) -> str:
    return f"{100 * value:.0f} %" if value is not None else "n/a"


def to_markdown(table: list[dict[str, Any]], teacher: str, kd: dict, notes: list[str]) -> str:
    head = (
        "| model | parameters | size on disk | test perplexity | exact match | ROUGE-L | "
        "generated tokens/s | peak memory (scoring) |"
    )
    lines = [
        f"Teacher: {teacher}. Student: alpha {kd.get('alpha')}, T {kd.get('temperature')}, "
        f"top-{kd.get('top_k')} teacher logits.",
        "",
        head,
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        ratio = f" ({r['compression']:.1f}x smaller)" if "compression" in r else ""
        size = f"{r['size_bytes'] / 1e6:.2f} MB" if r.get("size_bytes") else "n/a"
        kept = {m: f" ({_pct(r[f'retained_{m}'])})" if "compression" in r else "" for m in QUALITY}
        ppl_kept = f" ({_pct(r['retained_perplexity'])})" if "compression" in r else ""
        speed = f" ({r['speedup']:.1f}x)" if "speedup" in r else ""
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.2f}M{ratio} | {size} | "
            f"{r['perplexity']:.2f}{ppl_kept} | {r['exact_match']:.2f}{kept['exact_match']} | "
            f"{r['rougeL']:.3f}{kept['rougeL']} | {r['generation_tokens_per_s']:.0f}{speed} | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} MiB |"
        )
    lines += [
        "",
        "In brackets: quality retained (student / teacher; teacher / student for perplexity) "
        "and the speed-up, each against the teacher measured in the same stage.",
    ]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _key_extra(inputs: dict[str, Any]) -> Any:
    return teacher_fingerprint({"cfg": inputs["teacher_cfg"]})


distill_report_task = stage_task("distill_report", key_extra=_key_extra)(distill_report)
