"""The code identity of a stage, derived from what it imports: no hand-kept lists.

A stage's code digest covers its own module and every project module it imports,
transitively (the static import graph of the `instructflow`, `tasks` and `flows` packages,
imports inside functions included, plus the `__init__` of every package on the way). So
editing a module that a stage reaches only indirectly re-runs that stage and the ones after
it, and nothing else.

What counts: a module's *code*, as its syntax tree without docstrings. Comments, docstrings
and formatting do not count, so rewording a comment or reformatting re-runs nothing.
Modules that declare `OUTPUT_NEUTRAL = True` (logging, progress display, paths, the cache and
config machinery: their effect on a stage's output is nil or already in the key, e.g. the
config section's JSON) are not followed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import tempfile
from pathlib import Path

# The key machinery itself: a change here changes every digest anyway.
OUTPUT_NEUTRAL = True
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("instructflow", "tasks", "flows")
NEUTRAL_MARKER = "OUTPUT_NEUTRAL"


def _module_file(name: str) -> Path | None:
    """The file of a project module `a.b.c` (a module file or a package's __init__)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _module_imports(tree: ast.Module, path: Path) -> set[str]:
    """Every module name `tree` (the file `path`) imports anywhere, with parent packages."""
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update(_with_parents(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".") if package else []
                anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                module = ".".join([*anchor, *(node.module.split(".") if node.module else [])])
            else:
                module = node.module or ""
            found.update(_with_parents(module))
            # `from pkg import sub` may name a submodule rather than an attribute.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _declares_neutral(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == NEUTRAL_MARKER for t in node.targets
        ):
            return isinstance(node.value, ast.Constant) and node.value.value is True
    return False


def _syntax_identity(tree: ast.Module) -> str:
    """The syntax tree without docstrings, comments or formatting (mutates `tree`)."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            body[0] = ast.Pass()  # keep the body non-empty
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


# Parsing every module of every stage's closure took ~1 s of each run's start, so what a
# file's syntax says (identity, imports, marker) is remembered by its path and exact bytes,
# in memory and in ROOT/__pycache__ (like .pyc files, but keyed by content, not mtime: two
# same-size edits within a timestamp tick cannot alias).
_memo: dict[str, dict] = {}
_stores: dict[Path, dict] = {}
_unsaved: set[Path] = set()


def _store() -> dict:
    path = ROOT / "__pycache__" / "instructflow-codeid.json"
    if path not in _stores:
        try:
            _stores[path] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            _stores[path] = {}
    return _stores[path]


def _save() -> None:
    for path in list(_unsaved):
        _unsaved.discard(path)
        try:  # best effort: a read-only install just parses again next time
            path.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-codeid-")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(_stores[path], fh)
            os.replace(tmp, path)
        except OSError:
            pass


def _facts(path: Path) -> dict:
    data = path.read_bytes()
    rel = path.relative_to(ROOT).as_posix()
    key = hashlib.sha256(rel.encode() + b"\0" + data).hexdigest()
    facts = _memo.get(key)
    if facts is None:
        store = _store()
        facts = store.get(key)
        if facts is None:
            tree = ast.parse(data.decode("utf-8"), filename=str(path))
            facts = {
                "imports": sorted(_module_imports(tree, path)),
                "neutral": _declares_neutral(tree),
                "identity": hashlib.sha256(_syntax_identity(tree).encode()).hexdigest(),
            }
            store[key] = facts
            _unsaved.add(ROOT / "__pycache__" / "instructflow-codeid.json")
        _memo[key] = facts
    return facts


def imported_modules(path: Path) -> set[str]:
    """Project modules `path` imports anywhere in its body (with their parent packages)."""
    return {m for m in _facts(path)["imports"] if _module_file(m) is not None}


def _neutral(path: Path) -> bool:
    return _facts(path)["neutral"]


def closure(path: Path) -> list[Path]:
    """`path` and every project module file it reaches, sorted; neutral ones not followed."""
    seen: set[Path] = set()
    todo = [path.resolve()]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name in imported_modules(current):
            dep = _module_file(name)
            if dep is not None and dep.resolve() not in seen and not _neutral(dep):
                todo.append(dep.resolve())
    return sorted(seen)


def digest(path: str | Path) -> str:
    """The code digest of module `path`: its closure's identities, by path relative to ROOT."""
    h = hashlib.sha256()
    for f in closure(Path(path)):
        h.update(f.relative_to(ROOT).as_posix().encode())
        h.update(_facts(f)["identity"].encode())
    _save()
    return h.hexdigest()[:16]
