"""Leftovers on disk that nothing will read again: find them, size them, remove them.

Two kinds, both made only by instructflow itself:
- `.tmp-*`: a writer's unpublished temp dir (instructflow.artifacts.write_artifact, the
  built-in model and bundled encoder caches). A killed run leaves it behind and nothing ever
  trusts it. A young one may belong to a run still writing, so one counts only when nothing in
  it changed for `older_than_s` (its age is that of the newest mtime anywhere inside).
- `.corrupt-*`: an artifact that failed its digest check, moved aside for inspection
  (instructflow.artifacts.quarantine) and never trusted again: any age counts.

They are looked for one level below the workspace's `artifacts/<stage>/` dirs and the
per-user cache's `builtin/` and `encoders/` dirs, nowhere else.

A `.tmp-*` dir that anything touched since the start of a run still running in the workspace
(its owner record in `<workspace>/runs/`, instructflow.runs) never counts, whatever
`older_than_s` says: it may be that run's artifact being written (`gc --remove --older-than
0` during a run deleted it, and the run failed at its rename).
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Decides nothing about any stage's output (instructflow.codeid does not follow it).
OUTPUT_NEUTRAL = True

TMP_PREFIX = ".tmp-"
CORRUPT_PREFIX = ".corrupt-"
CACHE_DIRS = ("builtin", "encoders", "gguf")
DAY_S = 86_400.0


@dataclass(frozen=True)
class Leftover:
    path: Path
    bytes: int  # of the regular files inside
    age_s: float  # since anything inside last changed
    reason: str


def _subdirs(parent: Path) -> list[Path]:
    """Real directories (not links) right under parent, by name; none if it does not exist."""
    try:
        with os.scandir(parent) as entries:
            return sorted(Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _candidates(home: Path, cache_root: Path) -> Iterator[Path]:
    parents = [*_subdirs(home / "artifacts"), *(cache_root / d for d in CACHE_DIRS)]
    for parent in parents:
        for path in _subdirs(parent):
            if path.name.startswith((TMP_PREFIX, CORRUPT_PREFIX)):
                yield path


def _measure(root: Path) -> tuple[int, float]:
    """(bytes of the regular files under root, newest mtime of root or anything in it).
    Links are not followed; entries a running writer removes meanwhile are skipped."""
    total, newest = 0, root.lstat().st_mtime
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            newest = max(newest, st.st_mtime)
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total, newest


def leftovers(
    home: Path,
    cache_root: Path | None = None,
    older_than_s: float = DAY_S,
    now: float | None = None,
) -> list[Leftover]:
    """The leftovers of workspace `home` and of the per-user cache (`cache_root`, default
    instructflow.user_cache.cache_root()), `.tmp-*` dirs only when older than
    `older_than_s`; sorted by path."""
    if cache_root is None:
        from instructflow.user_cache import cache_root as default_cache_root

        cache_root = default_cache_root()
    now = time.time() if now is None else now
    busy_since = live_runs_since(Path(home))
    found = []
    for path in _candidates(Path(home), Path(cache_root)):
        try:
            size, newest = _measure(path)
        except FileNotFoundError:  # published (renamed) or removed since it was listed
            continue
        age = max(0.0, now - newest)
        if path.name.startswith(TMP_PREFIX):
            if age < older_than_s or (busy_since is not None and newest >= busy_since):
                continue
            reason = "unpublished temp dir of an interrupted run"
        else:
            reason = "corrupt artifact, quarantined"
        found.append(Leftover(path=path, bytes=size, age_s=age, reason=reason))
    return sorted(found, key=lambda item: item.path)


def live_runs_since(home: Path) -> float | None:
    """When the earliest run still running in workspace `home` started (None: none runs);
    a temp dir it writes changed after that."""
    from instructflow import runs

    starts = [float(o.record.get("started") or 0.0) for o in runs.live(Path(home))]
    # Less a minute: the record's clock and the file system's may differ a little.
    return min(starts) - 60.0 if starts else None


def remove(found: Iterable[Leftover]) -> int:
    """Delete the leftovers; return the bytes freed. One already gone frees nothing; one that
    cannot be deleted entirely (permissions) stays, less what did go: check `path.exists()`."""
    freed = 0
    for item in found:
        # A guard for callers building Leftovers themselves: only ever delete our own dirs.
        if not item.path.name.startswith((TMP_PREFIX, CORRUPT_PREFIX)):
            raise ValueError(f"{item.path}: not a .tmp-* or .corrupt-* dir, not removed")
        try:
            before = _measure(item.path)[0]
        except FileNotFoundError:
            continue
        shutil.rmtree(item.path, ignore_errors=True)
        try:
            after = _measure(item.path)[0]
        except FileNotFoundError:
            after = 0
        freed += before - after
    return freed
