"""`instructflow` command line: run the pipeline (and, via subcommands, serve/generate/...)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from instructflow import workspace

# Its code changes no stage's output (instructflow.codeid does not follow it).
OUTPUT_NEUTRAL = True

DEFAULT_CONFIG = "configs/demo.yaml"
# Outside a terminal, a progress line per stage at most this often (seconds).
PLAIN_EVERY_S = float(os.environ.get("INSTRUCTFLOW_PROGRESS_EVERY_S", "10"))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def display_rows(
    distill: bool = False, sources: tuple[str, ...] = (), synthesize: bool = False
) -> list[str]:
    """The stages in DAG order, with the shown helpers (the base model) where they run."""
    from flows.stages import SHOWN_HELPERS, stages_for

    rows: list[str] = []
    for stage in stages_for(distill, sources, synthesize):
        rows.append(stage)
        rows.extend(h for h, after in SHOWN_HELPERS.items() if after == stage)
    return rows


class RunView:
    """Live progress of a pipeline run: one row per stage, then a final table."""

    def __init__(self, console, live: bool, rows: list[str] | None = None):
        self.console = console
        self.live_enabled = live
        names = rows or display_rows()
        self.rows: dict[str, dict[str, Any]] = {s: {"state": "Pending"} for s in names}
        self.ids: dict[str, Any] = {}
        self.started: dict[str, float] = {}
        self.step: dict[str, str] = {}
        self.printed: dict[str, float] = {}
        self.metrics: dict[str, float] = {}  # every stage's figures, by metric name
        self.current: str | None = None  # the stage or helper started last (shown or not)
        self.waiting: str | None = None  # a wait outside any row (e.g. the tokenizer's)
        self.live = None

    def __call__(self, event: str, payload: dict[str, Any]) -> None:
        from rich.markup import escape  # paths and data in a line are text, not markup

        if event == "run_started":
            self.ids = payload
        elif event == "run_finished":
            self.metrics = payload.get("metrics") or {}
        elif event == "stage_started":
            self.current = payload["stage"]
            if self.current in self.rows:
                self.started[self.current] = time.perf_counter()
                self.rows[self.current] = {"state": "Running"}
        elif event == "waiting":
            self._waiting(payload)
        elif event == "stage_progress" and payload["stage"] in self.rows:
            stage = payload["stage"]
            done, total = payload.get("completed"), payload.get("total")
            extra = payload.get("message", "")
            elapsed = time.perf_counter() - self.started.get(stage, time.perf_counter())
            if total and done and "ETA" not in extra and elapsed > 1:
                extra = f"{extra}, ETA {elapsed / done * (total - done):.0f} s".lstrip(", ")
            self.step[stage] = f"{done}/{total} {extra}".strip() if total else str(extra)
            now = time.perf_counter()
            if not self.live_enabled and now - self.printed.get(stage, 0.0) >= PLAIN_EVERY_S:
                # Outside a terminal, a line every few seconds shows a long stage is alive.
                self.printed[stage] = now
                self.console.print(f"{stage:<9} Running   {self.step[stage]}")
        elif event == "stage_finished" and payload["stage"] in self.rows:
            stage = payload.pop("stage")
            self.rows[stage] = payload
            self.step.pop(stage, None)
            if not self.live_enabled:
                self.console.print(self._line(stage))
            # The stage's own notes (tokenize's length drops): printed whether it ran or was
            # Cached, so a rerun still says why rows are missing.
            for note in payload.get("warnings") or ():
                self.console.print(f"[yellow]warning[/]: {stage}: {escape(note)}")
        elif event == "warning":
            # Above the live table too (rich prints it there), not only in logs.
            self.console.print(f"[yellow]warning[/]: {payload.get('message')}")

    def _waiting(self, payload: dict[str, Any]) -> None:
        """A lock wait (instructflow.waits), once a second: on the running stage's row, or
        under the table when what waits is no row (the tokenizer, the MLflow store)."""
        from rich.markup import escape

        text = None if payload.get("done") else payload.get("message")
        who = payload.get("stage") or self.current
        if who in self.rows:
            if text:
                self.step[who] = text
            else:
                self.step.pop(who, None)
        else:
            self.waiting = f"{who}: {text}" if who and text else text
        now = time.perf_counter()
        key = f"waiting:{who}"
        if text and not self.live_enabled and now - self.printed.get(key, 0.0) >= PLAIN_EVERY_S:
            self.printed[key] = now
            self.console.print(f"{who or 'run':<9} Running   {escape(text)}")

    def _line(self, stage: str) -> str:
        row = self.rows[stage]
        secs = row.get("seconds")
        secs_txt = f" {secs:.1f}s" if isinstance(secs, int | float) else ""
        detail = row.get("summary") or row.get("error") or ""
        return f"{stage:<9} {row['state']:<9}{secs_txt} {detail}".rstrip()

    def table(self, final: bool = False):
        """The stage table: live (each figure cut to 80 characters so the view stays one
        screen) or final (whole figures, folded within the column)."""
        from rich.markup import escape
        from rich.table import Table

        colors = {
            "Completed": "green",
            "Cached": "cyan",
            "Failed": "red",
            "Running": "yellow",
            "Interrupted": "magenta",
            "Skipped": "dim",
            "Pending": "dim",
        }
        table = Table(title="instructflow run", expand=False)
        for col in ("stage", "state", "seconds"):
            table.add_column(col, no_wrap=True)
        table.add_column("figures", overflow="fold")
        for stage, row in self.rows.items():
            state = row.get("state", "Pending")
            secs = row.get("seconds")
            if state == "Running":
                secs = time.perf_counter() - self.started.get(stage, time.perf_counter())
            detail = row.get("summary") or row.get("error") or self.step.get(stage, "")
            table.add_row(
                stage,
                f"[{colors.get(state, 'white')}]{state}[/]",
                f"{secs:.1f}" if isinstance(secs, int | float) else "",
                str(detail) if final else str(detail)[:80],
            )
        if self.waiting and not final:
            table.caption = escape(self.waiting)
        return table

    def __enter__(self):
        if self.live_enabled:
            from rich.live import Live

            # Transient: the final table is printed once, after the live one is gone. Redrawn
            # from the rows at each refresh, so a Running stage's seconds tick between
            # events (a stage waiting on another run's lock sends one a second, others less).
            self.live = Live(
                console=self.console,
                refresh_per_second=4,
                transient=True,
                get_renderable=self.table,
            )
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)
            self.live = None


def key_env_names(cfg) -> tuple[str, ...]:
    """The environment variables a config names as holding keys (judge.api_key_env,
    synthesize.api_key_env, ...): a server this run starts must not inherit them."""
    from pydantic import BaseModel

    found: list[str] = []

    def walk(model: BaseModel) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value)
            elif name.endswith("api_key_env") and isinstance(value, str) and value:
                found.append(value)

    walk(cfg)
    return tuple(found)


def use_workspace_prefect_server(console, hide: tuple[str, ...] = ()) -> bool:
    """Point this process (and its children) at the workspace's Prefect server, started once
    (without the secrets of the environment, nor the variables named in `hide`); False (after
    one error line) when it cannot start."""
    if os.environ.get("PREFECT_API_URL") or os.environ.get("INSTRUCTFLOW_PREFECT_SERVER") == "0":
        # INSTRUCTFLOW_PREFECT_SERVER=0: Prefect's per-process ephemeral API instead.
        return True
    # Before prefect is imported: it reads the API URL from the environment.
    from instructflow import prefect_server

    if prefect_server.running_url() is None:
        console.print("starting the workspace's Prefect server (once; later runs reuse it)")
    try:
        os.environ["PREFECT_API_URL"] = prefect_server.ensure(hide=hide)
        # The workspace server speaks plain http on 127.0.0.1, so no certificate is ever
        # checked; skipping the CA bundle load saves ~0.2 s per Prefect client created.
        os.environ.setdefault("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "true")
    except prefect_server.ServerError as exc:
        from instructflow import errors

        print(f"error: {errors.check_stores() or exc}", file=sys.stderr)
        return False
    return True


def make_console():
    from rich.console import Console

    console = Console(stderr=False)
    if not console.is_terminal:
        # A log file or pipe: no wrapping at a guessed 80 columns (tables get room, lines stay
        # whole, so a grep finds them).
        console = Console(stderr=False, soft_wrap=True, width=200)
    return console


def cmd_run(args: argparse.Namespace) -> int:
    from instructflow.config import ConfigError, load_config

    console = make_console()
    config_path = resolve_config(args.config)
    from instructflow.sources import SourceError, source_kind

    try:
        cfg = load_config(config_path, args.set)  # fail fast, before Prefect starts
        # A missing data file, in a second rather than a minute.
        for spec in cfg.data.sources or [cfg.data]:
            source_kind(spec.source)
    except (ConfigError, SourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from flows.stages import is_stage
    from instructflow import progress

    if not use_workspace_prefect_server(console, hide=key_env_names(cfg)):
        return 1

    names = tuple(s.name for s in cfg.data.sources)
    rows = display_rows(cfg.distill.enabled, names, cfg.synthesize.enabled)
    view = RunView(console, live=console.is_terminal and not args.plain, rows=rows)
    progress.subscribe(view)
    error: str | None = None
    code = 1
    try:
        from flows.run import run_finetune

        with view:
            run_finetune(config_path, args.set or [], args.until)
    except Exception as exc:  # one line for users; --debug shows the traceback
        if args.debug:
            raise
        from instructflow import errors

        error = errors.explain(exc) or _one_line(exc)
    except BaseException as exc:  # Ctrl-C, SIGTERM (Prefect's TerminationSignal in a flow)
        from instructflow.interrupts import Interrupted, is_interrupt

        if not is_interrupt(exc):
            raise
        running = next((n for n, r in view.rows.items() if r.get("state") == "Running"), None)
        stop = exc if isinstance(exc, Interrupted) else Interrupted(running or "start-up")
        error, code = stop.line(), 130
        if running:
            view.rows[running]["state"] = "Interrupted"
    finally:
        progress.unsubscribe(view)
    if error:
        _drain_prefect_logs()

    stages, helpers = {}, {}
    for name in rows:
        row = view.rows.get(name, {})
        state = row.get("state", "Pending")
        if state in ("Pending", "Running"):
            state = "Failed" if state == "Running" else "Skipped"
        if state == "Failed" and code == 130:
            state = "Interrupted"
        view.rows[name]["state"] = state
        (stages if is_stage(name) else helpers)[name] = {
            "state": state,
            "seconds": row.get("seconds", 0.0),
            "artifact_digest": row.get("artifact_digest"),
        }
    summary = {
        "mlflow_run_id": view.ids.get("mlflow_run_id"),
        "flow_run_id": view.ids.get("flow_run_id"),
        "stages": stages,
        "helpers": helpers,
        "metrics": view.metrics or _collect_metrics(view.ids.get("mlflow_run_id")),
    }
    if error:
        summary["error"] = error
    console.print(view.table(final=True))
    evaluation = stages["evaluate"]
    if evaluation["state"] in ("Completed", "Cached") and evaluation["artifact_digest"]:
        from instructflow import report

        report.print_evaluation(console, evaluation["artifact_digest"])
    compression = stages.get("distill_report", {})
    if compression.get("state") in ("Completed", "Cached") and compression["artifact_digest"]:
        from instructflow import report

        report.print_compression(console, compression["artifact_digest"])
    if summary["mlflow_run_id"]:
        from instructflow import mlflow_view

        console.print(
            f"MLflow run [bold]{summary['mlflow_run_id']}[/] — open it with "
            f"`instructflow ui` (store: {workspace.mlflow_db_uri()}): "
            + mlflow_view.run_url(
                "http://127.0.0.1:5000", view.ids.get("experiment_id", ""), summary["mlflow_run_id"]
            ),
            soft_wrap=True,
        )
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    if error:
        print(f"error: {error}", file=sys.stderr)
        return code
    return 0


def _drain_prefect_logs(timeout_s: float = 5.0) -> None:
    """Send the flow run's queued log lines to the Prefect server now, before the error line:
    at interpreter exit they would be sent after it (and any failure to send, e.g. the
    server's database on a full disk, would print below the one line the user reads)."""
    if "prefect.logging.handlers" not in sys.modules:
        return
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=timeout_s)
    except Exception:  # best effort: the lines are for the Prefect UI only
        pass


