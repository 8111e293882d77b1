"""Small helpers on canonical rows (what validate writes and every later stage reads)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from instructflow.artifacts import ArtifactRef


class RowsError(ValueError):
    """A JSONL file that cannot be read; the message names the file and line."""


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except ValueError:
                raise RowsError(f"{path}:{n}: not valid JSON") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every non-blank line of a JSONL file as a dict."""
    return [row for _, row in iter_jsonl(path)]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]], ascii_only: bool = False) -> None:
    """One JSON object per line (UTF-8, non-ASCII kept unless `ascii_only`)."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=ascii_only) + "\n")


def column(row: dict[str, Any], path: str) -> str:
    """A row's value at a dotted path (e.g. meta.task), as text; '' when absent."""
    value: Any = row
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def iter_batches(path: Path, size: int) -> Iterator[list[dict[str, Any]]]:
    """The rows of a JSONL file, `size` at a time: what stages use to stay in bounded memory
    on files of millions of rows."""
    batch: list[dict[str, Any]] = []
    for _, row in iter_jsonl(path):
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def iter_value_blocks(path: Path, size: int = 10_000) -> Iterator[list[Any]]:
    """The JSON values of a file with one per line, `size` at a time (e.g. scratch files of
    texts that a stage reads more than once)."""
    with open(path, encoding="utf-8") as fh:
        block = [json.loads(line) for line in islice(fh, size)]
        while block:
            yield block
            block = [json.loads(line) for line in islice(fh, size)]


def data_files(ref: ArtifactRef) -> list[Path]:
    """The raw data files of a download artifact, in a stable order."""
    return sorted(p for p in (ref.dir / "data").rglob("*") if p.is_file())


SPLITS = ("train", "validation", "test")
