"""Cache keys follow the code through the real pipeline: in a copy of the project, a module
that tokenize reaches only through another module is edited, and exactly tokenize and the
stages after it re-run; a comment-only edit re-runs nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SETS = [
    "data.demo_rows=40",
    "train.max_steps=2",
    "train.save_steps=2",
    "train.eval_steps=2",
    "evaluate.max_examples=4",
    "evaluate.max_new_tokens=4",
    "judge.backend=none",
    "tracking.log_system_metrics=false",
]


def _run(copy: Path, home: Path, summary: Path) -> dict[str, str]:
    args = [sys.executable, "-m", "instructflow.cli", "run", "--plain"]
    args += ["--summary-json", str(summary)]
    for item in SETS:
        args += ["--set", item]
    env = {**os.environ, "INSTRUCTFLOW_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(args, cwd=copy, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {k: v["state"] for k, v in json.loads(summary.read_text())["stages"].items()}


def test_an_indirectly_imported_module_reruns_exactly_the_stages_that_reach_it(tmp_path):
    copy = tmp_path / "project"
    for part in ("instructflow", "tasks", "flows", "configs"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    # A module imported by instructflow/loading.py only: tokenize, train, evaluate and register
    # reach it through loading; download ... split do not reach it at all.
    probe = copy / "instructflow" / "probe_dep.py"
    probe.write_text("LIMIT = 1\n")
    loading = copy / "instructflow" / "loading.py"
    text = loading.read_text()
    loading.write_text(
        text.replace(
            "\nclass LoadError",
            "\nfrom instructflow import probe_dep  # noqa: F401\n\n\nclass LoadError",
            1,
        )
    )
    home = tmp_path / "home"

    first = _run(copy, home, tmp_path / "1.json")
    assert set(first.values()) == {"Completed"}

    probe.write_text("LIMIT = 2\n")  # a code change
    second = _run(copy, home, tmp_path / "2.json")
    after = STAGES.index("tokenize")
    assert [second[s] for s in STAGES[:after]] == ["Cached"] * after
    # register never caches (it reads live registry state); the others re-ran for the code.
    assert [second[s] for s in STAGES[after:]] == ["Completed"] * (len(STAGES) - after)

    probe.write_text("# what the limit is for\nLIMIT = 2  # unchanged value\n")  # comments only
    third = _run(copy, home, tmp_path / "3.json")
    assert {third[s] for s in STAGES if s != "register"} == {"Cached"}
