"""A smaller model made from a bigger one: keep N of its decoder layers, with their weights.

The start of a distillation student in the Minitron / Sheared-LLaMA recipes: rather than a
random or unrelated small model, the teacher's own network with layers removed (same
tokenizer, embeddings, head and the kept layers' weights), then trained to recover on the
teacher's soft labels. Which layers: evenly spaced over the depth, the first and the last
always kept (depth-pruning studies find the last layers and the first one matter most; an
importance search is not done here).

The pruned model is written once per user cache (`<cache_root>/pruned/<key>/`, temp dir +
rename, manifest of every file), keyed by the source model's content identity and the kept
layers, like the GGUF conversions; the base-model artifact references it by content digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from instructflow import user_cache

INFO_FILE = "pruned.json"


class PruneError(RuntimeError):
    """A model that cannot be pruned as asked; one-line message."""


def kept_layers(total: int, keep: int) -> list[int]:
    """`keep` layer indices of `total`, evenly spaced, first and last included."""
    if not 1 <= keep <= total:
        raise PruneError(f"model.keep_layers={keep}: the model has {total} decoder layers")
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def root() -> Path:
    return user_cache.pruned_root()


def pruned(source: Path, source_identity: str, keep: int) -> Path:
    """The folder of `source` (a transformers model folder) with `keep` layers kept."""
    from instructflow import waits
    from instructflow.artifacts import folder_intact

    key = hashlib.sha256(json.dumps([source_identity, keep]).encode()).hexdigest()[:24]
    folder = root() / f"{Path(source).name[:40]}-{keep}L-{key}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    what = f"pruning {Path(source).name} to {keep} layers"
    with waits.cache_lock(folder.parent / f"{folder.name}.lock", what, 3600):
        if folder.is_dir() and folder_intact(folder):
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        try:
            _write(Path(source), keep, tmp, source_identity)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def _write(source: Path, keep: int, out: Path, identity: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructflow.artifacts import MANIFEST, digest_of, hash_tree

    model = AutoModelForCausalLM.from_pretrained(
        str(source), dtype=torch.float32, use_safetensors=True
    )
    layers = _decoder_layers(model)
    keep_idx = kept_layers(len(layers), keep)
    kept = torch.nn.ModuleList([layers[i] for i in keep_idx])
    for new_index, layer in enumerate(kept):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index  # the KV cache is indexed by it
    model.model.layers = kept
    config = model.config
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep_idx]
    config.num_hidden_layers = len(keep_idx)
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(out))
    info: dict[str, Any] = {
        "source": identity,
        "layers_kept": keep_idx,
        "layers_total": len(layers),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))
    files = hash_tree(out)
    (out / MANIFEST).write_text(json.dumps({"digest": digest_of(files), "files": files}, indent=1))


def _decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise PruneError(
            f"model.keep_layers: {type(model).__name__} has no model.layers (Llama-style "
            "decoders only)"
        )
    return layers


def info(folder: Path) -> dict[str, Any]:
    return json.loads((folder / INFO_FILE).read_text())


def content_digest(folder: Path) -> str:
    from instructflow.artifacts import MANIFEST

    return json.loads((folder / MANIFEST).read_text())["digest"]
