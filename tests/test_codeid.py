"""Stage code digests come from the import graph (instructflow.codeid), not hand lists; and
the library's own rules: no import cycles, `instructflow/` never imports the stages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from instructflow import codeid

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def copy(tmp_path, monkeypatch) -> Path:
    """A copy of the project's packages, which codeid then reads."""
    for pkg in codeid.PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codeid, "ROOT", tmp_path)
    yield tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_indirect_imports_count_and_comments_do_not(copy):
    evaluate, split = copy / "tasks/evaluate.py", copy / "tasks/split.py"
    reached = {p.relative_to(copy).as_posix() for p in codeid.closure(evaluate)}
    # evaluate -> judge -> model_specs (imported in a function) -> builtin.model: a judge
    # named builtin:tiny is the model that code pre-trains.
    assert "instructflow/builtin/model.py" in reached
    assert "instructflow/loading.py" in reached and "instructflow/rows.py" in reached
    # A stage's closure holds no other stage (tests/test_layering.py): split's code is not in it.
    assert {p for p in reached if p.startswith("tasks/")} == {"tasks/evaluate.py"}
    # Output-neutral modules (progress display, config schema, paths) are not followed.
    assert not reached & {"instructflow/progress.py", "instructflow/config.py"}
    before = {t: codeid.digest(t) for t in (evaluate, split)}

    # A comment, a docstring and reformatting change nothing.
    model = copy / "instructflow/builtin/model.py"
    _edit(model, "def probe(", "# a new comment\n\n\ndef probe(")
    _edit(model, '    """The built-in architecture,', '    """Reworded: the built-in architecture,')
    _edit(model, "return LlamaForCausalLM(config)", "return LlamaForCausalLM( config )")
    assert {t: codeid.digest(t) for t in (evaluate, split)} == before

    # A code change in a module evaluate reaches only indirectly changes evaluate's digest,
    # and not that of split, which does not reach it.
    _edit(model, "VOCAB_SIZE = 2048", "VOCAB_SIZE = 2049")
    assert codeid.digest(evaluate) != before[evaluate]
    assert codeid.digest(split) == before[split]


def test_model_loading_from_artifacts_keeps_the_builtin_models_and_download_out():
    """The stages that read a base-model artifact load from its folder (instructflow.loading):
    the code that builds builtin:tiny, converts GGUF files or fetches data is base_model's and
    download's, not theirs. Closures as small as this are what keep a nightly retrain cached."""
    builtin = {"instructflow/builtin/model.py", "instructflow/builtin/world.py"}
    for stage, at_most in (("tokenize", 10), ("train", 20), ("distill", 20)):
        reached = {
            p.relative_to(ROOT).as_posix() for p in codeid.closure(ROOT / f"tasks/{stage}.py")
        }
        assert not reached & (builtin | {"tasks/download.py", "instructflow/model_specs.py"})
        assert len(reached) <= at_most, (stage, sorted(reached))


def test_no_import_cycles_and_the_library_never_imports_stages():
    graph: dict[str, set[str]] = {}
    for pkg in codeid.PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = codeid._module_name(path)
            deps = codeid.imported_modules(path)  # function-level imports included
            graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}

    # instructflow/ is the library: it never imports tasks/; only the CLI and its commands
    # (the application layer) start flows.
    for name, deps in graph.items():
        if not name.startswith("instructflow"):
            continue
        assert not {d for d in deps if d.split(".")[0] == "tasks"}, name
        if not name.startswith(("instructflow.cli", "instructflow.commands")):
            assert not {d for d in deps if d.split(".")[0] == "flows"}, name

    # No cycles (depth-first search with colours).
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError(" -> ".join([*trail, node, dep]))
            if dep in graph and not state.get(dep):
                visit(dep, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [])
