"""Runs stages inside a flow: states, timings, MLflow recording, --until and the summary.

`flows/finetune.py` only wires the DAG (and owns the stage order); this is the machinery each
stage call goes through. `flows/run.py` starts the flow.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

from instructflow import (
    errors,
    housekeeping,
    interrupts,
    prefect_report,
    progress,
    runs,
    tracking,
    workspace,
)
from instructflow.artifacts import ArtifactRef
from instructflow.config import PipelineConfig

# Its code changes no stage's output (instructflow.codeid does not follow it).
OUTPUT_NEUTRAL = True
# Set by `instructflow sweep` for its child processes: the MLflow run they nest under.
SWEEP_PARENT_ENV = "INSTRUCTFLOW_SWEEP_PARENT_RUN"


class StageFailed(RuntimeError):
    """A stage failed; the message is the one-line reason."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage} failed: {reason}")
        self.stage = stage
        self.reason = reason


class StopPipeline(Exception):
    """Raised internally after the --until stage."""


class PipelineRun:
    def __init__(
        self,
        cfg: PipelineConfig,
        config_path: str | None,
        until: str | None,
        stages: tuple[str, ...],
    ):
        """`stages`: the DAG's stage names in order (the flow module owns them)."""
        if until is not None and until not in stages:
            raise ValueError(f"--until {until!r}: expected one of {', '.join(stages)}")
        self.stage_names = stages
        self.cfg = cfg
        self.config_path = config_path
        self.until = until
        self.stages: dict[str, dict[str, Any]] = {}
        self.helpers: dict[str, dict[str, Any]] = {}
        self.metrics: dict[str, float] = {}
        self.mlflow_run_id: str | None = None
        self.experiment_id = ""
        self.flow_run_id: str | None = None
        self.owner: Path | None = None  # this run's owner record (instructflow.runs)
        self.stopped = False
        self.current: str | None = None  # the stage or helper running now
        self.live_logged: set[str] = set()  # stages whose step metrics reached MLflow live
        self.comparison: list[str] = []  # evaluate's base | fine-tuned rows, for the run page

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> PipelineRun:
        from prefect.runtime import flow_run

        self.flow_run_id = flow_run.get_id()
        tcfg = self.cfg.tracking
        uri = tracking.tracking_uri(tcfg.tracking_uri)
        # First the owner record: a kill from here on (creating the stores takes seconds on a
        # new workspace) leaves a flow run that the next run finds and closes.
        self.owner = runs.record_start(None, self.flow_run_id, uri)
        try:
            return self._start(uri)
        except BaseException:
            # Failed, not killed: Prefect records the flow's end. An MLflow run already
            # started keeps the record: the next run closes it.
            if self.mlflow_run_id is None:
                runs.record_end(self.owner)
            raise

    def _start(self, uri: str) -> PipelineRun:
        from prefect.runtime import flow_run

        import mlflow

        tcfg = self.cfg.tracking
        workspace.ensure_mlflow_store(uri)
        exp_id = tracking.setup(tcfg.tracking_uri, tcfg.experiment, tcfg.on_unreachable)
        self.experiment_id = exp_id
        # Unpublished temp dirs of runs killed a day or more ago go; quarantined corrupt
        # artifacts stay for inspection (`instructflow gc --remove` deletes those).
        housekeeping.remove(
            [x for x in housekeeping.leftovers(workspace.home()) if x.path.name.startswith(".tmp-")]
        )
        closed = [r for r in runs.reconcile() if "error" not in r]
        if closed:
            progress.notify(
                "warning",
                message=f"closed {len(closed)} earlier run(s) left running by a killed process",
            )
        # `instructflow sweep` runs one pipeline per method as child runs of its own run.
        parent = os.environ.get(SWEEP_PARENT_ENV)
        run = mlflow.start_run(
            experiment_id=exp_id,
            run_name=self.cfg.train.method.name if parent else tracking.run_name(self.config_path),
            log_system_metrics=self.cfg.tracking.log_system_metrics,
            tags={"mlflow.parentRunId": parent, "instructflow.sweep_parent": parent}
            if parent
            else None,
        )
        self.mlflow_run_id = run.info.run_id
        runs.record_start(
            self.mlflow_run_id, self.flow_run_id, mlflow.get_tracking_uri(), path=self.owner
        )
        client = mlflow.tracking.MlflowClient()
        tracking.log_params(client, self.mlflow_run_id, tracking.redact(self.cfg.flat()))
        tags = {
            "instructflow.flow_run_id": self.flow_run_id or "",
            "instructflow.flow_run_name": flow_run.get_name() or "",
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
        progress.subscribe(self._live_metrics)
        progress.notify(
            "run_started",
            mlflow_run_id=self.mlflow_run_id,
            flow_run_id=self.flow_run_id,
            experiment_id=self.experiment_id,
        )
        return self

    def _live_metrics(self, event: str, payload: dict[str, Any]) -> None:
        """Step metrics a stage reports while it runs go to MLflow at once (live curves)."""
        if event == "stage_metrics" and self.mlflow_run_id:
            stage = payload["stage"]
            tracking.log_step_metrics(
                self.mlflow_run_id, stage, int(payload["step"]), payload["metrics"]
            )
            self.live_logged.add(stage)

    def __exit__(self, exc_type, exc, tb) -> bool:
        import mlflow

        progress.unsubscribe(self._live_metrics)
        # A SIGTERM outside training arrives as Prefect's TerminationSignal: an interrupt too.
        interrupted = interrupts.is_interrupt(exc_type)
        if interrupted and self.current:
            self.stages[self.current] = {"state": "Interrupted", "seconds": 0.0}
        for name in self.stage_names:
            self.stages.setdefault(
                name, {"state": "Skipped", "seconds": 0.0, "artifact_digest": None}
            )
        failed = exc_type is not None and exc_type is not StopPipeline
        status = "KILLED" if interrupted else "FAILED" if failed else "FINISHED"
        problem: Exception | None = None
        ended = False
        # MLflow logs a failed store write with its traceback before raising it: the failure
        # is reported here, in one line, so its logger is quiet for these two writes.
        with _quiet_logger("mlflow"):
            try:
                tracking.describe_run(self.mlflow_run_id, self.description(status))
            except Exception as e:  # the note is a nicety; the status below is not
                problem = e
            try:
                # Always tried, even when the note could not be written: a run left active
                # here would be ended FINISHED by MLflow's exit hook.
                mlflow.end_run(status=status)
                ended = True
            except Exception as e:
                # The store cannot be written now (a full disk, a dead server): the owner
                # record stays, and the next run (or `runs --reconcile`) closes this run.
                problem = problem or e
        # The flow run's page in the Prefect UI: every stage's end, however the run ended.
        prefect_report.publish(
            "run", f"{self.description(status)}\n\n{self._mlflow_link()}", f"run {status}"
        )
        if ended:
            runs.record_end(self.owner)
        progress.notify(
            "run_finished", failed=failed, interrupted=interrupted, metrics=dict(self.metrics)
        )
        if problem is not None and exc_type is None:
            raise problem
        if interrupted and not isinstance(exc, interrupts.Interrupted):
            raise interrupts.Interrupted(self.current or "start-up") from None
        return exc_type is StopPipeline

    # -- stages ----------------------------------------------------------------------------
    def stage(self, task, *args: Any, name: str | None = None, **kwargs: Any) -> ArtifactRef:
        """Run one stage task (Prefect-cached), record it, and stop after --until."""
        name = name or task.name
        self._check_disk(name)
        progress.notify("stage_started", stage=name)
        self.current = name
        t0 = time.perf_counter()
        state = task(*args, return_state=True, **kwargs)
        seconds = time.perf_counter() - t0
        self.current = None
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
        # A Completed stage that logged its curves live is not logged twice; a Cached one
        # logs them from its manifest.
        live = label == "Completed" and name in self.live_logged
        figures = tracking.log_stage(self.mlflow_run_id, ref, step_metrics=not live)
        self.metrics.update(figures)
        self.stages[name] = {
            "state": label,
            "seconds": round(seconds, 3),
            "artifact_digest": ref.digest,
            "summary": ref.meta.get("summary", ""),
        }
        notes = ref.meta.get("warnings", [])  # the CLI prints them, for Cached stages too
        progress.notify("stage_finished", stage=name, **self.stages[name], warnings=notes)
        _run_log(f"{name}: {label} in {seconds:.1f} s. {self.stages[name]['summary']}")
        report = prefect_report.stage_markdown(name, label, seconds, ref, self._mlflow_link())
        if name == "evaluate":
            self.comparison = prefect_report.comparison_markdown(ref)
        prefect_report.publish(name, report, f"{name}: {label}. {ref.meta.get('summary', '')}")
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
        self.current = name
        t0 = time.perf_counter()
        try:
            state = task(*args, return_state=True, **kwargs)
        finally:
            progress.unsubscribe(listen)
        self.current = None
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

    def _mlflow_link(self) -> str:
        import mlflow

        if not self.mlflow_run_id:
            return "no MLflow run"
        return prefect_report.mlflow_link(
            mlflow.get_tracking_uri(), self.experiment_id, self.mlflow_run_id
        )

    def description(self, status: str) -> str:
        """Markdown for the MLflow run page: what ran, how each stage ended, key figures."""
        lines = [
            f"**instructflow run**: {status.lower()}, config `{self.config_path or 'defaults'}`",
            "",
        ]
        if self.comparison:  # first: the page shows a description's first lines only
            lines += ["**Base vs fine-tuned** (evaluate; chart: `evaluate/base_vs_tuned`)", ""]
            lines += [*self.comparison, ""]
        lines += [
            "| stage | state | seconds | figures |",
            "|---|---|---|---|",
        ]
        rows = {**self.stages, **self.helpers}
        for name in [*self.stage_names, *self.helpers]:
            row = rows.get(name, {"state": "Skipped"})
            secs = row.get("seconds")
            detail = (row.get("summary") or row.get("error") or "").replace("|", "/")
            secs_text = f"{secs:.1f}" if isinstance(secs, int | float) else ""
            lines.append(f"| {name} | {row.get('state', '')} | {secs_text} | {detail} |")
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        return {
            "mlflow_run_id": self.mlflow_run_id,
            "flow_run_id": self.flow_run_id,
            "stages": self.stages,
            "helpers": self.helpers,
            "metrics": self.metrics,
        }


def _run_log(message: str) -> None:
    """A line in the Prefect flow run's logs (shown in the Prefect UI)."""
    try:
        from prefect import get_run_logger

        get_run_logger().info(message)
    except Exception:  # outside a flow run (a direct call): nothing to log to
        pass


def _failure_reason(state) -> str:
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by Prefect
        explained = errors.explain(exc)
        if explained:
            return explained
        text = str(exc).strip().splitlines()
        return text[0] if text else type(exc).__name__
    return state.message or state.name


@contextlib.contextmanager
def _quiet_logger(name: str):
    """`name`'s logger (and its children) silent inside the block."""
    import logging

    log = logging.getLogger(name)
    before, log.disabled = log.disabled, True
    children = [
        logging.getLogger(n)
        for n in list(logging.root.manager.loggerDict)
        if n.startswith(name + ".")
    ]
    saved = [(c, c.disabled) for c in children]
    for c in children:
        c.disabled = True
    try:
        yield
    finally:
        log.disabled = before
        for c, was in saved:
            c.disabled = was
