"""Waiting for another process that builds a per-user cache entry (the built-in tokenizer and
model, a GGUF conversion, a pruned student, the MiniLM encoder, the MLflow store).

Such a build is guarded by a file lock; a second run meeting it used to block in silence for
up to an hour and then fail with filelock's bare "could not be acquired". Here the wait says
what it waits for, on which lock, for how long so far and until when, once a second (a
`waiting` progress event, drawn by the CLI on the running stage's row), and a time-out ends
in one line that names the lock, the limit and what to do.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from instructflow import progress

# Display only: when a stage runs does not change what it writes (instructflow.codeid).
OUTPUT_NEUTRAL = True
# How often a wait reports itself (and so how often the CLI's "so far" figure moves).
REPORT_EVERY_S = 1.0
# Overrides every lock's own limit: a slow machine whose first pre-training takes longer.
LIMIT_ENV = "INSTRUCTFLOW_LOCK_WAIT_S"


class LockTimeout(RuntimeError):
    """Gave up waiting for a lock another process holds; the message is one line."""


def limit_for(default_s: float) -> float:
    value = os.environ.get(LIMIT_ENV)
    try:
        return float(value) if value else default_s
    except ValueError:
        return default_s


def waiting_line(what: str, lock: str | Path, waited_s: float, limit_s: float) -> str:
    return (
        f"waiting for another run {what} (lock {lock}), {waited_s:.0f} s so far, "
        f"gives up after {limit_s:.0f} s"
    )


def timeout_line(what: str, lock: str | Path, limit_s: float) -> str:
    return (
        f"gave up after {limit_s:.0f} s waiting for another run {what}: lock {lock} is still "
        f"held; let that run finish (`fuser -v {lock}` shows its process) or stop it, then run "
        f"again ({LIMIT_ENV}=<seconds> waits longer)"
    )


@contextmanager
def cache_lock(path: str | Path, what: str, limit_s: float) -> Iterator[None]:
    """Hold the file lock `path` for the block. `what` completes "waiting for another run
    ..." (e.g. "building builtin:tiny"); `limit_s` (or $INSTRUCTFLOW_LOCK_WAIT_S) bounds the
    wait, then LockTimeout. Uncontended, it is one non-blocking acquire and says nothing."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _wait(lock, what, limit_for(limit_s))
    try:
        yield
    finally:
        lock.release()


def _wait(lock, what: str, limit_s: float) -> None:
    from filelock import Timeout

    path = lock.lock_file
    started = time.monotonic()
    # Outside a pipeline run (serve, generate, a script) nobody draws events: one stderr line.
    if not progress.listening():
        print(waiting_line(what, path, 0, limit_s), file=sys.stderr, flush=True)
    while True:
        waited = time.monotonic() - started
        progress.notify(
            "waiting",
            message=waiting_line(what, path, waited, limit_s),
            lock=str(path),
            waited_s=round(waited, 1),
            limit_s=limit_s,
        )
        left = limit_s - waited
        if left <= 0:
            progress.notify("waiting", done=True, lock=str(path))
            raise LockTimeout(timeout_line(what, path, limit_s))
        try:
            lock.acquire(timeout=min(REPORT_EVERY_S, left))
        except Timeout:
            continue
        waited = time.monotonic() - started
        progress.notify("waiting", done=True, lock=str(path), waited_s=round(waited, 1))
        return
