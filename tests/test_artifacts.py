"""Artifacts: content-addressed, verified, and never trusted when half-written."""

from __future__ import annotations

import pytest

from instructflow.artifacts import ArtifactError, verify, write_artifact


def test_artifact_is_content_addressed_and_verified(home):
    def write(tmp):
        (tmp / "a.txt").write_text("hello")
        return {"metrics": {"n": 1}}

    ref = write_artifact("demo", write)
    again = write_artifact("demo", write)
    assert ref.digest == again.digest and ref.path == again.path
    assert verify(ref) is ref
    (ref.dir / "a.txt").write_text("tampered")
    with pytest.raises(ArtifactError, match="digest check"):
        verify(ref)


def test_killed_writer_leaves_nothing_trusted(home):
    def write(tmp):
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise KeyboardInterrupt  # as if killed mid-write

    with pytest.raises(KeyboardInterrupt):
        write_artifact("demo", write)
    stage_dir = home / "artifacts" / "demo"
    assert [p.name for p in stage_dir.iterdir()] == []
