"""The base model and its tokenizer, as workspace artifacts (helpers of the DAG, not stages).

`builtin:tiny` is the project's own pre-trained ~1.3M-parameter Llama-style model
(instructflow.builtin: built once per user cache, deterministically, offline); its weights
are copied into the artifact, so the workspace is self-contained. A `.gguf` file and
`builtin:smollm2-135m-instruct` are de-quantised once per user (instructflow.builtin.gguf);
the artifact references that folder by its content digest (538 MB is not copied into every
workspace) and the tokenizer is copied from it. Any other
`model.name_or_path` (hub id or local directory) is loaded with transformers; its tokenizer
is saved into the workspace (its digest is the tokenizer identity in tokenize/train cache
keys) and the weights are referenced (hub id + revision, or local path + content digest),
not copied.

Both tasks are uncached by Prefect: they must notice a changed model upstream, and the one
expensive step (pre-training the built-in model) has its own per-user cache; their
content-addressed outputs keep downstream cache keys stable when nothing changed.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from instructflow import layer_pruning, loading, model_specs, progress
from instructflow.artifacts import ArtifactRef, sha256_file, write_artifact
from instructflow.builtin import gguf
from instructflow.builtin import model as builtin
from instructflow.caching import stage_task
from instructflow.config import ModelConfig

BUILTINS = builtin.SIZES  # builtin:tiny, builtin:micro (a distillation student)
CHATML_TEMPLATE = builtin.CHATML_TEMPLATE
# What a saved tokenizer consists of (a converted model folder holds weights beside them).
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "chat_template", "vocab", "merges")


class ModelError(RuntimeError):
    pass


def _load_hub_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as exc:
        raise ModelError(
            f"model.name_or_path={cfg.name_or_path}: tokenizer could not be loaded "
            f"({type(exc).__name__}); check the id / path and network"
        ) from None
    if tok.eos_token is None:
        raise ModelError(f"{cfg.name_or_path}: tokenizer has no eos_token; generations can't stop")
    if tok.pad_token is None:
        # Labels come from the tokenize stage, never from pad ids, so pad == eos is safe here.
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def _converted(cfg: ModelConfig, shown_as: str) -> Path | None:
    """The converted folder of a GGUF / builtin:smollm2 base (progress shown on `shown_as`)."""

    def report(message: str) -> None:
        progress.notify("stage_progress", stage=shown_as, message=message)

    try:
        return model_specs.converted_dir(cfg.name_or_path, report)
    except loading.LoadError as exc:
        raise ModelError(str(exc)) from None


def prepare_tokenizer(cfg: ModelConfig) -> ArtifactRef:
    converted = _converted(cfg, "tokenizer")
    if cfg.name_or_path in BUILTINS or converted:
        # Copied, not loaded and saved: a cached run never imports transformers for it.
        if converted:
            folder = converted
            names = [p.name for p in folder.iterdir() if p.name.startswith(TOKENIZER_FILES)]
        else:
            folder = builtin.cached_tokenizer_dir()
            names = [p.name for p in folder.iterdir()]
        size = builtin.tokenizer_size(folder)

        def save(tmp: Path) -> None:
            for name in names:
                shutil.copyfile(folder / name, tmp / name)
    else:
        tok = _load_hub_tokenizer(cfg)
        size = len(tok)

        def save(tmp: Path) -> None:
            tok.save_pretrained(str(tmp))

    def write(tmp: Path) -> dict[str, Any]:
        save(tmp)
        return {
            "params": {"name_or_path": cfg.name_or_path, "vocab_size": size},
            "summary": f"{cfg.name_or_path} tokenizer, {size} tokens",
        }

    return write_artifact("tokenizer", write)


def _local_weights_digest(path: Path) -> str:
    """Content digest of a local model folder (config + weights) so edits re-run training."""
    files = sorted(p for p in path.iterdir() if p.is_file())
    return json.dumps({p.name: sha256_file(p) for p in files}, sort_keys=True)


def _hub_revision(cfg: ModelConfig) -> str | None:
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(cfg.name_or_path, revision=cfg.revision).sha
    except Exception:
        return cfg.revision


def prepare_base_model(
    cfg: ModelConfig, tokenizer: ArtifactRef, shown_as: str = "base_model"
) -> ArtifactRef:
    """`shown_as`: the row its progress and outcome are reported under."""
    outcome = {"state": "Completed", "summary": ""}

    def write(tmp: Path) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name_or_path": cfg.name_or_path,
            "revision": cfg.revision,
            "trust_remote_code": cfg.trust_remote_code,
            "attn_implementation": cfg.attn_implementation,
            "tokenizer_digest": tokenizer.digest,
        }
        if cfg.name_or_path in BUILTINS:
            bundle, cached = _pretrained_builtin(tokenizer, cfg.name_or_path, shown_as)
            info.update(kind="builtin", weights="weights", pretrain=_pretrain_card(bundle))
            shutil.copytree(bundle / "model", tmp / "weights")
            n_params = info["pretrain"]["parameters"]
            seconds = info["pretrain"]["seconds"]
            how = "loaded from the cache (pretrained once in" if cached else "pretrained in"
            summary = f"{cfg.name_or_path} {n_params / 1e6:.2f}M, {how} {seconds:.0f} s"
            summary += ")" * cached
            outcome["state"] = "Cached" if cached else "Completed"
        elif converted := _converted(cfg, shown_as):
            conversion = gguf.info(converted)
            source = cfg.name_or_path
            if gguf.is_gguf(source):
                source = str(Path(source).expanduser().resolve())
            info.update(
                kind="gguf",
                name_or_path=source,
                gguf_sha256=conversion["gguf_sha256"],
                converted=converted.name,
                content=gguf.content_digest(converted),
            )
            n_params = conversion["parameters"]
            summary = (
                f"{cfg.name_or_path} {n_params / 1e6:.1f}M, de-quantised from "
                f"{conversion['gguf']} (once per user, {conversion['seconds']:.0f} s)"
            )
        elif Path(cfg.name_or_path).is_dir():
            local = Path(cfg.name_or_path).resolve()
            info.update(kind="local", name_or_path=str(local))
            info["content"] = _local_weights_digest(local)
            n_params, summary = None, f"local {local}"
        else:
            info.update(kind="hub", revision=_hub_revision(cfg))
            n_params, summary = None, f"hub {cfg.name_or_path}"
        if cfg.keep_layers:
            info, n_params, summary = _pruned(cfg, tmp, info, shown_as)
        info["max_positions"] = _max_positions(tmp, info)
        (tmp / "model.json").write_text(json.dumps(info, indent=1, sort_keys=True))
        meta: dict[str, Any] = {
            "params": {"kind": info["kind"], "name_or_path": info["name_or_path"]},
            "summary": summary,
        }
        if n_params:
            meta["figures"] = {"parameters": n_params}
        if info.get("pretrain"):
            meta["figures"].update(
                {f"probe_{k}": v for k, v in info["pretrain"]["probe"].items()},
                pretrain_seconds=info["pretrain"]["seconds"],
            )
        outcome["summary"] = summary
        return meta

    ref = write_artifact("base_model", write)
    # The manifest's summary is the first publisher's; this run's own outcome goes out here.
    progress.notify("stage_state", stage=shown_as, **outcome)
    return ref


def _pruned(
    cfg: ModelConfig, tmp: Path, info: dict[str, Any], shown_as: str
) -> tuple[dict[str, Any], int, str]:
    """The model.json of `keep_layers` of the model `info` describes (instructflow.
    layer_pruning: built once per user cache, referenced by content digest)."""
    source = loading.source_dir(info, tmp)
    progress.notify("stage_progress", stage=shown_as, message=f"keeping {cfg.keep_layers} layers")
    try:
        folder = layer_pruning.pruned(source, json.dumps(info, sort_keys=True), cfg.keep_layers)
    except layer_pruning.PruneError as exc:
        raise ModelError(str(exc)) from None
    about = layer_pruning.info(folder)
    shutil.rmtree(tmp / "weights", ignore_errors=True)  # a builtin's copy: the folder has it
    pruned = {k: info[k] for k in ("name_or_path", "revision", "trust_remote_code")}
    pruned.update(
        attn_implementation=info.get("attn_implementation"),
        tokenizer_digest=info["tokenizer_digest"],
        kind="pruned",
        source=info,
        pruned=folder.name,
        content=layer_pruning.content_digest(folder),
        layers_kept=about["layers_kept"],
    )
    n_params = about["parameters"]
    summary = (
        f"{cfg.name_or_path}, {len(about['layers_kept'])} of {about['layers_total']} layers "
        f"kept ({n_params / 1e6:.1f}M)"
    )
    return pruned, n_params, summary


def _max_positions(tmp: Path, info: dict[str, Any]) -> int | None:
    """The longest sequence the base accepts (None when its config can't be read, e.g. a hub
    id offline): train checks tokenize.max_length against it before it loads anything."""
    source = loading.source_dir(info, tmp)
    if (Path(source) / "config.json").is_file():  # read directly: no transformers import
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
        limit = config.get("max_position_embeddings") or config.get("n_positions")
        return int(limit) if limit else None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            str(source), revision=info.get("revision"), trust_remote_code=info["trust_remote_code"]
        )
    except Exception:
        return None
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(limit) if limit else None


def _pretrained_builtin(tokenizer: ArtifactRef, name: str, shown_as: str) -> tuple[Path, bool]:
    """The pre-trained built-in model's bundle (built once per user cache), with progress."""
    started = time.perf_counter()

    def report(step: int, total: int, loss: float | None) -> None:
        elapsed = time.perf_counter() - started
        eta = elapsed / step * (total - step) if step else 0.0
        loss_txt = f", loss {loss:.3f}" if loss is not None else ""
        progress.notify(
            "stage_progress",
            stage=shown_as,
            completed=step,
            total=total,
            message=f"pre-training {name}{loss_txt}, ETA {eta:.0f} s",
        )

    return builtin.ensure_pretrained(tokenizer.dir, progress=report, arch=BUILTINS[name])


def _pretrain_card(bundle: Path) -> dict[str, Any]:
    """What model.json records about the pre-training (the recipe and what the base knows)."""
    info = builtin.bundle_info(bundle)
    keep = ("cache_key", "parameters", "seconds", "tokens", "final_loss", "probe", "recipe")
    return {k: info[k] for k in keep if k in info}


def prepare_student_base(cfg: ModelConfig, tokenizer: ArtifactRef) -> ArtifactRef:
    """The distillation student's starting point: a base model like any other, shown as its
    own row."""
    return prepare_base_model(cfg, tokenizer, shown_as="student_base")


tokenizer_task = stage_task("tokenizer", cache=False)(prepare_tokenizer)
base_model_task = stage_task("base_model", cache=False)(prepare_base_model)
student_base_task = stage_task("student_base", cache=False)(prepare_student_base)
