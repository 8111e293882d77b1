"""What kind of data source `data.source` names, checked before anything starts.

`instructflow run` checks every source here before it starts the Prefect server or writes a
file: a local source must be a regular file or a folder holding data files (not a device like
/dev/zero, a FIFO that would block the read forever, or an empty folder), and a URL's host must
accept a connection (a closed port is refused at once, an unreachable host within the
connect timeout).
"""

from __future__ import annotations

import itertools
import socket
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

# The files a folder source is read for (tasks/download.SUPPORTED).
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
CONNECT_TIMEOUT_S = 10.0
# Entries of a folder looked at for a first data file: a second's walk, not the whole disk.
SCAN_ENTRIES = 100_000


class SourceError(ValueError):
    """A data source that cannot be used; the message is one line naming it."""


def source_kind(source: str, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> str:
    """builtin | url | local | hub, or SourceError (an unusable one fails here, at once)."""
    if source.startswith("builtin:"):
        return "builtin"
    if source.startswith(("http://", "https://")):
        _check_reachable(source, connect_timeout_s)
        return "url"
    if "://" in source:
        raise SourceError(f"{source}: only http(s) URLs, local paths and hub ids are supported")
    path = Path(source)
    if path.exists():
        _check_local(source, path)
        return "local"
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return "hub"
    raise SourceError(f"{source}: no such file or directory (and not a hub dataset id)")


def _check_local(source: str, path: Path) -> None:
    if path.is_file():
        return
    if not path.is_dir():
        raise SourceError(f"{source}: not a regular file or folder (a device, FIFO or socket)")
    # The first data file is enough: a big folder is not walked to its end.
    entries = itertools.islice(path.rglob("*"), SCAN_ENTRIES)
    if not any(p.suffix.lower() in DATA_SUFFIXES and p.is_file() for p in entries):
        raise SourceError(f"{source}: folder holds no {'/'.join(DATA_SUFFIXES)} files")


def _check_reachable(url: str, timeout_s: float) -> None:
    """Can a TCP connection to the URL's host be made? (Behind a proxy: not ours to judge.)"""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise SourceError(f"{url}: no host in the URL")
    if urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except ValueError:  # a port out of range
        raise SourceError(f"{url}: not a valid URL") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SourceError(f"{url}: cannot connect to {host} ({reason})") from None
