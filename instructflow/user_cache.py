"""The per-user cache shared by every workspace of a user: pre-trained built-in models,
GGUF conversions, pruned models, Prefect servers.

Paths only: which weights a stage uses is fixed by the artifact it reads (whose digest is in
the stage's key), not by where the cache happens to be.
"""

from __future__ import annotations

from pathlib import Path

OUTPUT_NEUTRAL = True


def cache_root() -> Path:
    """$INSTRUCTFLOW_CACHE, else $XDG_CACHE_HOME/instructflow, else ~/.cache/instructflow."""
    # Defined in builtin.model, whose code is part of builtin:tiny's pre-training cache key:
    # moving it there would rebuild every user's built-in models and change the demo's digests.
    from instructflow.builtin.model import cache_root as builtin_cache_root

    return builtin_cache_root()


def gguf_root() -> Path:
    """GGUF files de-quantised into transformers folders (instructflow.builtin.gguf)."""
    return cache_root() / "gguf"


def pruned_root() -> Path:
    """Models with layers dropped (instructflow.layer_pruning)."""
    return cache_root() / "pruned"


def builtin_root() -> Path:
    """Pre-trained built-in models (instructflow.builtin.model)."""
    return cache_root() / "builtin"