def _collect_metrics(run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    try:
        from mlflow.tracking import MlflowClient

        return dict(MlflowClient().get_run(run_id).data.metrics)
    except Exception:
        return {}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("instructflow")
    except PackageNotFoundError:
        return "unknown (not installed)"


def resolve_config(path: str | None) -> str | None:
    """A config path as given, else the project's preset of that name (so `-c demo` and the
    default work from any directory); a path that is in neither place is returned as given,
    and load_config reports it."""
    if path is None or Path(path).is_file():
        return path
    presets = Path(__file__).resolve().parents[1] / "configs"
    for candidate in (presets / path, presets / f"{path}.yaml", presets / Path(path).name):
        if candidate.is_file():
            return str(candidate)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructflow", description=__doc__)
    parser.add_argument(
        "--home", help="workspace directory (default: $INSTRUCTFLOW_HOME or ./.instructflow)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline")
    run.add_argument(
        "-c",
        "--config",
        default=DEFAULT_CONFIG,
        metavar="CONFIG",
        help="a YAML config file, or the name of a preset in the project's configs/ "
        f"(demo, alpaca-qlora); default: {DEFAULT_CONFIG}",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value (repeatable)",
    )
    from flows.stages import ALL_STAGES

    run.add_argument(
        "--until",
        choices=ALL_STAGES,
        metavar="STAGE",
        help=f"stop after this stage ({', '.join(ALL_STAGES)})",
    )
    run.add_argument(
        "--summary-json",
        metavar="PATH",
        help="also write the run's summary (stage states, digests, figures, run ids) as JSON",
    )
    run.add_argument("--plain", action="store_true", help="no live view, one line per stage")
    run.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    run.set_defaults(func=cmd_run)

    _register_extra_commands(sub)
    return parser


def _register_extra_commands(sub) -> None:
    """Subcommands owned by other modules register themselves here (serve, generate, ...)."""
    import importlib

    for module in ("instructflow.commands",):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(sub)


def _quiet_library_logs() -> None:
    import logging

    for name in ("mlflow", "alembic", "prefect", "httpx", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        # Prefect echoes task/flow tracebacks to the console; users get our one-line error
        # (the full log still reaches the Prefect API/UI). --debug shows everything.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
        warnings.filterwarnings("ignore", category=FutureWarning)
        import logging

        # A log handler that cannot write (a full disk, a Prefect server whose database is
        # full) prints "--- Logging error ---" and a traceback per record; Prefect's API log
        # worker honours the same switch. The error line says what failed.
        logging.raiseExceptions = False
    workspace.configure(args.home)
    _quiet_library_logs()
    from instructflow.interrupts import sigterm_as_interrupt

    sigterm_as_interrupt()
    os.environ.setdefault("INSTRUCTFLOW_DEBUG", "1" if args.debug else "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        print(f"error: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        from instructflow import errors

        print(f"error: {errors.explain(exc) or _one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
