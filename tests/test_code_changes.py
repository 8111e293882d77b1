"""Cache keys follow the code through the real pipeline: in a copy of the project, a module
that train reaches only through another module is edited, and exactly train and the stages
after it re-run; a comment-only edit re-runs nothing. Code a stage does not import stays out
of its key: editing the download stage's HTTP code or a demo fact leaves a local model's
tokenize, train and evaluate cached."""

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


def _run(copy: Path, home: Path, summary: Path, sets: tuple[str, ...] = ()) -> dict[str, str]:
    args = [sys.executable, "-m", "instructflow.cli", "run", "--plain"]
    args += ["--summary-json", str(summary)]
    for item in [*SETS, *sets]:
        args += ["--set", item]
    env = {**os.environ, "INSTRUCTFLOW_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(args, cwd=copy, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {k: v["state"] for k, v in json.loads(summary.read_text())["stages"].items()}


def _copy_project(tmp_path: Path) -> Path:
    copy = tmp_path / "project"
    for part in ("instructflow", "tasks", "flows", "configs"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path}: {old!r} is not there once; update this test"
    path.write_text(text.replace(old, new))


def test_an_indirectly_imported_module_reruns_exactly_the_stages_that_reach_it(tmp_path):
    copy = _copy_project(tmp_path)
    # A module imported by instructflow/loading.py only: train, evaluate and register reach it
    # through loading; download ... tokenize do not reach it at all.
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
    after = STAGES.index("train")
    assert [second[s] for s in STAGES[:after]] == ["Cached"] * after
    # register never caches (it reads live registry state); the others re-ran for the code.
    assert [second[s] for s in STAGES[after:]] == ["Completed"] * (len(STAGES) - after)

    probe.write_text("# what the limit is for\nLIMIT = 2  # unchanged value\n")  # comments only
    third = _run(copy, home, tmp_path / "3.json")
    assert {third[s] for s in STAGES if s != "register"} == {"Cached"}


def test_download_code_and_demo_facts_stay_out_of_a_local_models_keys(tmp_path):
    """The edits the issue named: the download stage's HTTP code, and one of builtin:tiny's
    400 facts. With a local base model and a local data file, neither reaches tokenize,
    train or evaluate."""
    from instructflow.builtin.model import build_model, build_tokenizer

    copy = _copy_project(tmp_path)
    base = tmp_path / "my-base"
    tok = build_tokenizer()
    tok.save_pretrained(str(base))
    build_model(tok).save_pretrained(str(base), safe_serialization=True)
    data = tmp_path / "rows.jsonl"
    rows = [
        {"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)}
        for i in range(60)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = (f"data.source={data}", f"model.name_or_path={base}")
    home = tmp_path / "home"
    first = _run(copy, home, tmp_path / "1.json", sets)
    assert set(first.values()) == {"Completed"}

    _edit(
        copy / "tasks" / "download.py",
        "follow_redirects=True) as resp:",
        "follow_redirects=True, trust_env=False) as resp:",
    )
    second = _run(copy, home, tmp_path / "2.json", sets)
    # download re-runs for its code; its output is the same file, so nothing after it does.
    assert second["download"] == "Completed"
    assert [second[s] for s in STAGES[1:-1]] == ["Cached"] * (len(STAGES) - 2)

    _edit(copy / "instructflow" / "builtin" / "world.py", "Albania|Tirana", "Albania|Durres")
    third = _run(copy, home, tmp_path / "3.json", sets)
    assert {third[s] for s in ("tokenize", "train")} == {"Cached"}, third
