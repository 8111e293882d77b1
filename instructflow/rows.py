"""Small helpers on canonical rows (what validate writes and every later stage reads)."""

from __future__ import annotations

from typing import Any


def column(row: dict[str, Any], path: str) -> str:
    """A row's value at a dotted path (e.g. meta.task), as text; '' when absent."""
    value: Any = row
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)
