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
    from flows.finetune import finetune

    _start_prefect_api()
    # A Path (not a block) keeps cache records inside this workspace, whatever the
    # process-wide Prefect settings say; tasks inherit the flow's result store.
    flow = finetune.with_options(result_storage=workspace.prefect_results_dir())
    return flow(config_path=config_path, overrides=overrides or [], until=until)


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
