"""Where the weights a base-model artifact names are: in the artifact itself (built-in
models), in the per-user cache (a GGUF conversion, a pruned model), or on the hub.

Not part of any stage's code identity: which weights a stage gets is fixed by the base-model
artifact (its digest is in the key of every stage that reads it, and base_model's own key
covers the conversion and pruning code). A conversion wiped from the cache is rebuilt here and
must match the content digest the artifact recorded, or loading stops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from instructflow import user_cache

OUTPUT_NEUTRAL = True


class MissingWeights(RuntimeError):
    """The weights an artifact names are gone and cannot be rebuilt as they were; one line."""


def source_dir(info: dict[str, Any], artifact_dir: Path) -> str:
    """Where the weights of a base-model artifact (its model.json `info`, its folder) are: a
    local folder, or a hub id."""
    if info["kind"] == "builtin":
        return str(Path(artifact_dir) / info["weights"])
    if info["kind"] == "gguf":
        return str(_gguf_folder(info))
    if info["kind"] == "pruned":
        folder = user_cache.pruned_root() / info["pruned"]
        if not (folder / "config.json").is_file():
            raise MissingWeights(
                f"{info['name_or_path']} with {len(info['layers_kept'])} layers: not in this "
                f"user's cache ({folder}); run the pipeline again to rebuild it"
            )
        return str(folder)
    return str(info["name_or_path"])


def _gguf_folder(info: dict[str, Any]) -> Path:
    """The converted folder a base-model artifact of kind gguf names, converted again from its
    GGUF if the per-user cache was wiped (and then checked against the recorded content)."""
    folder = user_cache.gguf_root() / info["converted"]
    if (folder / "config.json").is_file():
        return folder
    from instructflow.builtin import gguf, smollm2

    try:
        if info["name_or_path"] == smollm2.NAME:
            rebuilt = smollm2.model_dir()
        else:
            rebuilt = gguf.converted(Path(info["name_or_path"]))
    except (gguf.GGUFError, smollm2.FetchError) as exc:
        raise MissingWeights(str(exc)) from None
    if info.get("content") and gguf.content_digest(rebuilt) != info["content"]:
        raise MissingWeights(
            f"{info['name_or_path']}: converted again into {rebuilt}, but the weights differ "
            "from those the base-model artifact recorded; run the pipeline again"
        )
    return rebuilt
