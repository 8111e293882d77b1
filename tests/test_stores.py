"""A disk that really fills and stores that are damaged: one line naming the path or the file
and what to do, no traceback; after the fix, the next run works and nothing stays Running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tmpfs import mounted_tmpfs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SMALL = [
    "data.demo_rows=40",
    "train.method=lora",
    "train.max_steps=20",
    "train.save_steps=5",
    "train.eval_steps=100",
    "evaluate.max_examples=4",
    "evaluate.max_new_tokens=4",
    "judge.backend=none",
    "tracking.log_system_metrics=false",
]


def _cli(home: Path, *args: str, server: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if server:  # the workspace's own Prefect server, not the test session's
        env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "instructflow.cli", "--home", str(home), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _run(home: Path, *sets: str, server: bool = False, until: str | None = None):
    args = ["run", "--plain", *(["--until", until] if until else [])]
    for item in [*SMALL, *sets]:
        args += ["--set", item]
    return _cli(home, *args, server=server)


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stderr + proc.stdout
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 MB tmpfs."""
    yield from mounted_tmpfs(tmp_path / "small", 64)


def test_a_full_disk_fails_in_one_line_and_the_run_is_closed_later(small_disk):
    from mlflow.tracking import MlflowClient

    home = small_disk / "home"
    first = _run(home, "tracking.min_free_disk_mb=0", until="download")
    assert first.returncode == 0, first.stderr[-2000:]
    # Fill the disk but for 2 MB: the base model's 5 MB copy cannot fit.
    ballast = small_disk / "ballast"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    with open(ballast, "wb") as fh:
        fh.write(b"\0" * (free - 2 * 2**20))
    full = _run(home, "tracking.min_free_disk_mb=0")
    assert full.returncode == 1
    lines = _errors(full)
    # e.g. "error: base_model failed: disk full: no space left writing <path> (1 MB free on ...)"
    assert len(lines) == 1 and "disk full: no space left writing " in lines[0], lines
    assert f"MB free on {small_disk}" in lines[0], lines[0]

    ballast.unlink()
    again = _cli(home, "runs", "--reconcile")
    assert again.returncode == 0, again.stderr
    store = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exps = [e.experiment_id for e in store.search_experiments()]
    assert store.search_runs(exps, "attributes.status = 'RUNNING'") == []
    statuses = {r.info.status for r in store.search_runs(exps)}
    assert "FAILED" in statuses


def _mlflow_run_ids(home: Path) -> set[str]:
    from mlflow.tracking import MlflowClient

    store = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exps = [e.experiment_id for e in store.search_experiments()]
    return {r.info.run_id for r in store.search_runs(exps)}


def test_a_damaged_mlflow_store_is_named_with_its_recovery(tmp_path):
    home = tmp_path / "home"
    assert _run(home, until="download").returncode == 0
    db = home / "mlflow.db"
    db.write_bytes(db.read_bytes()[:100])  # truncated
    broken = _run(home, until="download")
    assert broken.returncode == 1
    (line,) = _errors(broken)
    assert f"{db} is damaged: the MLflow tracking store" in line and f"mv {db} {db}.broken" in line
    db.rename(db.with_name("mlflow.db.broken"))
    fixed = _run(home, until="download")
    assert fixed.returncode == 0 and "download  Cached" in fixed.stdout


def test_a_damaged_prefect_database_is_named_with_its_recovery(tmp_path):
    home = tmp_path / "home"
    try:
        assert _run(home, until="download", server=True).returncode == 0
        assert _cli(home, "server", "stop").returncode == 0
        db = home / "prefect" / "prefect.db"
        db.write_bytes(b"this is not a database" * 10)
        broken = _run(home, until="download", server=True)
        assert broken.returncode == 1
        (line,) = _errors(broken)
        assert f"{db} is damaged: the Prefect server's database" in line, line
        # It says what really happens (before: "the model is registered again in a fresh
        # store", which is the MLflow store's case, not this one's).
        assert f"instructflow server stop; mv {db} {db}.broken" in line, line
        assert "finished stages are Cached and nothing is registered again" in line, line
        mlflow_runs = _mlflow_run_ids(home)
        assert _cli(home, "server", "stop").returncode == 0
        db.rename(db.with_name("prefect.db.broken"))
        fixed = _run(home, until="download", server=True)
        assert fixed.returncode == 0, fixed.stderr[-2000:]
        assert "download  Cached" in fixed.stdout  # its cache record is a file, not a row
        assert mlflow_runs < _mlflow_run_ids(home)  # the MLflow store was not touched
    finally:
        _cli(home, "server", "stop")
