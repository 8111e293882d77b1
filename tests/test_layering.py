"""The layering rule (issue 30): a stage (tasks/*.py) imports only the library, never another
stage or the flow, and Prefect is imported only by the modules that wire runs to it (that the
library imports no stage: tests/test_codeid.py). Code identity follows imports
(instructflow.codeid): a stage importing another re-ran whenever that one's code changed."""

from __future__ import annotations

from pathlib import Path

from instructflow import codeid

ROOT = Path(__file__).resolve().parents[1]
# The Prefect layer: stage tasks and caching, the run, its reports, the CLI, the servers.
PREFECT_LAYER = {
    "instructflow/caching.py",
    "instructflow/cli.py",
    "instructflow/notify.py",
    "instructflow/pipeline.py",
    "instructflow/prefect_report.py",
    "instructflow/prefect_server.py",
    "instructflow/prefect_watch.py",
    "instructflow/runs.py",
}


def top(module: str) -> str:
    return module.split(".")[0]


def test_a_stage_imports_no_other_stage_and_no_flow():
    stages = sorted((ROOT / "tasks").glob("*.py"))
    assert len(stages) > 10
    edges = {
        f"{path.name} -> {module}"
        for path in stages
        for module in codeid.imported_modules(path)
        if top(module) in ("tasks", "flows")
    }
    assert not edges, sorted(edges)


def test_only_the_prefect_layer_imports_prefect():
    wrong = set()
    for path in sorted((ROOT / "instructflow").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in PREFECT_LAYER or rel.startswith("instructflow/commands/"):
            continue
        wrong |= {
            f"{rel} imports {m}" for m in codeid.imported_modules(path) if top(m) == "prefect"
        }
    assert not wrong, sorted(wrong)
