"""Runs whose process died without recording an end: found and closed, never left "Running".

Each pipeline run writes an owner record (`<workspace>/runs/<id>.json`: host, pid, the
process's start time, its Prefect flow run id and, once it has one, its MLflow run id) as the
first thing its flow does, before the stores are touched, and removes it when it ends, however
it ends, short of being killed. A record whose process is gone (kill -9, a machine crash, a
full disk that stopped the final writes) is a stale run: `reconcile` marks its MLflow run
FAILED with the tag `instructflow.end_reason` = "process killed (no exit recorded)", sets
its Prefect flow run and any of its task runs still pending or running to Crashed with that
message, and drops the record. Every run start reconciles the workspace; `instructflow runs
--reconcile` does it on demand. A record whose stores cannot be reached now stays for the next
attempt.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructflow import workspace

# Bookkeeping of runs; no stage's output depends on it (instructflow.codeid).
OUTPUT_NEUTRAL = True
REASON = "process killed (no exit recorded)"
REASON_TAG = "instructflow.end_reason"


def _dir(home: Path | None = None) -> Path:
    return (home or workspace.home()) / "runs"


def _process_start(pid: int) -> float | None:
    """The process's start time (seconds since boot, from /proc), to tell a reused pid apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":  # a zombie has exited
        return None
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


@dataclass
class Owner:
    path: Path
    record: dict[str, Any]

    @property
    def alive(self) -> bool:
        r = self.record
        if r.get("host") != socket.gethostname():
            return True  # another machine's run (a shared workspace): not ours to judge
        started = _process_start(int(r["pid"]))
        return started is not None and abs(started - float(r["process_start"])) < 1.0


def record_start(
    mlflow_run_id: str | None,
    flow_run_id: str | None,
    tracking_uri: str,
    path: Path | None = None,
) -> Path:
    """Write this process's owner record for a starting run (or, given `path`, update it: a
    pipeline run records its Prefect flow run first, then its MLflow run once it has one)."""
    folder = _dir()
    folder.mkdir(parents=True, exist_ok=True)
    name = mlflow_run_id or flow_run_id or f"pid-{os.getpid()}-{time.time_ns()}"
    path = path or folder / f"{name}.json"
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "started": time.time(),
        "mlflow_run_id": mlflow_run_id,
        "flow_run_id": flow_run_id,
        "tracking_uri": tracking_uri,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    return path


def record_end(run: str | Path | None) -> None:
    """Drop the owner record of a run that ended: its path, or its MLflow run id."""
    if isinstance(run, Path):
        run.unlink(missing_ok=True)
    elif run:
        (_dir() / f"{run}.json").unlink(missing_ok=True)


def owners(home: Path | None = None) -> list[Owner]:
    """The owner records of workspace `home` (default: this process's workspace)."""
    out = []
    folder = _dir(home)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out.append(Owner(path, json.loads(path.read_text())))
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # a record cut short by the same kill
    return out


def stale() -> list[Owner]:
    return [o for o in owners() if not o.alive]


def live(home: Path | None = None) -> list[Owner]:
    """Runs of workspace `home` whose process is still running (or on another host)."""
    return [o for o in owners(home) if o.alive]


def reconcile() -> list[dict[str, Any]]:
    """Close every stale run of this workspace; returns what was done, one dict per run."""
    done = []
    for owner in stale():
        r = owner.record
        # Killed before its MLflow run started: the Prefect flow run alone is left open.
        shown = r.get("mlflow_run_id") or f"(flow run {r.get('flow_run_id')})"
        result = {"mlflow_run_id": shown, "flow_run_id": r.get("flow_run_id")}
        try:
            result["mlflow"] = _close_mlflow(r) if r.get("mlflow_run_id") else "not started"
            result["prefect"] = _close_prefect(r)
        except Exception as exc:  # a store that is down or broken now: try again next time
            result["error"] = f"{type(exc).__name__}: {exc}"
            done.append(result)
            continue
        owner.path.unlink(missing_ok=True)
        done.append(result)
    return done


def _close_mlflow(r: dict[str, Any]) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=r["tracking_uri"])
    run = client.get_run(r["mlflow_run_id"])
    if run.info.status not in ("RUNNING", "SCHEDULED"):
        return run.info.status
    client.set_tag(r["mlflow_run_id"], REASON_TAG, REASON)
    client.set_terminated(r["mlflow_run_id"], status="FAILED")
    return "FAILED"


def _close_prefect(r: dict[str, Any]) -> str:
    if not r.get("flow_run_id") or not os.environ.get("PREFECT_API_URL"):
        return "not recorded"
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        flow = client.read_flow_run(r["flow_run_id"])
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow.id]))
        )
        for task in tasks:
            if task.state and not task.state.is_final():
                client.set_task_run_state(task.id, Crashed(message=REASON), force=True)
        if flow.state and not flow.state.is_final():
            client.set_flow_run_state(flow.id, Crashed(message=REASON), force=True)
            return "CRASHED"
        return flow.state.type.value if flow.state else "unknown"
