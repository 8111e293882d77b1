"""The workspace: everything a run writes lives under one directory (INSTRUCTFLOW_HOME).

`configure()` must run before prefect or mlflow are imported: both read their settings
from the environment when first imported.
"""

from __future__ import annotations

import os
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
