"""Arrow tables saved as datasets folders (save_to_disk) with a content fingerprint, so equal
data gives byte-equal artifacts: tokenize's splits and the teacher's logits."""

from __future__ import annotations

import hashlib
from pathlib import Path


def hash_buffers(h, table) -> None:
    """Feed every buffer of `table` (column by column) into the hash `h`."""
    for col in table.columns:
        for chunk in col.chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(buf)


def save_dataset(table, path: Path, fingerprint: str) -> None:
    """datasets' save_to_disk, quietly: the CLI has its own progress view."""
    import datasets

    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        datasets.Dataset(table, fingerprint=fingerprint).save_to_disk(str(path))
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def save_table(table, path: Path) -> None:
    """save_to_disk with a content fingerprint, so equal data gives byte-equal artifacts."""
    h = hashlib.sha256()
    hash_buffers(h, table)
    save_dataset(table, path, h.hexdigest()[:16])
