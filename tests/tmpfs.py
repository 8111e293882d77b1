"""A real tmpfs for the disk-full tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def mounted_tmpfs(folder: Path, size_mb: int):
    """A real tmpfs of `size_mb` at `folder` (a generator for fixtures: yields the mount point,
    unmounts after). Needs root, as CI runs; skipped with the reason elsewhere."""
    folder.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()} (CI runs as root)")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)
