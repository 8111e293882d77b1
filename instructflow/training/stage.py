"""A fine-tune as an artifact: the train stage's (and the distill stages') whole job. Checks
the lengths and the method, trains in the stage's work dir (a rerun with the same key resumes
from the last complete checkpoint), in this process or under torchrun, and publishes adapter/
(or model/), tokenizer/, train.json, loss_curve.png, merged/, checkpoints/ with the figures
`tracking.log_stage` records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from instructflow import codeid, loading, plots, workspace
from instructflow.artifacts import ArtifactRef, write_artifact
from instructflow.caching import inputs_key
from instructflow.config import TrainConfig
from instructflow.training import checkpoints, methods, trainer
from instructflow.training.trainer import TrainError

# What gets a chart in MLflow; the rest of train.json's figures are bookkeeping (figures.json).
CHART_METRICS = (
    "final_loss",
    "best_eval_loss",
    "mean_useful_tokens_per_s",
    "mean_padding_fraction",
)


def train_artifact(
    tokenized: ArtifactRef,
    base: ArtifactRef,
    tokenizer: ArtifactRef,
    cfg: TrainConfig,
    *,
    teacher: dict[str, Any] | None = None,
    stage: str = "train",
) -> ArtifactRef:
    """`teacher` (the distill stage): cached teacher logits and the loss's alpha and T, see
    instructflow.training.distill; the artifact is then published as `stage`."""
    check_lengths(tokenized, base)
    method = methods.get(cfg.method.name)
    if cfg.merge and not method.mergeable:
        why = "has no adapter to merge" if not method.saves_adapter else "cannot be merged"
        raise TrainError(
            f"train.merge: method {method.name} {why} (mergeable: "
            f"{', '.join(m.name for m in methods.METHODS.values() if m.mergeable)})"
        )
    key = work_key(tokenized, base, tokenizer, cfg, teacher)
    work = workspace.work_dir(stage, key)
    spec = {
        "stage": stage,
        "distill": teacher,
        "tokenized": tokenized.path,
        "base": base.model_dump(),
        "tokenizer": tokenizer.path,
        "cfg": cfg.model_dump(mode="json"),
        "work": str(work),
    }

    def write(tmp: Path) -> dict[str, Any]:
        spec["out"] = str(tmp)
        if cfg.nproc > 1 or cfg.nnodes > 1:
            trainer.launch_torchrun(spec, cfg)
        else:
            trainer.run_training(spec)
        info = json.loads((tmp / "train.json").read_text())
        plots.loss_curve(info["step_metrics"], tmp / "loss_curve.png")
        if cfg.merge:
            _write_merged(tmp, base)
        models = checkpoints.export(work / "checkpoints", tmp, _out_dir(cfg), info)
        return _meta(info, cfg, models)

    ref = write_artifact(stage, write)
    if not cfg.keep_checkpoints:
        # The artifact is published; checkpoints were only there to survive a crash.
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
    return ref


def check_lengths(tokenized: ArtifactRef, base: ArtifactRef) -> None:
    """tokenize.max_length is bounded by the config alone until the model is known: here it
    is, and a longer sequence would index past the position table (a CUDA assert, or silently
    wrong rotary positions), so it is refused in one line before anything loads."""
    limit = json.loads(base.file("model.json").read_text()).get("max_positions")
    asked = json.loads(tokenized.file("report.json").read_text())["max_length"]
    if limit and asked > limit:
        name = base.meta.get("params", {}).get("name_or_path", "the base model")
        raise TrainError(
            f"tokenize.max_length={asked} is above {name}'s max_position_embeddings={limit}; "
            f"set tokenize.max_length <= {limit}"
        )


def work_key(tokenized, base, tokenizer, cfg: TrainConfig, teacher=None) -> str:
    """The stage's cache key (same inputs and code -> same work dir, so reruns resume)."""
    inputs = {"tokenized": tokenized, "base": base, "tokenizer": tokenizer, "cfg": cfg}
    if teacher:  # its logits by digest (in the dict), not by path
        inputs["teacher"] = {k: v for k, v in teacher.items() if k != "teacher_logits"}
    return inputs_key("train", codeid.digest(__file__), inputs)


def _out_dir(cfg: TrainConfig) -> str:
    return "adapter" if methods.get(cfg.method.name).saves_adapter else "model"


def _meta(info: dict[str, Any], cfg: TrainConfig, models: list[dict]) -> dict[str, Any]:
    out_dir = _out_dir(cfg)
    copied = any(m["path"].startswith("checkpoints/") for m in models)
    m = info["metrics"]
    loss = m.get("best_eval_loss", m.get("final_loss", float("nan")))
    charts = {k: v for k, v in m.items() if k in CHART_METRICS}
    return {
        "metrics": charts,
        "figures": {k: v for k, v in m.items() if k not in charts},
        "step_metrics": info["step_metrics"],
        # Not "train.packing"/"train.precision": those config params hold the requested values.
        "params": {"packing_mode": info["packing"], "precision_resolved": info["precision"]},
        "log_files": ["train.json", "loss_curve.png"],
        "log_dirs": [out_dir, "tokenizer"]
        + (["merged"] if cfg.merge else [])
        + (["checkpoints"] if copied else []),
        # The kept checkpoints and the final model: LoggedModels of the run (tracking).
        "models": models,
        "summary": f"{cfg.method.name}, {m['steps']} steps, loss {loss:.3f}, {info['packing']}",
    }


def _write_merged(tmp: Path, base: ArtifactRef) -> None:
    """merged/: the adapter folded into the fp32 base (a plain transformers model)."""
    model, _ = loading.load_finetuned(ArtifactRef(stage="train", path=str(tmp), digest=""), base)
    merged = model.merge_and_unload()
    merged.save_pretrained(str(tmp / "merged"), safe_serialization=True)
    trainer.copy_tokenizer(tmp / "tokenizer", tmp / "merged")
