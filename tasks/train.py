"""train stage: fine-tune the base model by `train.method` (instructflow.training.methods:
QLoRA, LoRA, DoRA, full) with transformers' Trainer (instructflow.training.trainer).

Checkpoints go to the stage's work dir (`workspace.work_dir("train", <cache key>)`), so a
rerun with the same key resumes from the last complete one. Figures go into the manifest meta
for `tracking.log_stage`.

Output (artifacts/train/<digest>/): adapter/ (or model/ for method full), tokenizer/ (the
tokenizer artifact's files, byte for byte), train.json, loss_curve.png, merged/ if merge,
checkpoints/ (the kept checkpoints' weights, see instructflow.training.checkpoints).
"""

from __future__ import annotations

from instructflow.artifacts import ArtifactRef
from instructflow.caching import stage_task
from instructflow.config import TrainConfig
from instructflow.training.stage import train_artifact


def train(
    tokenized: ArtifactRef, base: ArtifactRef, tokenizer: ArtifactRef, cfg: TrainConfig
) -> ArtifactRef:
    return train_artifact(tokenized, base, tokenizer, cfg)


train_task = stage_task("train")(train)
