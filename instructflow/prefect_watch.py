"""The supervisor of a workspace's Prefect server: it stops the server once nothing uses it.

`prefect server start` runs until it is killed, so every workspace used once kept a server
(~240 MB, ~2 % of a core while idle) for good. This process starts the server as its child (in
the same process group, which `prefect_server.stop` kills as a whole) and stops it when
- the workspace folder is gone (nothing left to serve), or
- it has been idle for `--idle-s` seconds: no run of the workspace alive (instructflow.runs'
  owner records), no client connected to its port (the UI, a worker, `instructflow
  schedule`, a run talking to it), counted from the last time `ensure()` handed its URL out.
The next run starts a new one. Connections are sampled every few seconds, and those closed in
the last minute count too: a worker polls more often than that, as does a browser tab open on
the UI; so a server stops a minute or so after its idle time has passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# Supervising the server never changes a stage's output (instructflow.codeid).
OUTPUT_NEUTRAL = True
# Touched by prefect_server.ensure() whenever it hands the URL out: the idle time counts from
# then too, since the run that asked has not connected yet.
LAST_USE_FILE = "last_use"
# prefect_server's record of the running server (defined here: that module imports this one).
STATE_FILE = "server.json"


def _connections(port: int) -> int:
    """TCP connections to `port` on this machine open now or closed within the last minute.

    A closed connection stays in TIME_WAIT for 60 s on Linux, so this sees every client that
    made a request in the last minute, however short its connections (a worker's poll, a
    browser's). Read from /proc/net/tcp*, a few kB (psutil would walk every process's
    descriptors, and it cannot see TIME_WAIT ones)."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        import psutil

        found = psutil.net_connections(kind="tcp")
        return sum(1 for c in found if c.status == "ESTABLISHED" and c.laddr.port == port)
    count = 0
    for table in tables:
        with contextlib.suppress(OSError):
            for line in table.read_text().splitlines()[1:]:
                # local and remote "HEXIP:HEXPORT", then the state: 01 ESTABLISHED, 06 TIME_WAIT
                local, remote, state = line.split()[1:4]
                ports = {int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)}
                if state in ("01", "06") and port in ports:
                    count += 1
    return count


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _last_handed_out(home: Path) -> float:
    try:
        return (home / "prefect" / LAST_USE_FILE).stat().st_mtime
    except OSError:
        return 0.0


def busy(home: Path, port: int) -> str | None:
    """What uses the server now (a few words), or None."""
    from instructflow import runs

    if live := runs.live(home):
        return f"{len(live)} run(s) in progress"
    if count := _connections(port):
        return f"{count} client connection(s)"
    return None


def _say(message: str) -> None:
    print(f"instructflow watch: {message}", flush=True)


def _forget(home: Path, records: Path | None) -> None:
    """Drop the records that point at this server (its workspace state, the per-user one)."""
    state_file = home / "prefect" / STATE_FILE
    with contextlib.suppress(OSError, ValueError):
        if json.loads(state_file.read_text()).get("pid") == os.getpid():
            state_file.unlink()
    if records is not None:
        (records / f"{os.getpid()}.json").unlink(missing_ok=True)


def _stop(child: subprocess.Popen) -> None:
    """SIGTERM to the whole group but this process (the server may run helper processes)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpgid(0), signal.SIGTERM)
    try:
        child.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(0), signal.SIGKILL)


def watch(
    home: Path, port: int, idle_s: float, poll_s: float, cmd: list[str], records: Path | None
) -> int:
    from filelock import FileLock

    child = subprocess.Popen(cmd)
    last_busy, listening = time.time(), False
    lock = FileLock(str(home / "prefect" / ".server.lock"))
    while True:
        try:
            return child.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            pass
        if not home.is_dir():
            _say(f"workspace {home} is gone: stopping the server")
            _stop(child)
            _forget(home, records)
            return 0
        # The idle time counts once it serves (a new database takes seconds to migrate).
        listening = listening or _listening(port)
        if not listening or busy(home, port):
            last_busy = time.time()
            continue
        if idle_s <= 0 or time.time() - max(last_busy, _last_handed_out(home)) < idle_s:
            continue
        # Under the lock `ensure()` takes: no run is handed this server while it stops.
        with lock.acquire(timeout=60):
            if busy(home, port) or time.time() - _last_handed_out(home) < idle_s:
                last_busy = time.time()
                continue
            _say(f"idle for {idle_s:g} s (no run, no client): stopping the server")
            _forget(home, records)
            _stop(child)
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m instructflow.prefect_watch")
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--idle-s", type=float, required=True, help="0: never stop when idle")
    p.add_argument("--poll-s", type=float, default=5.0)
    p.add_argument("--records", type=Path, help="the per-user folder of server records")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the server's command line")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return watch(args.home.resolve(), args.port, args.idle_s, args.poll_s, cmd, args.records)


if __name__ == "__main__":
    sys.exit(main())
