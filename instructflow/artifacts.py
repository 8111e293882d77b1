"""Content-addressed, atomically written artifacts and the small references stages pass.

An artifact is a directory `artifacts/<stage>/<digest>/` holding the stage's files and a
`MANIFEST.json` ({digest, files: {relpath: sha256}, meta}). The digest covers file names and
contents only; `meta` carries figures to log (metrics, which files to log, datasets).
Writers build in a temp dir beside the target and `rename` it into place, so a killed run
leaves only a `.tmp-*` dir that nothing trusts. Readers call `verify` before trusting one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from instructflow import workspace

MANIFEST = "MANIFEST.json"
_CHUNK = 1 << 20


class ArtifactError(RuntimeError):
    """An artifact is missing or does not match its digest."""


class ArtifactRef(BaseModel):
    """What stages pass to each other: where the files are and what they hash to."""

    stage: str
    path: str
    digest: str

    @property
    def dir(self) -> Path:
        return Path(self.path)

    def file(self, name: str) -> Path:
        return Path(self.path) / name

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.file(MANIFEST).read_text(encoding="utf-8"))

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest().get("meta", {})

    @property
    def figures(self) -> dict[str, Any]:
        """Every number the stage reported: MLflow metrics and bookkeeping figures together."""
        meta = self.meta
        return {**meta.get("figures", {}), **meta.get("metrics", {})}

    def short(self) -> str:
        return self.digest[:12]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root (except the manifest), keyed by posix relpath."""
    files: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(root).as_posix()] = sha256_file(p)
    return files


def digest_of(files: dict[str, str]) -> str:
    blob = json.dumps(sorted(files.items()), separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_artifact(
    stage: str,
    writer: Callable[[Path], dict[str, Any] | None],
    *,
    root: Path | None = None,
) -> ArtifactRef:
    """Run `writer(tmp_dir)` (it returns the meta dict), then publish atomically by digest."""
    base = (root or workspace.artifacts_dir()) / stage
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
    try:
        meta = writer(tmp) or {}
        files = hash_tree(tmp)
        digest = digest_of(files)
        manifest = {"stage": stage, "digest": digest, "files": files, "meta": meta}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str), encoding="utf-8")
        _fsync_tree(tmp)
        _fault_pause(stage)
        final = base / digest
        if final.exists():
            if _is_valid(final, digest):
                # Same content already published (another run or process): keep the first.
                shutil.rmtree(tmp, ignore_errors=True)
                return ArtifactRef(stage=stage, path=str(final), digest=digest)
            quarantine(final)
        try:
            os.rename(tmp, final)
        except OSError:
            # Lost a race with a concurrent writer of identical content.
            shutil.rmtree(tmp, ignore_errors=True)
            if not _is_valid(final, digest):
                raise
        return ArtifactRef(stage=stage, path=str(final), digest=digest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fault_pause(stage: str) -> None:
    """Fault injection for tests: hold a finished-but-unpublished artifact so a test can
    SIGKILL the process exactly between writing and the atomic rename."""
    if os.environ.get("INSTRUCTFLOW_FAULT_PAUSE_STAGE") == stage:
        import time

        marker = os.environ.get("INSTRUCTFLOW_FAULT_MARKER")
        if marker:
            Path(marker).write_text(stage)
        time.sleep(float(os.environ.get("INSTRUCTFLOW_FAULT_PAUSE_S", "60")))


def _is_valid(path: Path, digest: str) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("digest") != digest:
        return False
    files = hash_tree(path)
    return files == manifest.get("files") and digest_of(files) == digest


def folder_intact(path: Path) -> bool:
    """Whether a folder published with a MANIFEST.json ({digest, files}) still matches it."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = hash_tree(Path(path))
    return files == manifest.get("files") and digest_of(files) == manifest.get("digest")


def verify(ref: ArtifactRef) -> ArtifactRef:
    """Raise ArtifactError unless the files on disk still hash to `ref.digest`."""
    if not ref.dir.is_dir():
        raise ArtifactError(f"{ref.stage} artifact {ref.short()} is missing ({ref.path})")
    if not _is_valid(ref.dir, ref.digest):
        raise ArtifactError(
            f"{ref.stage} artifact {ref.short()} failed its digest check ({ref.path})"
        )
    return ref


def is_valid(ref: ArtifactRef) -> bool:
    try:
        verify(ref)
    except ArtifactError:
        return False
    return True


def quarantine(path: Path) -> None:
    """Move a corrupt artifact aside (kept for inspection, never trusted again)."""
    target = path.with_name(f".corrupt-{path.name}-{os.getpid()}")
    shutil.rmtree(target, ignore_errors=True)
    os.rename(path, target)
