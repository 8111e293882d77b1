"""Start the finetune flow in this process, with its Prefect results kept in the workspace."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from instructflow import workspace


def run_finetune(
    config_path: str | None, overrides: list[str] | None = None, until: str | None = None
) -> dict[str, Any]:
    """Run the finetune flow in-process with its Prefect results kept in the workspace."""
    _start_prefect_api()
    return workspace_flow()(config_path=config_path, overrides=overrides or [], until=until)


def workspace_flow():
    """The finetune flow with its cache records in this process's workspace."""
    from flows.finetune import finetune

    # A Path (not a block) keeps cache records inside this workspace, whatever the
    # process-wide Prefect settings say; tasks inherit the flow's result store.
    return finetune.with_options(result_storage=workspace.prefect_results_dir())


def __getattr__(name: str) -> Any:
    """`flows/run.py:finetune`, the nightly deployment's entrypoint: `workspace_flow()`.

    A worker's flow-run process loads its entrypoint without `workspace.configure()`, so
    `flows/finetune.py:finetune` kept its cache records under the worker's PREFECT_HOME, not
    in INSTRUCTFLOW_HOME: a worker with another PREFECT_HOME (a new machine, a new container)
    re-ran every stage. Resolved on access, in the process that runs the flow."""
    if name == "finetune":
        return workspace_flow()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _start_prefect_api() -> None:
    """Start (or reach) the Prefect API before the flow, one process at a time.

    Two runs starting together on a fresh workspace would both create the ephemeral API's
    sqlite database ("table alembic_version already exists"); a file lock serialises that.
    """
    from filelock import FileLock
    from prefect.client.orchestration import get_client

    lock_dir = Path(os.environ.get("PREFECT_HOME", workspace.home() / "prefect"))
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / ".api-start.lock"), timeout=600):
        with get_client(sync_client=True) as client:
            client.hello()
