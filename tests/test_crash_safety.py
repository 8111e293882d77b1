"""Kill a run inside each data stage, run two runs at once: nothing half-written is trusted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.stages import STAGES
from instructflow.artifacts import ArtifactRef, verify

ROOT = Path(__file__).resolve().parents[1]
DATA_STAGES = list(STAGES[: STAGES.index("tokenize") + 1])
SMALL = ["--set", "data.demo_rows=120"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "INSTRUCTFLOW_HOME": str(home), **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run_args(summary: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "instructflow.cli",
        "run",
        "--plain",
        "--until",
        "tokenize",
        "--summary-json",
        str(summary),
        *SMALL,
    ]


def _published(home: Path) -> dict[str, int]:
    """Published artifacts per stage dir, each verified against its digest (raises if not)."""
    counts: dict[str, int] = {}
    for stage_dir in (home / "artifacts").iterdir():
        for art in stage_dir.iterdir():
            if art.name.startswith("."):
                continue
            verify(ArtifactRef(stage=stage_dir.name, path=str(art), digest=art.name))
            counts[stage_dir.name] = counts.get(stage_dir.name, 0) + 1
    return counts


@pytest.mark.slow
def test_sigkill_inside_each_data_stage_then_rerun_completes(tmp_path):
    home = tmp_path / "home"
    marker = tmp_path / "marker"
    for stage in DATA_STAGES:
        marker.unlink(missing_ok=True)
        env = _env(
            home, INSTRUCTFLOW_FAULT_PAUSE_STAGE=stage, INSTRUCTFLOW_FAULT_MARKER=str(marker)
        )
        proc = subprocess.Popen(
            _run_args(tmp_path / "killed.json"),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), f"never reached the {stage} publish point"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # The killed stage left only an unpublished temp dir, which nothing trusts.
        leftovers = [p.name for p in (home / "artifacts" / stage).iterdir()]
        assert any(name.startswith(".tmp-") for name in leftovers), leftovers
        # Exactly the stages before the killed one are published, once each, all intact (the
        # tokenizer helper is published before tokenize runs).
        before = DATA_STAGES[: DATA_STAGES.index(stage)]
        expected = {s: 1 for s in before} | ({"tokenizer": 1} if stage == "tokenize" else {})
        assert _published(home) == expected

    summary = tmp_path / "final.json"
    done = subprocess.run(
        _run_args(summary), cwd=ROOT, env=_env(home), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    states = {k: v["state"] for k, v in json.loads(summary.read_text())["stages"].items()}
    # Every stage finished before its kill is reused; the last killed one is recomputed.
    assert [states[s] for s in DATA_STAGES] == ["Cached"] * 4 + ["Completed"], states
    assert _published(home) == {s: 1 for s in DATA_STAGES} | {"tokenizer": 1}


@pytest.mark.slow
def test_two_concurrent_runs_share_one_workspace_safely(tmp_path):
    home = tmp_path / "home"
    procs = [
        subprocess.Popen(
            _run_args(tmp_path / f"s{i}.json"),
            cwd=ROOT,
            env=_env(home),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    a, b = (json.loads((tmp_path / f"s{i}.json").read_text())["stages"] for i in range(2))
    for stage in DATA_STAGES:
        assert a[stage]["artifact_digest"] == b[stage]["artifact_digest"], stage
        # Content addressing: one published directory per stage, whoever wrote it.
        published = [
            p for p in (home / "artifacts" / stage).iterdir() if not p.name.startswith(".")
        ]
        assert len(published) == 1, (stage, published)
    _published(home)  # every published artifact verifies
