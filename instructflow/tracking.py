"""MLflow: one run per pipeline run; every stage's figures and files land in it.

Stages never talk to MLflow for their results: they put figures into their artifact's
manifest `meta`, and `log_stage` records them. So a Cached stage (whose code did not run)
still fills the new run completely.

Recognised `meta` keys (all optional):
  metrics:      {name: number}                       -> metric "<stage>/<name>" (a chart)
  step_metrics: {name: [[step, value], ...]}         -> metric "<stage>/<name>" with steps
  figures:      {name: number}                       -> "<stage>/figures.json" (bookkeeping:
                                                        counts and sizes, no chart)
  log_files:    [relpath, ...]                       -> artifacts under "<stage>/"
  log_dirs:     [relpath, ...]                       -> artifacts under "<stage>/<relpath>"
  images:       [relpath.png, ...]                   -> mlflow image "<stage>/<stem>" (step 0):
                                                        a chart of its own in the run's page
  datasets:     [{file, name, context}]              -> mlflow.log_input, digest = file sha256
  tables:       [{file, artifact_file}]              -> mlflow.log_table (file: JSON {col: [..]})
  params:       {name: value}                        -> "<stage>.out.<name>" params
  tags:         {name: value}                        -> run tags
  models:       [{name, role, step, path, metrics}]  -> MLflow 3 LoggedModels of the run (the
                                                        kept checkpoints and the final model,
                                                        see instructflow.logged_models)
  measured_model: a train artifact's digest          -> `metrics` (not the base's twins) also
                                                        logged on its final LoggedModel
  summary:      short text for the CLI table
Metric names group by stage in the MLflow UI (`metric_name`): `train/loss`, `evaluate/rougeL`,
the base model's twins under `evaluate/base/...`, per-task exact match under `evaluate/em/...`.
The artifact's digest is the tag `instructflow.digest.<stage>`.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

from instructflow import logged_models, mlflow_view, workspace
from instructflow.artifacts import ArtifactRef, sha256_file

# Its code changes no stage's output (instructflow.codeid does not follow it).
OUTPUT_NEUTRAL = True

SECRET_HINTS = ("api_key", "apikey", "secret", "password", "token")
DIGEST_TAG = "instructflow.digest."
_MAX_PARAM_LEN = 6000


class TrackingError(RuntimeError):
    pass


def tracking_uri(configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or workspace.mlflow_db_uri()


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    import httpx

    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=timeout)
    except httpx.HTTPError as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({type(exc).__name__}); "
            "start it or unset tracking.tracking_uri to use the local store"
        ) from None


def setup(configured_uri: str | None, experiment: str, on_unreachable: str = "fail") -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    uri = tracking_uri(configured_uri)
    with _store_init_lock(uri):
        return _setup(uri, experiment, on_unreachable)


def _store_init_lock(uri: str):
    """Two runs starting at once on a fresh sqlite store both try to create its tables."""
    from contextlib import nullcontext

    if not uri.startswith("sqlite:///"):
        return nullcontext()
    from filelock import FileLock

    return FileLock(uri.removeprefix("sqlite:///") + ".lock", timeout=300)


def _setup(uri: str, experiment: str, on_unreachable: str) -> str:
    import logging

    import mlflow

    try:
        _check_reachable(uri)
    except TrackingError as exc:
        if on_unreachable != "local":
            raise
        logging.getLogger("instructflow").warning("%s; logging to the workspace store", exc)
        from instructflow import progress

        progress.notify("warning", message=f"{exc}; logging to {workspace.mlflow_db_uri()}")
        uri = workspace.mlflow_db_uri()
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        mlflow_view.refresh(mlflow.MlflowClient(), exp)
        return exp.experiment_id
    location = None
    if not uri.startswith(("http://", "https://")):
        # Without an explicit location artifacts land in ./mlruns of the current directory.
        location = (workspace.mlflow_artifact_root() / experiment).as_uri()
    try:
        # Model training, and the run list's stored view (instructflow.mlflow_view).
        return mlflow.create_experiment(
            experiment, artifact_location=location, tags=mlflow_view.experiment_tags()
        )
    except Exception:
        # Created concurrently by another process.
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return exp.experiment_id


def describe_run(run_id: str, markdown: str) -> None:
    """The run's description in the MLflow UI (the note shown on its overview page)."""
    from mlflow.tracking import MlflowClient

    MlflowClient().set_tag(run_id, "mlflow.note.content", markdown)


def run_name(config_path: str | None) -> str:
    """A run name that says what ran and when: the config's name and the start time."""
    import time

    stem = Path(config_path).stem if config_path else "defaults"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def redact(flat: dict[str, Any]) -> dict[str, Any]:
    """Drop anything that looks like a secret value (names of env vars are kept)."""
    out = {}
    for k, v in flat.items():
        leaf = k.rsplit(".", 1)[-1].lower()
        if any(h in leaf for h in SECRET_HINTS) and not leaf.endswith("_env"):
            continue
        out[k] = v
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def metric_name(stage: str, key: str) -> str:
    """`perplexity_base` -> `evaluate/base/perplexity`, `em.capital` -> `evaluate/em/capital`."""
    base = key.endswith("_base")
    key = (key[: -len("_base")] if base else key).replace(".", "/")
    return f"{stage}/base/{key}" if base else f"{stage}/{key}"


