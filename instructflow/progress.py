"""A tiny observer hook so the CLI can draw live progress of an in-process flow run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Its code changes no stage's output (instructflow.codeid does not follow it).
OUTPUT_NEUTRAL = True

Listener = Callable[[str, dict[str, Any]], None]
_listeners: list[Listener] = []


def subscribe(listener: Listener) -> None:
    _listeners.append(listener)


def unsubscribe(listener: Listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def notify(event: str, **payload: Any) -> None:
    for listener in list(_listeners):
        try:
            listener(event, payload)
        except Exception:  # a broken display must never break a run
            pass


def listening() -> bool:
    """Whether anything draws events now (a pipeline run); else a caller may print instead."""
    return bool(_listeners)
