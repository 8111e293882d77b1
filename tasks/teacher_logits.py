"""teacher_logits stage: the distillation teacher's top-k logits at every scored (response)
position of the tokenized train split, stored in Arrow beside nothing else: the distill stage
joins them to the tokenized rows by position (instructflow.training.distill).

Keyed by the teacher (this run's train artifact + base, or `distill.teacher.model` and its
content / registry version), the tokenized artifact's digest and top_k: another alpha or
temperature re-trains the student only.

Output (artifacts/teacher_logits/<digest>/): train/ (a datasets Arrow folder: teacher_ids,
teacher_logits, both flattened [positions * k]), teacher.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from instructflow import progress
from instructflow.arrow_io import save_table
from instructflow.artifacts import ArtifactRef, write_artifact
from instructflow.caching import stage_task
from instructflow.config import DistillTeacherConfig
from instructflow.training.distill import TEACHER_IDS, TEACHER_LOGITS, teacher_top_k
from instructflow.training.teacher import load_teacher, teacher_fingerprint


def teacher_logits(
    tokenized: ArtifactRef,
    model: ArtifactRef | None,
    base: ArtifactRef | None,
    tokenizer: ArtifactRef,
    cfg: DistillTeacherConfig,
) -> ArtifactRef:
    import datasets

    from instructflow import loading

    tok = loading.load_tokenizer(tokenizer)
    teacher, about = load_teacher(cfg, model, base, tok)
    train = datasets.load_from_disk(str(tokenized.file("train")))
    examples = list(zip(train["input_ids"], train["labels"], strict=True))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    k = min(cfg.top_k, teacher.get_output_embeddings().weight.shape[0])
    ids: list[list[int]] = []
    values: list[list[float]] = []
    # Longest first: rows of similar length share a batch (less padding to compute).
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    found: dict[int, tuple[list[int], list[float], list[float]]] = {}
    for start in range(0, len(order), cfg.batch_size):
        chunk = order[start : start + cfg.batch_size]
        rows = teacher_top_k(teacher, [examples[i] for i in chunk], k, pad)
        found.update(zip(chunk, rows, strict=True))
        progress.notify(
            "stage_progress",
            stage="teacher_logits",
            completed=min(start + cfg.batch_size, len(order)),
            total=len(order),
            message=f"teacher top-{k} logits",
        )
    for i in range(len(examples)):
        ids.append(found[i][0])
        values.append(found[i][1])
    positions = sum(len(r) for r in ids) // k
    # How much of the teacher's distribution (T = 1) the top-k keep: the KL is taken over
    # these k ids renormalised, so a low share means the approximation drops signal.
    kept = [share for i in range(len(examples)) for share in found[i][2]]
    mass = {
        "top_k_mass_mean": sum(kept) / len(kept) if kept else 1.0,
        "top_k_mass_min": min(kept, default=1.0),
    }

    def write(tmp: Path) -> dict[str, Any]:
        features = datasets.Features(
            {
                TEACHER_IDS: datasets.Sequence(datasets.Value("int32")),
                TEACHER_LOGITS: datasets.Sequence(datasets.Value("float32")),
            }
        )
        data = datasets.Dataset.from_dict({TEACHER_IDS: ids, TEACHER_LOGITS: values}, features)
        save_table(data.data.table, tmp / "train")  # quiet, content-fingerprinted
        info = {"teacher": about, "top_k": k, "positions": positions, "rows": len(ids), **mass}
        (tmp / "teacher.json").write_text(json.dumps(info, indent=1))
        return {
            "params": {"teacher": about, "top_k": k},
            "figures": {"positions": positions, "rows": len(ids), **mass},
            "summary": f"top-{k} logits at {positions} positions of {len(ids)} rows, "
            f"holding {mass['top_k_mass_mean']:.2%} of the teacher's probability "
            f"(min {mass['top_k_mass_min']:.2%})",
        }

    return write_artifact("teacher_logits", write)


teacher_logits_task = stage_task("teacher_logits", key_extra=teacher_fingerprint)(teacher_logits)