def log_step_metrics(run_id: str, stage: str, step: int, values: dict[str, float]) -> None:
    """One step's metrics of a running stage, now (real timestamps: live curves in the UI)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = _now_ms()
    batch = [
        Metric(metric_name(stage, k), float(v), now, step) for k, v in values.items() if _num(v)
    ]
    if batch:
        MlflowClient().log_batch(run_id, metrics=batch)


def log_stage(run_id: str, ref: ArtifactRef, step_metrics: bool = True) -> dict[str, Any]:
    """Record a stage's artifact in the run; returns its figures and metrics by their metric
    names (for the CLI summary). `step_metrics=False`: the stage already logged its curves
    live (log_step_metrics)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    import mlflow

    client = MlflowClient()
    stage = ref.stage
    meta = ref.meta
    now = _now_ms()

    metrics = {
        metric_name(stage, k): float(v) for k, v in meta.get("metrics", {}).items() if _num(v)
    }
    model_id = _measured_model(run_id, meta.get("measured_model"))
    batch = [
        Metric(k, v, now, 0, model_id=None if k.startswith(f"{stage}/base/") else model_id)
        for k, v in metrics.items()
    ]
    for name, series in meta.get("step_metrics", {}).items() if step_metrics else ():
        key = metric_name(stage, name)
        batch += [Metric(key, float(v), now, int(s)) for s, v in series if _num(v)]
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i : i + 1000])
    # After the curves: the models' points reuse their timestamps.
    logged_models.log_models(client, run_id, ref, now, metric_name)

    # Under "<stage>.out." so a stage's own params can never collide with the config's
    # "<stage>.<key>" params (MLflow refuses to change a logged param and fails the run).
    params = {f"{stage}.out.{k}": v for k, v in meta.get("params", {}).items()}
    log_params(client, run_id, params)
    for k, v in {**meta.get("tags", {}), f"{DIGEST_TAG}{stage}": ref.digest}.items():
        client.set_tag(run_id, k, str(v))
    figures = {metric_name(stage, k): v for k, v in meta.get("figures", {}).items() if _num(v)}
    if figures:
        client.log_dict(run_id, meta["figures"], f"{stage}/figures.json")

    for rel in meta.get("log_files", []):
        path = ref.file(rel)
        if path.is_file():
            sub = Path(rel).parent.as_posix()
            client.log_artifact(run_id, str(path), f"{stage}/{sub}" if sub != "." else stage)
    for rel in meta.get("log_dirs", []):
        if ref.file(rel).is_dir():
            client.log_artifacts(run_id, str(ref.file(rel)), f"{stage}/{rel}")

    for rel in meta.get("images", []):
        if ref.file(rel).is_file():
            from PIL import Image

            with Image.open(ref.file(rel)) as image:
                client.log_image(run_id, image, key=f"{stage}/{Path(rel).stem}", step=0)

    with _active(run_id):
        for ds in meta.get("datasets", []):
            _log_dataset(ref, ds)
        for table in meta.get("tables", []):
            data = json.loads(ref.file(table["file"]).read_text(encoding="utf-8"))
            mlflow.log_table(data, artifact_file=table["artifact_file"])
    return {**figures, **metrics}


def _measured_model(run_id: str, digest: str | None) -> str | None:
    if not digest:
        return None
    model = logged_models.final_model(run_id, digest)
    return model.model_id if model is not None else None


# A dataset input's schema comes from its first rows: reading a million-row file into pandas
# to log it would take GBs for the same schema.
SCHEMA_ROWS = 10_000


def _log_dataset(ref: ArtifactRef, ds: dict[str, Any]) -> None:
    import pandas as pd
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    import mlflow

    path = ref.file(ds["file"])
    # MLflow's own digest hashes only the first 10,000 rows: pass the file's full sha256.
    digest = sha256_file(path)[:16]
    rows = None
    frame = pd.DataFrame()
    if path.suffix == ".jsonl":
        with open(path, "rb") as fh:
            rows = sum(1 for line in fh if line.strip())
        if rows:
            frame = pd.read_json(path, lines=True, dtype=False, nrows=SCHEMA_ROWS)
    elif path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    frame = frame.map(lambda v: json.dumps(v) if isinstance(v, list | dict) else v)
    with warnings.catch_warnings():
        # Schema hints about integer columns and "ambiguous" local sources: noise here.
        warnings.simplefilter("ignore", UserWarning)
        dataset = _rows_dataset_class()(
            frame,
            rows if rows is not None else len(frame),
            source=resolve_dataset_source(str(path)),
            name=ds.get("name", path.stem),
            digest=digest,
        )
        mlflow.log_input(dataset, context=ds.get("context", "train"))


@functools.cache
def _rows_dataset_class():
    """Built on first use: mlflow is imported lazily, for start-up time."""
    from mlflow.data.pandas_dataset import PandasDataset

    class RowsDataset(PandasDataset):
        """A pandas dataset of a file's first rows whose profile counts the whole file."""

        def __init__(self, df, rows: int, **kwargs):
            super().__init__(df, **kwargs)
            self._rows = rows

        @property
        def profile(self) -> dict[str, int]:
            return {"num_rows": self._rows, "num_elements": self._rows * len(self._df.columns)}

    return RowsDataset


class _active:
    """Temporarily make `run_id` the active fluent run of this thread."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.started = False

    def __enter__(self):
        import mlflow

        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            mlflow.start_run(run_id=self.run_id, nested=active is not None)
            self.started = True

    def __exit__(self, *exc):
        import mlflow

        if self.started:
            mlflow.end_run()


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
