"""The workspace: everything a run writes lives under one directory (INSTRUCTFLOW_HOME).

`configure()` must run before prefect or mlflow are imported: both read their settings
from the environment when first imported.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

# Not part of stage code digests (instructflow.codeid): it decides where files go, not what
# they hold.
OUTPUT_NEUTRAL = True
DEFAULT_HOME = ".instructflow"


def home() -> Path:
    return Path(os.environ.get("INSTRUCTFLOW_HOME", DEFAULT_HOME)).resolve()


def artifacts_dir() -> Path:
    return home() / "artifacts"


def work_dir(stage: str, key: str) -> Path:
    """A stage's scratch space for one cache key (e.g. train checkpoints); survives crashes."""
    path = home() / "work" / stage / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def prefect_results_dir() -> Path:
    return home() / "prefect" / "results"


def mlflow_db_uri() -> str:
    return f"sqlite:///{home() / 'mlflow.db'}"


def mlflow_artifact_root() -> Path:
    return home() / "mlartifacts"


def configure(path: str | os.PathLike[str] | None = None) -> Path:
    """Point Prefect, MLflow and HF caches' writes into the workspace (setdefault: env wins)."""
    if path is not None:
        os.environ["INSTRUCTFLOW_HOME"] = str(Path(path).resolve())
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    defaults = {
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(prefect_results_dir()),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        # Measured with prefect 3.9.1: the ephemeral server takes 8-22 s to start here and its
        # default 20 s startup timeout was hit; analytics print a "database is locked" traceback.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
        # ...but the flow run's own lines (one per stage) reach the Prefect UI's run logs.
        "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL": "INFO",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # MLflow's default HTTP retries back off for minutes: a dead server must fail fast.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
        "TOKENIZERS_PARALLELISM": "false",
        # Nothing is written outside the workspace by default (set HF_HOME to share a hub cache).
        "HF_HOME": str(root / "hf"),
        "MPLCONFIGDIR": str(root / "matplotlib"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return root


def ensure_mlflow_store(uri: str) -> None:
    """Make a sqlite MLflow store whole before MLflow opens it.

    MLflow creates its tables by running its migrations on the store in place, which takes
    seconds and is not transactional: a kill in between left a store every later run failed
    on ("table _alembic_tmp_runs already exists"). So a new store is migrated under a
    temporary name and renamed into place once complete, and a store short of MLflow's
    schema is rebuilt when it holds no runs (one that holds runs, or cannot be read, is left
    for MLflow to report). Under the lock tracking.setup takes for the same store."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if _store_state(db) == "complete":
        return
    from instructflow import waits

    with waits.cache_lock(f"{db}.lock", f"creating the MLflow store {db}", 300):
        if _store_state(db) not in ("missing", "half-made"):
            return
        for stale in db.parent.glob(f".{db.name}.tmp-*"):  # a killed build's
            stale.unlink(missing_ok=True)
        tmp = db.with_name(f".{db.name}.tmp-{os.getpid()}")
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = SqlAlchemyStore(f"sqlite:///{tmp}", mlflow_artifact_root().as_uri())
        store.engine.dispose()
        for suffix in ("-journal", "-wal", "-shm"):  # the old store's, not the new one's
            db.with_name(db.name + suffix).unlink(missing_ok=True)
        os.replace(tmp, db)


def _store_state(db: Path) -> str:
    """complete | missing | half-made (no runs) | has runs (not complete) | unreadable."""
    if not db.is_file():
        return "missing"
    from mlflow.store.db.utils import _get_latest_schema_revision

    try:
        # Read-write: SQLite rolls back a journal a killed write left, as MLflow would.
        with contextlib.closing(sqlite3.connect(db, timeout=60)) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            version = None
            if "alembic_version" in tables:
                version = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            half = any(t.startswith("_alembic_tmp_") for t in tables)
            if version and version[0] == _get_latest_schema_revision() and not half:
                return "complete"
            held = "runs" in tables and conn.execute("SELECT count(*) FROM runs").fetchone()[0]
    except sqlite3.DatabaseError:
        return "unreadable"
    return "has runs" if held else "half-made"
