"""One line for the failures an operator must act on, whatever layer raised them.

A full disk surfaces as an OSError (ENOSPC) from an artifact write, as torch's
"unexpected pos" from a checkpoint's zip writer, or as SQLite's "database or disk is full"
from MLflow or Prefect; a damaged store as SQLite's "database disk image is malformed" or
"file is not a database" without saying which file. `explain` turns any of these, found
anywhere in an exception's chain, into one line that names the path, the free space or the
damaged file, and what to do.
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from instructflow import workspace

# Error messages; they change no stage's output (instructflow.codeid).
OUTPUT_NEUTRAL = True
FULL_HINTS = ("no space left on device", "database or disk is full", "unexpected pos")
DAMAGED_HINTS = ("database disk image is malformed", "file is not a database")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def _free_mb(path: Path) -> tuple[float, Path]:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free / 2**20, probe


def disk_full(exc: BaseException) -> str | None:
    for e in _chain(exc):
        text = str(e).lower()
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or any(
            h in text for h in FULL_HINTS
        ):
            path = Path(getattr(e, "filename", None) or workspace.home())
            free, where = _free_mb(path)
            return (
                f"disk full: no space left writing {path} ({free:.0f} MB free on {where}); "
                "free some space and run again (finished stages are Cached)"
            )
    return None


def _damaged(db: Path) -> bool:
    if not db.is_file():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute("PRAGMA quick_check").fetchone()[0] != "ok"
    except sqlite3.DatabaseError:
        return True


def damaged_store(exc: BaseException) -> str | None:
    if not any(any(h in str(e).lower() for h in DAMAGED_HINTS) for e in _chain(exc)):
        return None
    return check_stores() or (
        "a SQLite store is damaged (database disk image is malformed); run with --debug"
    )


def check_stores() -> str | None:
    """The recovery line for the first damaged SQLite store of the workspace, if any."""
    home = workspace.home()
    mlflow_db, prefect_db = home / "mlflow.db", home / "prefect" / "prefect.db"
    # What really follows the move, store by store: each is remade empty at the next run, the
    # other one and the artifacts are untouched (stage cache records are files, not rows).
    stores = {
        mlflow_db: (
            "the MLflow tracking store (runs, metrics, the model registry)",
            f"mv {mlflow_db} {mlflow_db}.broken",
            "a new empty store is made (earlier runs and model versions stay in the .broken "
            "file); artifacts stay valid, finished stages are Cached, and register (when "
            "enabled) registers the model anew, as version 1",
        ),
        prefect_db: (
            "the Prefect server's database (flow run history)",
            f"instructflow server stop; mv {prefect_db} {prefect_db}.broken",
            "the workspace's Prefect server starts on a new empty database (earlier flow runs "
            "stay in the .broken file); artifacts, cache records and MLflow runs and models "
            "are untouched, finished stages are Cached and nothing is registered again",
        ),
    }
    for db, (what, fix, then) in stores.items():
        if _damaged(db):
            return f"{db} is damaged: {what}. Move it aside ({fix}) and run again: {then}"
    return None


def explain(exc: BaseException) -> str | None:
    """One actionable line for a full disk or a damaged store anywhere in `exc`'s chain."""
    return disk_full(exc) or damaged_store(exc)
