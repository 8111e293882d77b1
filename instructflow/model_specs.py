"""Loading a model from what a user types: builtin:tiny, builtin:smollm2-135m-instruct, a
`.gguf` file, an MLflow URI (`models:/NAME@alias`), a train artifact folder, a PEFT adapter
folder, or a plain transformers folder / hub id. Serving, generating, the judge and the
base_model stage load through here; loading from a stage's artifacts is instructflow.loading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from instructflow.builtin import gguf, smollm2
from instructflow.builtin import model as builtin
from instructflow.loading import (
    LoadError,
    artifact_ref,
    attach_adapter,
    check_intact,
    load_base_model,
    load_tokenizer,
    source_dir,
)


def converted_dir(spec: str, progress: gguf.Progress | None = None) -> Path | None:
    """The local transformers folder of a model given as a `.gguf` file or as
    builtin:smollm2-135m-instruct (fetched and de-quantised once per user); None for any
    other spec."""
    try:
        if spec == smollm2.NAME:
            return smollm2.model_dir(progress)
        if gguf.is_gguf(spec):
            return gguf.converted(Path(spec), progress)
    except (gguf.GGUFError, smollm2.FetchError) as exc:
        raise LoadError(str(exc)) from None
    return None


def load_builtin(name: str = builtin.NAME):
    """(model, tokenizer) of a pre-trained built-in model (builtin:tiny, builtin:micro), from
    the per-user cache (built there on first use)."""
    from transformers import AutoModelForCausalLM

    bundle, _ = builtin.ensure_pretrained(builtin.cached_tokenizer_dir(), arch=builtin.SIZES[name])
    model = AutoModelForCausalLM.from_pretrained(str(bundle / "model"), use_safetensors=True)
    return model, load_tokenizer(bundle / "model")


def load_plain(spec: str):
    """(model, tokenizer, template) of an HF model folder, hub id, GGUF file or
    builtin:smollm2-135m-instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = str(converted_dir(spec) or spec)
    try:
        tok = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, use_safetensors=True)
    except Exception as exc:
        raise LoadError(f"{spec}: could not load a model ({type(exc).__name__})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, "chat_template" if tok.chat_template else "alpaca"


def _base_for(info: dict[str, Any]):
    """The base model a train artifact was trained on: its artifact in this workspace, else
    the built-in model or the hub id it names."""
    from instructflow import workspace

    for model_json in sorted((workspace.artifacts_dir() / "base_model").glob("*/model.json")):
        if model_json.parent.name.startswith("."):  # a temp dir or a quarantined copy
            continue
        if json.loads(model_json.read_text()) == info:
            check_intact(model_json.parent)
            return load_base_model(artifact_ref(model_json.parent, "base_model"))
    if info.get("kind") in ("gguf", "pruned"):
        return load_plain(source_dir(info, Path()))[0]
    if info.get("name_or_path") in builtin.SIZES:
        return load_builtin(info["name_or_path"])[0]
    return load_plain(info["name_or_path"])[0]


def _train_artifact(path: Path):
    from transformers import AutoModelForCausalLM

    check_intact(path)  # `serve --model artifacts/train/<digest>` loads it directly
    info = json.loads((path / "train.json").read_text())
    tok = load_tokenizer(path / "tokenizer")
    template = info.get("template", "alpaca")
    for full in ("merged", "model"):
        if (path / full).is_dir():
            model = AutoModelForCausalLM.from_pretrained(str(path / full), use_safetensors=True)
            return model, tok, template
    return attach_adapter(_base_for(info["base_model"]), path / "adapter"), tok, template


def _adapter_dir(path: Path):
    base_id = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_id:
        raise LoadError(f"{path}: adapter_config.json names no base model")
    base, tok, template = load_for_inference(base_id)
    if (path / "tokenizer_config.json").is_file():
        tok = load_tokenizer(path)
    return attach_adapter(base, path), tok, template


def _registered(uri: str):
    import mlflow.pyfunc

    try:
        loaded = mlflow.pyfunc.load_model(uri)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LoadError(f"{uri}: cannot load from MLflow ({first})") from None
    inner = loaded.unwrap_python_model()
    return inner.model, inner.tokenizer, inner.template


def load_for_inference(spec: str):
    """(model, tokenizer, template) for serving, generating or judging, from: builtin:tiny,
    builtin:smollm2-135m-instruct, a `.gguf` file, an MLflow URI (`models:/NAME@alias`,
    `runs:/...`), a train artifact dir, a PEFT adapter dir, or a plain HF model dir / hub id."""
    if spec in builtin.SIZES:
        model, tok = load_builtin(spec)
        return model, tok, "chat_template"
    if spec.startswith(("models:/", "runs:/")) or "://" in spec:
        return _registered(spec)
    path = Path(spec)
    if path.is_dir() and (path / "train.json").is_file():
        return _train_artifact(path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _adapter_dir(path)
    return load_plain(spec)
