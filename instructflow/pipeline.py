"""Runs stages inside a flow: states, timings, MLflow recording, --until and the summary.

`flows/finetune.py` only wires the DAG; this is the machinery each stage call goes through.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from instructflow import progress, tracking, workspace
from instructflow.artifacts import ArtifactRef
from instructflow.config import PipelineConfig

STAGES = [
    "download",
    "validate",
    "augment",
    "split",
    "tokenize",
    "train",
    "evaluate",
    "register",
]
# Helpers shown beside the stages (where they run), in the live view and the summary.
SHOWN_HELPERS = {"base_model": "tokenize"}


class StageFailed(RuntimeError):
    """A stage failed; the message is the one-line reason."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage} failed: {reason}")
        self.stage = stage
        self.reason = reason


class StopPipeline(Exception):
    """Raised internally after the --until stage."""


class PipelineRun:
    def __init__(self, cfg: PipelineConfig, config_path: str | None, until: str | None = None):
        if until is not None and until not in STAGES:
            raise ValueError(f"--until {until!r}: expected one of {', '.join(STAGES)}")
        self.cfg = cfg
        self.config_path = config_path
        self.until = until
        self.stages: dict[str, dict[str, Any]] = {}
        self.helpers: dict[str, dict[str, Any]] = {}
        self.metrics: dict[str, float] = {}
        self.mlflow_run_id: str | None = None
        self.flow_run_id: str | None = None
        self.stopped = False

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> PipelineRun:
        from prefect.runtime import flow_run

        import mlflow

        self.flow_run_id = flow_run.get_id()
        tcfg = self.cfg.tracking
        exp_id = tracking.setup(tcfg.tracking_uri, tcfg.experiment, tcfg.on_unreachable)
        run = mlflow.start_run(
            experiment_id=exp_id,
            run_name=flow_run.get_name() or None,
            log_system_metrics=self.cfg.tracking.log_system_metrics,
        )
        self.mlflow_run_id = run.info.run_id
        client = mlflow.tracking.MlflowClient()
        tracking.log_params(client, self.mlflow_run_id, tracking.redact(self.cfg.flat()))
        tags = {
            "instructflow.flow_run_id": self.flow_run_id or "",
            "instructflow.config_file": self.config_path or "",
            "instructflow.workspace": str(workspace.home()),
        }
        commit = tracking.git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        mlflow.set_tags(tags)
        if self.config_path and Path(self.config_path).is_file():
            mlflow.log_artifact(self.config_path, "config")
        mlflow.log_dict(self.cfg.model_dump(mode="json", by_alias=True), "config/resolved.json")
        progress.notify(
            "run_started", mlflow_run_id=self.mlflow_run_id, flow_run_id=self.flow_run_id
        )
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        import mlflow

        for name in STAGES:
            self.stages.setdefault(
                name, {"state": "Skipped", "seconds": 0.0, "artifact_digest": None}
            )
        failed = exc_type is not None and exc_type is not StopPipeline
        mlflow.end_run(status="FAILED" if failed else "FINISHED")
        progress.notify("run_finished", failed=failed)
        return exc_type is StopPipeline

    # -- stages ----------------------------------------------------------------------------
    def stage(self, task, *args: Any, name: str | None = None, **kwargs: Any) -> ArtifactRef:
        """Run one stage task (Prefect-cached), record it, and stop after --until."""
        name = name or task.name
        self._check_disk(name)
        progress.notify("stage_started", stage=name)
        t0 = time.perf_counter()
        state = task(*args, return_state=True, **kwargs)
        seconds = time.perf_counter() - t0
        if not state.is_completed():
            reason = _failure_reason(state)
            self.stages[name] = {
                "state": "Failed",
                "seconds": seconds,
                "artifact_digest": None,
                "error": reason,
            }
            progress.notify("stage_finished", stage=name, **self.stages[name])
            raise StageFailed(name, reason)
        ref: ArtifactRef = state.result()
        label = "Cached" if state.name == "Cached" else "Completed"
        figures = tracking.log_stage(self.mlflow_run_id, ref)
        self.metrics.update(figures)
        self.stages[name] = {
            "state": label,
            "seconds": round(seconds, 3),
            "artifact_digest": ref.digest,
            "summary": ref.meta.get("summary", ""),
        }
        progress.notify("stage_finished", stage=name, **self.stages[name])
        if self.until == name:
            self.stopped = True
            raise StopPipeline()
        return ref

    def helper(self, task, *args: Any, **kwargs: Any) -> ArtifactRef:
        """Run a supporting task that is not a DAG stage (the tokenizer, the base model).

        It is shown and summarised like a stage when it reports a `stage_state` event (the
        base model does: Completed when it pre-trained `builtin:tiny`, Cached when it loaded
        it from the per-user cache); its Prefect cache is off, so it always runs."""
        name = task.name
        noted: dict[str, Any] = {}

        def listen(event: str, payload: dict[str, Any]) -> None:
            if event == "stage_state" and payload.get("stage") == name:
                noted.update(payload)

        progress.subscribe(listen)
        progress.notify("stage_started", stage=name)
        t0 = time.perf_counter()
        try:
            state = task(*args, return_state=True, **kwargs)
        finally:
            progress.unsubscribe(listen)
        seconds = round(time.perf_counter() - t0, 3)
        if not state.is_completed():
            reason = _failure_reason(state)
            if noted:
                self.helpers[name] = {"state": "Failed", "seconds": seconds, "error": reason}
                progress.notify("stage_finished", stage=name, **self.helpers[name])
            raise StageFailed(name, reason)
        ref: ArtifactRef = state.result()
        if noted:
            self.helpers[name] = {
                "state": noted["state"],
                "seconds": seconds,
                "artifact_digest": ref.digest,
                "summary": noted.get("summary", ""),
            }
            progress.notify("stage_finished", stage=name, **self.helpers[name])
        return ref

    def _check_disk(self, stage: str) -> None:
        floor = self.cfg.tracking.min_free_disk_mb
        if floor <= 0:
            return
        free_mb = shutil.disk_usage(workspace.home()).free / 2**20
        if free_mb < floor:
            self.stages[stage] = {"state": "Failed", "seconds": 0.0, "artifact_digest": None}
            raise StageFailed(
                stage,
                f"only {free_mb:.0f} MB free in {workspace.home()} "
                f"(tracking.min_free_disk_mb={floor})",
            )

    def summary(self) -> dict[str, Any]:
        return {
            "mlflow_run_id": self.mlflow_run_id,
            "flow_run_id": self.flow_run_id,
            "stages": self.stages,
            "helpers": self.helpers,
            "metrics": self.metrics,
        }


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
    import os

    from filelock import FileLock
    from prefect.client.orchestration import get_client

    lock_dir = Path(os.environ.get("PREFECT_HOME", workspace.home() / "prefect"))
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / ".api-start.lock"), timeout=600):
        with get_client(sync_client=True) as client:
            client.hello()


def _failure_reason(state) -> str:
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by Prefect
        text = str(exc).strip().splitlines()
        return text[0] if text else type(exc).__name__
    return state.message or state.name
