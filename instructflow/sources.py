"""What kind of data source `data.source` names, checked before anything starts."""

from __future__ import annotations

from pathlib import Path


class SourceError(ValueError):
    """A data source that cannot be used; the message is one line naming it."""


def source_kind(source: str) -> str:
    """builtin | url | local | hub, or SourceError (a missing file fails here, at once)."""
    if source.startswith("builtin:"):
        return "builtin"
    if source.startswith(("http://", "https://")):
        return "url"
    if "://" in source:
        raise SourceError(f"{source}: only http(s) URLs, local paths and hub ids are supported")
    if Path(source).exists():
        return "local"
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return "hub"
    raise SourceError(f"{source}: no such file or directory (and not a hub dataset id)")
