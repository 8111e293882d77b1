"""Test setup: a throwaway workspace per test, real Prefect (ephemeral API) and real MLflow.

The environment is set before prefect/mlflow are imported: both read it on import. Prefect's
own home (its ephemeral API database) is shared by the whole session, since starting the
ephemeral server costs 8-22 s; so is the per-user cache of the pre-trained built-in model;
artifacts, result records and the MLflow store are per test.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
sys.path.insert(0, str(ROOT))

_session_home = Path(tempfile.mkdtemp(prefix="instructflow-tests-"))
os.environ["INSTRUCTFLOW_HOME"] = str(_session_home / "home")
# The pre-trained builtin:tiny is built once per test session (the first test that needs it
# pays ~2.5 min) and shared by every test and CLI subprocess; never the user's own cache, so
# CI really builds it. INSTRUCTFLOW_TEST_CACHE reuses one across sessions while developing.
os.environ["INSTRUCTFLOW_CACHE"] = os.environ.get(
    "INSTRUCTFLOW_TEST_CACHE", str(_session_home / "cache")
)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from instructflow import workspace  # noqa: E402

workspace.configure()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh INSTRUCTFLOW_HOME for one test."""
    path = tmp_path / "home"
    monkeypatch.setenv("INSTRUCTFLOW_HOME", str(path))
    path.mkdir()
    import mlflow

    mlflow.set_tracking_uri(workspace.mlflow_db_uri())
    yield path
    if mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture
def shared_datasets() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present")
    return SHARED
