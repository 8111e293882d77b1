"""The distillation teacher: loaded (this run's tuned model or one the config names), checked
to share the data's vocabulary, and fingerprinted for the cache key."""

from __future__ import annotations

import json
from typing import Any

from instructflow.artifacts import ArtifactRef
from instructflow.caching import local_files_digest
from instructflow.config import DistillTeacherConfig
from instructflow.training.distill import DistillError, require_same_vocabulary


def load_teacher(
    cfg: DistillTeacherConfig, model: ArtifactRef | None, base: ArtifactRef | None, tokenizer
):
    """(teacher model in eval mode with any adapter folded in, one-line description). Refused
    in one line when its vocabulary differs from the data's tokenizer (`tokenizer`)."""
    from instructflow import generation, loading, model_specs

    if cfg.model is None:
        if model is None or base is None:
            raise DistillError("distill.teacher.model is null but this run has no train artifact")
        teacher, _ = loading.load_finetuned(model, base)
        info = json.loads(model.file("train.json").read_text())
        name = info["base_model"].get("name_or_path")
        about = f"this run's {info['method']} model on {name} (train {model.digest[:12]})"
    else:
        teacher, tok, _ = model_specs.load_for_inference(cfg.model)
        require_same_vocabulary(tok, tokenizer, f"distill.teacher.model={cfg.model}")
        about = cfg.model
    return generation.fold_adapter(teacher).eval(), about


def teacher_fingerprint(inputs: dict[str, Any]) -> Any:
    """Cache-key material for a teacher named in the config: a local folder's contents, or
    the registry version an MLflow URI points at now (a moved alias must miss the cache)."""
    spec = inputs["cfg"].model
    if spec is None:
        return None
    if spec.startswith("models:/"):
        from instructflow import registry

        return registry.resolve_version(spec)
    return local_files_digest([spec]) or spec
