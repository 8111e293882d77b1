"""The workspace's own Prefect server: started on first use, reused by every later run.

Without a server, each `instructflow run` started Prefect's ephemeral API in a subprocess
(8-22 s on 2 cores, every time), that API died with the run on Ctrl-C (so the flow run stayed
"Running" forever), and the Prefect UI had nothing to show. Instead the workspace keeps one
`prefect server start` on 127.0.0.1 (its database under `<workspace>/prefect/`), detached from
the terminal's process group so a Ctrl-C of a run reaches the run and not the server, which
then records the run's final state. Runs find it through `<workspace>/prefect/server.json`,
written as soon as the server is launched: a run killed while it comes up (it migrates its new
database then) leaves it running, and the next run waits for it instead of starting a second
server on the same database. A database with no flow run that its server cannot start on (cut
short while being created) is put aside and made anew.
`instructflow server status|start|stop` manages it. A `PREFECT_API_URL` already in the
environment (your own server or Prefect Cloud) is used as it is.

Every server started is also recorded per user (`<cache>/prefect-servers/<pid>.json`, the
workspace and the process's start time), since a workspace folder can be deleted with its
server still running: such orphans are stopped whenever a server is started, and `instructflow
server stop --all` stops every server of the user, found through these records rather than by
process name.

A server stops by itself once unused for `INSTRUCTFLOW_PREFECT_IDLE_S` seconds (default one
hour: repeated runs reuse it) or as soon as its workspace folder is deleted: it runs under
`instructflow.prefect_watch`, which watches for runs and clients.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from instructflow import workspace
from instructflow.prefect_watch import LAST_USE_FILE, STATE_FILE

# Starting it never changes a stage's output (instructflow.codeid).
OUTPUT_NEUTRAL = True
# How long a new server may take to answer. It migrates a new database first: 10-20 s on an
# idle 2-core machine, but a first run on a loaded one failed at the former 180 s.
START_TIMEOUT_ENV = "INSTRUCTFLOW_PREFECT_START_TIMEOUT_S"
START_TIMEOUT_S = 600.0
IDLE_ENV = "INSTRUCTFLOW_PREFECT_IDLE_S"
IDLE_S = 3600.0
# Environment variables the server never needs and must not keep for its (long) life: a run's
# API keys (judge.api_key_env names one), tokens, passwords. Matched in the lowercased name.
SECRET_ENV_HINTS = ("api_key", "apikey", "secret", "password", "passwd", "token", "credential")


class ServerError(RuntimeError):
    pass


def _dir(home: Path) -> Path:
    return home / "prefect"


def _healthy(url: str, timeout: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _alive(pid: int) -> bool:
    """A running process (not a zombie whose parent, the CLI that started it, is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def state(home: Path | None = None) -> dict[str, Any] | None:
    """The recorded server (pid, url, port, log) if its process is alive, else None."""
    path = _dir(home or workspace.home()) / STATE_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if _alive(int(info.get("pid", -1))) else None


def running_url(home: Path | None = None) -> str | None:
    info = state(home)
    return info["url"] if info and _healthy(info["url"]) else None


def _seconds_env(name: str, default: float, zero_ok: bool, expected: str) -> float:
    """$name as seconds (default when unset); ServerError in one line when it is not one."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not ((value >= 0 if zero_ok else value > 0) and value < float("inf")):
        raise ServerError(f"{name}={raw!r}: expected a number of seconds {expected}")
    return value


def start_timeout_s() -> float:
    """The start-up limit: $INSTRUCTFLOW_PREFECT_START_TIMEOUT_S, else START_TIMEOUT_S."""
    return _seconds_env(START_TIMEOUT_ENV, START_TIMEOUT_S, False, "> 0")


def idle_s() -> float:
    """Seconds unused before a server stops: $INSTRUCTFLOW_PREFECT_IDLE_S, else IDLE_S; 0 never."""
    return _seconds_env(IDLE_ENV, IDLE_S, True, ">= 0 (0: never)")


def server_env(base: dict[str, str], hide: tuple[str, ...] = ()) -> dict[str, str]:
    """`base` without the secrets a detached server would otherwise keep after the run: the
    variables named in `hide` (e.g. judge.api_key_env) and any whose name looks like a key,
    token or password. The server's own settings (PREFECT_SERVER_*) stay."""
    hidden = set(hide)
    return {
        k: v
        for k, v in base.items()
        if k.startswith("PREFECT_SERVER_")
        or (k not in hidden and not any(h in k.lower() for h in SECRET_ENV_HINTS))
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure(home: Path | None = None, hide: tuple[str, ...] = ()) -> str:
    """The API URL of the workspace's server, starting it if it is not running (under a file
    lock, so two runs starting together share one server). `hide`: names of environment
    variables a new server must not inherit, beside those server_env drops anyway."""
    from filelock import FileLock

    home = home or workspace.home()
    folder = _dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    limit = start_timeout_s()
    idle_s()  # a bad setting fails here, in one line, not in the server's log
    with FileLock(str(folder / ".server.lock"), timeout=limit + 30):
        # Seen by the server's watch: the caller is about to use it (instructflow.prefect_watch).
        (folder / LAST_USE_FILE).touch()
        url = running_url(home)
        if url:
            return url
        info = state(home)
        if info and info.get("starting") and time.time() - info["started"] < limit:
            # Its starter was killed while it came up (a run killed in its first seconds): a
            # second server would migrate the same new database at the same time.
            return _wait(home, info, limit=limit)
        stop(home)  # a recorded process that no longer answers
        stop_orphans()  # servers of deleted workspaces: nothing left to serve
        try:
            return _start(home, hide, limit)
        except ServerError:
            if not _fresh_database(folder / "prefect.db"):
                raise
        # A database with no flow run yet, that its server cannot start on (cut short while
        # being created): kept aside, and the server starts on a new one.
        broken = folder / "prefect.db"
        broken.rename(folder / f"prefect.db.broken-{int(time.time())}")
        return _start(home, hide, limit)


def _fresh_database(db: Path) -> bool:
    """Is `db` a Prefect database that holds no flow run (or none at all)?"""
    import sqlite3

    if not db.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            return (
                "flow_run" not in tables
                or not conn.execute("SELECT count(*) FROM flow_run").fetchone()[0]
            )
    except sqlite3.DatabaseError:
        return False


def _start(home: Path, hide: tuple[str, ...] = (), limit: float = START_TIMEOUT_S) -> str:
    folder = _dir(home)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = folder / "server.log"
    env = {
        **server_env(dict(os.environ), hide),
        "PREFECT_HOME": str(folder),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        # The UI must call this server, not the default port.
        "PREFECT_UI_API_URL": url,
        # Links the server makes (a notification's run link) point at its own UI.
        "PREFECT_UI_URL": ui_url(url),
    }
    env.pop("PREFECT_API_URL", None)
    server = [sys.executable, "-m", "prefect", "server", "start"]
    watch = [sys.executable, "-m", "instructflow.prefect_watch", "--home", str(home.resolve())]
    watch += ["--records", str(registry_dir())]
    idle = idle_s()
    cmd = [*watch, "--port", str(port), "--idle-s", f"{idle:g}", "--", *server]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not in the terminal's process group: Ctrl-C spares it
        )
    # Recorded at once, so a run killed while this one comes up does not start a second.
    info = {"pid": proc.pid, "url": url, "port": port, "log": str(log), "started": time.time()}
    info["idle_s"] = idle
    _record(folder, {**info, "starting": True})
    _register(proc.pid, home, url)
    return _wait(home, info, proc, limit)


# -- the per-user record of started servers ----------------------------------------------------
def registry_dir() -> Path:
    from instructflow.user_cache import cache_root

    return cache_root() / "prefect-servers"


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _register(pid: int, home: Path, url: str) -> None:
    folder = registry_dir()
    folder.mkdir(parents=True, exist_ok=True)
    info = {"pid": pid, "home": str(home.resolve()), "url": url, "since": _start_time(pid)}
    tmp = folder / f".{pid}.json.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, folder / f"{pid}.json")


def registered() -> list[dict[str, Any]]:
    """The user's servers still running (records of exited ones are removed)."""
    found = []
    for path in sorted(registry_dir().glob("[0-9]*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        pid = int(info.get("pid", -1))
        if _alive(pid) and _start_time(pid) == info.get("since"):
            found.append(info)
        else:
            path.unlink(missing_ok=True)
    return found


def _stop_registered(info: dict[str, Any]) -> None:
    _kill(int(info["pid"]))
    (registry_dir() / f"{info['pid']}.json").unlink(missing_ok=True)
    state_file = _dir(Path(info["home"])) / STATE_FILE
    with contextlib.suppress(OSError, ValueError):
        if json.loads(state_file.read_text()).get("pid") == info["pid"]:
            state_file.unlink()


def stop_orphans() -> list[dict[str, Any]]:
    """Stop the user's servers whose workspace folder is gone; the ones stopped."""
    gone = [info for info in registered() if not Path(info["home"]).is_dir()]
    for info in gone:
        _stop_registered(info)
    return gone


def stop_all(under: Path | None = None) -> list[dict[str, Any]]:
    """Stop every server of the user (those of workspaces under `under`, if given)."""
    chosen = [
        info
        for info in registered()
        if under is None or Path(info["home"]).resolve().is_relative_to(under.resolve())
    ]
    for info in chosen:
        _stop_registered(info)
    return chosen


def _record(folder: Path, info: dict[str, Any]) -> None:
    tmp = folder / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, folder / STATE_FILE)


def _wait(
    home: Path,
    info: dict[str, Any],
    proc: subprocess.Popen | None = None,
    limit: float = START_TIMEOUT_S,
) -> str:
    """The URL once the server of `info` answers; ServerError if it exits or takes too long."""
    folder, log = _dir(home), Path(info["log"])
    deadline = info["started"] + limit
    while time.time() < deadline:
        exited = proc.poll() is not None if proc else not _alive(int(info["pid"]))
        if exited:
            tail = log.read_text(errors="replace")[-4000:].lower()
            cause = next(
                (h for h in ("malformed", "not a database", "disk is full") if h in tail), ""
            )
            detail = f": database {cause}" if cause else ""
            code = f"{proc.returncode}" if proc else "exited"
            raise ServerError(f"the Prefect server exited at start ({code}{detail}); see {log}")
        if _healthy(info["url"], timeout=1.0):
            _record(folder, {k: v for k, v in info.items() if k != "starting"})
            return info["url"]
        time.sleep(0.3)
    _kill(int(info["pid"]))
    raise ServerError(
        f"the Prefect server did not answer within {limit:g} s (a loaded machine: raise "
        f"{START_TIMEOUT_ENV}); see {log}"
    )


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    for _ in range(50):
        if not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop(home: Path | None = None) -> bool:
    """Stop the workspace's server (its whole process group); whether one was running."""
    folder = _dir(home or workspace.home())
    info = state(home)
    (folder / STATE_FILE).unlink(missing_ok=True)
    if info is None:
        return False
    _kill(int(info["pid"]))
    (registry_dir() / f"{info['pid']}.json").unlink(missing_ok=True)
    return True


def ui_url(api_url: str) -> str:
    return api_url.rstrip("/").removesuffix("/api")
