"""`instructflow compare RUN_A RUN_B`: config and metric differences of two MLflow runs, and
each run's LoggedModels (kept checkpoints and the final model) best first."""

from __future__ import annotations

import argparse
import math
import re
import sys

MISSING = "-"


def register(sub) -> None:
    p = sub.add_parser("compare", help="config and metric differences of two runs")
    p.add_argument("run_a", help="MLflow run id (the baseline)")
    p.add_argument("run_b", help="MLflow run id")
    p.add_argument("--all", action="store_true", help="also list equal params and metrics")
    p.add_argument("--tracking-uri", help="MLflow store (default: the workspace's)")
    p.add_argument(
        "--no-models", action="store_true", help="leave out the runs' logged models (checkpoints)"
    )
    p.set_defaults(func=run)


def param_rows(a: dict, b: dict, show_all: bool = False) -> list[tuple[str, str, str]]:
    keys = sorted(set(a) | set(b))
    return [
        (k, a.get(k, MISSING), b.get(k, MISSING)) for k in keys if show_all or a.get(k) != b.get(k)
    ]


def metric_rows(a: dict, b: dict, show_all: bool = False) -> list[tuple[str, str, str, str]]:
    rows = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        # System metrics (CPU, memory) are the machine's, not the run's: only with --all.
        if not show_all and (va == vb or k.startswith("system/")):
            continue
        delta = ""
        if va is not None and vb is not None:
            delta = f"{vb - va:+.4g}"
            if va != 0 and math.isfinite(va) and math.isfinite(vb):
                delta += f" ({(vb - va) / abs(va):+.1%})"
        rows.append((k, _fmt(va), _fmt(vb), delta))
    return rows


# The figures a model is ranked by: its step's training figures and the evaluate stage's.
MODEL_COLUMNS = re.compile(r"^\w+/(loss|eval_\w+)$|^evaluate/(exact_match|rougeL|win_rate)$")


def model_rows(models) -> tuple[list[str], list[list[str]]]:
    """(metric columns, rows: name, step, model id, values) of LoggedModels, in their order."""
    from instructflow import logged_models

    values = []
    for m in models:
        latest = {}  # a key's value at its highest step (the model's own)
        for x in sorted(m.metrics or [], key=lambda x: (x.step, x.timestamp)):
            latest[x.key] = x.value
        values.append(latest)
    cols = sorted({k for v in values for k in v if MODEL_COLUMNS.match(k)})
    rows = [
        [m.name, m.tags.get(logged_models.STEP_TAG, MISSING), m.model_id]
        + [_fmt(v.get(c)) for c in cols]
        for m, v in zip(models, values, strict=True)
    ]
    return cols, rows


def _models_table(client, run, label: str):
    """The run's LoggedModels as mlflow.search_logged_models orders them by train.best_by."""
    from mlflow.exceptions import MlflowException
    from rich.table import Table

    from instructflow import logged_models

    order = logged_models.order_by(run.data.params.get("train.best_by", "eval_loss"))
    try:
        models = logged_models.search(client, run.info.run_id, order=order)
    except MlflowException:  # a store without LoggedModels (MLflow 2 server)
        return None
    if not models:
        return None
    cols, rows = model_rows(models)
    field, up = order[0]["field_name"], order[0]["ascending"]
    direction = "ascending" if up else "descending"
    table = Table(
        title=f"logged models of {label}, best first ({field} {direction})",
        caption=(
            f"mlflow.search_logged_models(experiment_ids=['{run.info.experiment_id}'], "
            f"filter_string=\"source_run_id = '{run.info.run_id}'\", order_by={order})"
        ),
    )
    for col in ("model", "step", "model_id"):
        table.add_column(col, no_wrap=True)  # names to copy: never folded
    for col in cols:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def _fmt(v: float | None) -> str:
    return MISSING if v is None else f"{v:.6g}"


def _figures(client, run_id: str) -> dict[str, float]:
    """The run's bookkeeping figures (`<stage>/figures.json` artifacts), by metric name."""
    import json
    import tempfile

    out: dict[str, float] = {}
    for entry in client.list_artifacts(run_id):
        if not entry.is_dir:
            continue
        names = {a.path for a in client.list_artifacts(run_id, entry.path)}
        if f"{entry.path}/figures.json" not in names:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, f"{entry.path}/figures.json", tmp)
            with open(local, encoding="utf-8") as fh:
                data = json.load(fh)
        out.update({f"{entry.path}/{k}": float(v) for k, v in data.items()})
    return out


def run(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from rich.console import Console
    from rich.table import Table

    from instructflow import tracking

    client = MlflowClient(tracking_uri=tracking.tracking_uri(args.tracking_uri))
    runs = []
    for run_id in (args.run_a, args.run_b):
        try:
            runs.append(client.get_run(run_id))
        except MlflowException:
            print(f"error: run {run_id!r} not found in {client.tracking_uri}", file=sys.stderr)
            return 1
    a, b = runs
    console = Console(width=max(Console().width, 120))
    label_a = f"A {a.info.run_name or ''} {a.info.run_id[:8]}".strip()
    label_b = f"B {b.info.run_name or ''} {b.info.run_id[:8]}".strip()

    params = Table(title="config (params)")
    for col in ("key", label_a, label_b):
        params.add_column(col, overflow="fold")
    for row in param_rows(a.data.params, b.data.params, args.all):
        params.add_row(*row)
    metrics = Table(title="metrics")
    for col in ("metric", label_a, label_b, "B - A"):
        metrics.add_column(col, overflow="fold")
    figures_a, figures_b = _figures(client, a.info.run_id), _figures(client, b.info.run_id)
    for row in metric_rows(
        {**figures_a, **a.data.metrics}, {**figures_b, **b.data.metrics}, args.all
    ):
        metrics.add_row(*row)
    console.print(params if params.row_count else "config: identical")
    console.print(metrics if metrics.row_count else "metrics: identical")
    for label, r in () if args.no_models else ((label_a, a), (label_b, b)):
        table = _models_table(client, r, label)
        if table is not None:
            console.print(table)
    return 0
