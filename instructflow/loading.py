"""Every way a model is loaded, in one place: tokenizers, base models (built-in, hub, local),
fine-tuned adapters and full models from train artifacts, PEFT adapter folders, and MLflow
registry URIs (`models:/NAME@alias`). Train, evaluate, register, serve, generate and the judge
all load through here.

Safety: weights load from safetensors only (`use_safetensors=True`), and remote code runs only
when the base model's artifact records `trust_remote_code` (set in the config).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from instructflow import layer_pruning
from instructflow.artifacts import MANIFEST, ArtifactRef
from instructflow.builtin import gguf, smollm2
from instructflow.builtin import model as builtin


class LoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; one-line message."""


# -- tokenizers and base models ---------------------------------------------------------------
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


def source_dir(info: dict[str, Any], artifact_dir: Path) -> str:
    """Where the weights of a base-model artifact (its model.json `info`, its folder) are: a
    local folder, or a hub id."""
    if info["kind"] == "builtin":
        return str(Path(artifact_dir) / info["weights"])
    if info["kind"] == "gguf":
        return str(_gguf_folder(info))
    if info["kind"] == "pruned":
        folder = layer_pruning.root() / info["pruned"]
        if not (folder / "config.json").is_file():
            raise LoadError(
                f"{info['name_or_path']} with {len(info['layers_kept'])} layers: not in this "
                f"user's cache ({folder}); run the pipeline again to rebuild it"
            )
        return str(folder)
    return str(info["name_or_path"])


def _gguf_folder(info: dict[str, Any]) -> Path:
    """The converted folder a base-model artifact of kind gguf names (converted again from
    its GGUF if the per-user cache was wiped)."""
    folder = gguf.root() / info["converted"]
    if (folder / "config.json").is_file():
        return folder
    return converted_dir(info["name_or_path"]) or folder


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


def load_builtin(name: str = builtin.NAME):
    """(model, tokenizer) of a pre-trained built-in model (builtin:tiny, builtin:micro), from
    the per-user cache (built there on first use)."""
    from transformers import AutoModelForCausalLM

    bundle, _ = builtin.ensure_pretrained(builtin.cached_tokenizer_dir(), arch=builtin.SIZES[name])
    model = AutoModelForCausalLM.from_pretrained(str(bundle / "model"), use_safetensors=True)
    return model, load_tokenizer(bundle / "model")


def hf_base_path(info: dict[str, Any]) -> str:
    """What an adapter's `base_model_name_or_path` should say so that PEFT's own loaders
    (`AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`) find the base: a hub id, a local
    folder, or, for builtin:tiny, its folder in the per-user cache (the same for every
    workspace of this user; rebuilt at the same path if the cache is wiped)."""
    if info.get("kind") == "builtin" and info.get("pretrain", {}).get("cache_key"):
        return str(builtin.cache_root() / "builtin" / info["pretrain"]["cache_key"] / "model")
    if info.get("kind") in ("gguf", "pruned"):
        return source_dir(info, Path())
    return str(info["name_or_path"])


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


def _ref_of(path: Path, stage: str) -> ArtifactRef:
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
    model, tok = load_finetuned(_ref_of(train_dir, "train"), _ref_of(base_dir, "base_model"))
    return model, tok, info.get("template", "alpaca")


def _base_for(info: dict[str, Any]):
    """The base model a train artifact was trained on: its artifact in this workspace, else
    the built-in model or the hub id it names."""
    from instructflow import workspace

    for model_json in sorted((workspace.artifacts_dir() / "base_model").glob("*/model.json")):
        if model_json.parent.name.startswith("."):  # a temp dir or a quarantined copy
            continue
        if json.loads(model_json.read_text()) == info:
            check_intact(model_json.parent)
            return load_base_model(_ref_of(model_json.parent, "base_model"))
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
