"""The kept checkpoints as models: their weights in the train artifact, their step and metrics
in its manifest (`models`), from which tracking.log_stage makes MLflow LoggedModels.

Only what the Trainer kept (`save_total_limit`, plus the best one it guards) is exported, and
only the weights and their configs (no optimizer or scheduler state). A checkpoint whose
weights are byte for byte the published adapter's (the last step, or the kept best one) is
not copied: its entry points at the adapter folder instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from instructflow.artifacts import sha256_file

# Trainer state in a checkpoint folder: what resuming needs, not what a model is.
TRAINING_STATE = (
    "optimizer",
    "scheduler",
    "scaler",
    "rng_state",
    "training_args",
    "trainer_state",
    "global_step",
    "latest",
    "zero_to_fp32",
)
# The step figures a model carries (the Trainer's log names; tracking prefixes the stage).
METRICS = ("loss", "eval_loss", "eval_exact_match", "eval_rougeL")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def step_metrics(log_history: list[dict[str, Any]], step: int) -> dict[str, float]:
    """The Trainer's logged figures at `step` (its log, evaluation and generation entries)."""
    out: dict[str, float] = {}
    for entry in log_history:
        if entry.get("step") == step:
            out.update({k: float(entry[k]) for k in METRICS if k in entry})
    return out


def export(checkpoints: Path, out: Path, final_dir: str, info: dict[str, Any]) -> list[dict]:
    """Copy the kept checkpoints' weights to out/checkpoints/; returns the `models` entries
    (kept checkpoints by step, then the final model)."""
    history = info.get("log_history", [])
    steps = info["metrics"]["steps"]
    final = out / final_dir
    models = []
    for folder in kept(checkpoints, steps):
        step = int(folder.name.split("-")[1])
        path = final_dir if _same_weights(folder, final) else f"checkpoints/{folder.name}"
        if path != final_dir:
            shutil.copytree(folder, out / path, ignore=_training_state)
        models.append(
            {
                "name": folder.name,
                "role": "checkpoint",
                "step": step,
                "path": path,
                "metrics": step_metrics(history, step),
            }
        )
    # The published weights are the kept best checkpoint's (load_best_model_at_end) or the last.
    step = info["metrics"].get("kept_step", steps)
    models.append(
        {
            "name": "final",
            "role": "final",
            "step": step,
            "path": final_dir,
            "metrics": step_metrics(history, step),
        }
    )
    return models


def kept(checkpoints: Path, last_step: int) -> list[Path]:
    """Complete checkpoints of this training, by step (as trainer.last_complete_checkpoint
    tells complete ones: the Trainer writes trainer_state.json last)."""
    found = []
    for folder in checkpoints.glob("checkpoint-*") if checkpoints.is_dir() else ():
        try:
            step = int(folder.name.split("-", 1)[1])
            state = json.loads((folder / "trainer_state.json").read_text())
        except (ValueError, OSError):
            continue
        if state.get("global_step") == step <= last_step:
            found.append((step, folder))
    return [folder for _, folder in sorted(found)]


def _weights(folder: Path) -> dict[str, Path]:
    return {
        p.relative_to(folder).as_posix(): p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not _is_state(p.name)
    }


def _same_weights(checkpoint: Path, final: Path) -> bool:
    ours, theirs = _weights(checkpoint), _weights(final)
    return (
        bool(ours)
        and set(ours) == set(theirs)
        and all(sha256_file(p) == sha256_file(theirs[name]) for name, p in ours.items())
    )


def _is_state(name: str) -> bool:
    return name.startswith(TRAINING_STATE)


def _training_state(_folder: str, names: list[str]) -> list[str]:
    return [n for n in names if _is_state(n)]
