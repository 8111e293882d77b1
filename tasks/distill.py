"""distill stage: train the student (a smaller base, `distill.student`) on the teacher's
cached top-k logits with loss alpha * T^2 * KL + (1 - alpha) * CE (instructflow.training.
distill), through the train stage's own machinery: packing, checkpoints in the stage's work
dir (a rerun resumes), step metrics, seeds. The flow runs it twice: the student (`distill`)
and, with alpha = 0 and no teacher, the hard-label baseline (`distill_baseline`), whose key
therefore changes with neither alpha, T nor the teacher.

Output (artifacts/distill/<digest>/): what the train stage writes (model/ for the default
method full, tokenizer/, train.json with a `distill` section naming the teacher, loss curve).
"""

from __future__ import annotations

import json

from instructflow import loading
from instructflow.artifacts import ArtifactRef
from instructflow.caching import stage_task
from instructflow.config import TrainConfig
from instructflow.training.distill import require_same_vocabulary
from instructflow.training.stage import train_artifact


def distill(
    tokenized: ArtifactRef,
    logits: ArtifactRef | None,
    student_base: ArtifactRef,
    tokenizer: ArtifactRef,
    cfg: TrainConfig,
    alpha: float,
    temperature: float | None,
) -> ArtifactRef:
    """The student trained with `alpha` (0: the CE-only baseline; `logits` then unused)."""
    source, _ = loading.base_model_source(student_base)
    require_same_vocabulary(
        loading.load_tokenizer(source),
        loading.load_tokenizer(tokenizer),
        f"distill.student={student_base.meta.get('params', {}).get('name_or_path', source)}",
    )
    teacher = None
    if alpha > 0:
        if logits is None or temperature is None:
            raise ValueError("distill: alpha > 0 needs the teacher's logits and a temperature")
        teacher = teacher_spec(logits, alpha, temperature)
    stage = "distill" if teacher else "distill_baseline"
    ref = train_artifact(tokenized, student_base, tokenizer, cfg, teacher=teacher, stage=stage)
    how = f"alpha {alpha}, T {temperature}" if teacher else "alpha 0 (hard labels only)"
    ref.meta["summary"] = f"student {how}: {ref.meta.get('summary', '')}"
    return ref


def teacher_spec(logits: ArtifactRef, alpha: float, temperature: float) -> dict:
    """What the train machinery needs to distill (instructflow.training.distill), and what the
    student's train.json records about its teacher."""
    about = json.loads(logits.file("teacher.json").read_text())
    return {
        "teacher_logits": logits.path,
        "teacher_logits_digest": logits.digest,
        "teacher": about["teacher"],
        "top_k": about["top_k"],
        "alpha": alpha,
        "temperature": temperature,
    }


distill_task = stage_task("distill")(distill)
