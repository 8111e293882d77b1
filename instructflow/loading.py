"""Loading from artifacts: the tokenizer and base model a base-model artifact names, and the
fine-tuned model (adapter or full weights) of a train artifact. Train, evaluate, distill and
the registry's pyfunc load through here; loading from what a user types (builtin:tiny, a
`.gguf`, `models:/NAME@alias`, a folder) is instructflow.model_specs, built on this.

Safety: weights load from safetensors only (`use_safetensors=True`), and remote code runs only
when the base model's artifact records `trust_remote_code` (set in the config).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from instructflow import base_weights, user_cache
from instructflow.artifacts import MANIFEST, ArtifactRef


class LoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; one-line message."""


# -- tokenizers and base models ---------------------------------------------------------------
def source_dir(info: dict[str, Any], artifact_dir: Path) -> str:
    """Where the weights of a base-model artifact (its model.json `info`, its folder) are: a
    local folder, or a hub id."""
    try:
        return base_weights.source_dir(info, artifact_dir)
    except base_weights.MissingWeights as exc:
        raise LoadError(str(exc)) from None


def load_tokenizer(ref: ArtifactRef | str | Path):
    from transformers import AutoTokenizer

    path = ref.path if isinstance(ref, ArtifactRef) else str(ref)
    return AutoTokenizer.from_pretrained(path)


def model_info(ref: ArtifactRef) -> dict[str, Any]:
    """The base-model artifact's model.json: what the base is and where its weights are."""
    return json.loads(ref.file("model.json").read_text())


def base_model_source(ref: ArtifactRef) -> tuple[str, dict[str, Any]]:
    """(path or hub id, from_pretrained kwargs) of the base weights this artifact refers to."""
    info = model_info(ref)
    kwargs: dict[str, Any] = {
        "trust_remote_code": bool(info.get("trust_remote_code")),
        "use_safetensors": True,
    }
    if info.get("attn_implementation"):
        kwargs["attn_implementation"] = info["attn_implementation"]
    if info["kind"] == "hub" and info.get("revision"):
        kwargs["revision"] = info["revision"]
    return source_dir(info, ref.dir), kwargs


def load_base_model(ref: ArtifactRef, **overrides: Any):
    """The base causal LM of a base-model artifact; `overrides` go to from_pretrained."""
    from transformers import AutoModelForCausalLM

    source, kwargs = base_model_source(ref)
    kwargs.update(overrides)
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise LoadError(f"{source}: base model could not be loaded ({exc})") from None


def hf_base_path(info: dict[str, Any]) -> str:
    """What an adapter's `base_model_name_or_path` should say so that PEFT's own loaders
    (`AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`) find the base: a hub id, a local
    folder, or, for builtin:tiny, its folder in the per-user cache (the same for every
    workspace of this user; rebuilt at the same path if the cache is wiped)."""
    if info.get("kind") == "builtin" and info.get("pretrain", {}).get("cache_key"):
        return str(user_cache.builtin_root() / info["pretrain"]["cache_key"] / "model")
    if info.get("kind") in ("gguf", "pruned"):
        return source_dir(info, Path())
    return str(info["name_or_path"])


# -- fine-tuned models ------------------------------------------------------------------------
def attach_adapter(base, folder: Path):
    """`base` with the saved adapter of `folder`: PEFT's own loader for PEFT methods (LoRA,
    IA3, prompt/prefix tuning ...), instructflow.training.bottleneck for bottleneck adapters."""
    from instructflow.training import bottleneck

    if bottleneck.is_bottleneck(folder):
        return bottleneck.load(base, folder)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(folder))


def load_finetuned(train_ref: ArtifactRef, base_ref: ArtifactRef, **kwargs: Any):
    """(model, tokenizer) of a train artifact: its adapter on the fp32 base (PeftModel), or
    its full model. `kwargs` go to from_pretrained (e.g. device_map). Defaults: fp32, CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", torch.float32)
    tok = load_tokenizer(train_ref.file("tokenizer"))
    if train_ref.file("model").is_dir():
        model = AutoModelForCausalLM.from_pretrained(
            str(train_ref.file("model")), use_safetensors=True, **kwargs
        )
    else:
        model = attach_adapter(load_base_model(base_ref, **kwargs), train_ref.file("adapter"))
    model.config.use_cache = True
    model.eval()
    return model, tok


def check_intact(path: Path, copy: bool = False) -> None:
    """Refuse (LoadError, one line naming the file) a folder published with a MANIFEST.json
    whose files no longer match it: a damaged adapter would load as garbage weights, or fail
    deep inside PEFT. A damaged artifact of this workspace is also quarantined (`.corrupt-*`),
    so the next pipeline run rebuilds it. A folder without a manifest is not checked.
    `copy`: the folder is the registry's copy of part of an artifact (its adapter, tokenizer,
    train.json...): a top-level entry left out is expected, anything inside a copied one not."""
    from instructflow import workspace
    from instructflow.artifacts import hash_tree, quarantine

    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path / MANIFEST}: unreadable ({type(exc).__name__})") from None
    want, have = manifest.get("files", {}), hash_tree(path)
    if copy:
        want = {n: d for n, d in want.items() if (path / n.split("/")[0]).exists()}
    bad = sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))
    if not bad:
        return
    what = "missing" if bad[0] not in have else "added" if bad[0] not in want else "changed"
    line = f"{path / bad[0]} is {what} since the artifact was written ({len(bad)} file(s) differ)"
    published = path.resolve().parent.parent == workspace.artifacts_dir()
    if published and path.name == manifest.get("digest"):
        quarantine(path)
        line += f"; moved aside to {path.parent}/.corrupt-{path.name}-*: run the pipeline again"
    raise LoadError(line)


def artifact_ref(path: Path, stage: str) -> ArtifactRef:
    """The ref of an artifact folder (its MANIFEST's digest; empty without one)."""
    digest = ""
    if (path / MANIFEST).is_file():
        digest = json.loads((path / MANIFEST).read_text())["digest"]
    return ArtifactRef(stage=stage, path=str(path), digest=digest)


def load_artifact_dirs(train_dir: Path, base_dir: Path):
    """(model, tokenizer, template) from a train artifact dir and a base-model artifact dir
    (as the registry stores them), each checked against its manifest first."""
    check_intact(train_dir, copy=True)
    check_intact(base_dir, copy=True)
    info = json.loads((train_dir / "train.json").read_text())
    model, tok = load_finetuned(
        artifact_ref(train_dir, "train"), artifact_ref(base_dir, "base_model")
    )
    return model, tok, info.get("template", "alpaca")
