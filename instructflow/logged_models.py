"""MLflow 3 LoggedModels of a run: the train stage's kept checkpoints and its final model.

A train artifact's manifest lists them (`models`, instructflow.training.checkpoints);
tracking.log_stage makes each an *external* LoggedModel of the run (`source_run_id`; no weights
copied: its tag `instructflow.weights` is the `runs:/` URI of the weights the run already
holds under `<stage>/`), with its step as a tag and its step figures as model metrics
(`train/eval_loss`, ... the run's own names and values). Checkpoints are run outputs at their
step; the final model becomes one when register logs into it (MLflow refuses a second time).

Per run: a Cached train stage in a new run gets the new run its own models (pointing at the
new run's copy of the weights, which log_stage uploads for it anyway), so every run shows its
models; logging the same artifact again into the same run finds them (by run, artifact digest
and name) and creates nothing, and its metrics reuse the run's timestamps, so nothing doubles.

Later, the evaluate stage's figures are logged against the final model (`measured_model` in
its meta), and the register stage logs the registry's pyfunc into that same LoggedModel, so
the registered version's source is `models:/<its model_id>` (MLflow's SQL registry stores no
ModelVersion.model_id: the source is the link).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from instructflow.artifacts import ArtifactRef

# Its code changes no stage's output (instructflow.codeid does not follow it).
OUTPUT_NEUTRAL = True

ROLE_TAG = "instructflow.role"  # "checkpoint" or "final"
DIGEST_TAG = "instructflow.artifact_digest"  # the train artifact's
STEP_TAG = "instructflow.step"
WEIGHTS_TAG = "instructflow.weights"
# The best model first, per train.best_by ("last" keeps the final weights: eval_loss ranks).
BEST_BY = {
    "last": ("eval_loss", True),
    "eval_loss": ("eval_loss", True),
    "exact_match": ("eval_exact_match", False),
    "rougeL": ("eval_rougeL", False),
}


def order_by(best_by: str = "eval_loss", stage: str = "train") -> list[dict[str, Any]]:
    """`order_by` for mlflow.search_logged_models: the best model by `train.best_by` first."""
    name, ascending = BEST_BY.get(best_by, BEST_BY["eval_loss"])
    return [{"field_name": f"metrics.{stage}/{name}", "ascending": ascending}]


def search(client, run_id: str, digest: str | None = None, order=None) -> list:
    """The run's LoggedModels (those of one artifact if `digest`), in `order`."""
    exp = client.get_run(run_id).info.experiment_id
    where = f"source_run_id = '{run_id}'"
    if digest:
        where += f" AND tags.`{DIGEST_TAG}` = '{digest}'"
    found, token = [], None
    while True:
        page = client.search_logged_models([exp], where, order_by=order, page_token=token)
        found += page.to_list()
        token = page.token
        if not token:
            return found


def final_model(run_id: str, digest: str):
    """The final LoggedModel of train artifact `digest` in the run, or None."""
    from mlflow.tracking import MlflowClient

    models = search(MlflowClient(), run_id, digest)
    return next((m for m in models if m.tags.get(ROLE_TAG) == "final"), None)


def log_models(
    client, run_id: str, ref: ArtifactRef, now: int, metric_name: Callable[[str, str], str]
) -> dict[str, str]:
    """LoggedModels for the artifact's `models` entries; returns {name: model_id}.
    `metric_name`: the run's naming of a stage's figure (tracking.metric_name, passed in: this
    module is imported by tracking)."""
    from mlflow.entities import Metric
    from mlflow.entities.logged_model_output import LoggedModelOutput

    entries = ref.meta.get("models") or []
    if not entries:
        return {}
    have = {m.name: m for m in search(client, run_id, ref.digest)}
    stamps = _timestamps(client, run_id, ref.stage, entries, metric_name)
    batch, outputs, ids = [], [], {}
    for e in entries:
        name = f"{ref.stage}-{e['name']}"
        model = have.get(name)
        if model is None:
            model = _create(client, run_id, ref, name, e)
            if e["role"] != "final":  # register's log_model records the final one (it refuses
                # a model that is already an output of the run)
                outputs.append(LoggedModelOutput(model.model_id, e["step"]))
        ids[name] = model.model_id
        for k, v in e["metrics"].items():
            key = metric_name(ref.stage, k)
            # The run's own point where there is one (the row then is not written twice).
            ts = stamps.get((key, e["step"], v), model.creation_timestamp or now)
            batch.append(Metric(key, float(v), ts, e["step"], model_id=model.model_id))
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i : i + 1000])
    if outputs:
        client.log_outputs(run_id, outputs)
    return ids


def _create(client, run_id: str, ref: ArtifactRef, name: str, entry: dict[str, Any]):
    import mlflow

    exp = client.get_run(run_id).info.experiment_id
    tags = {
        ROLE_TAG: entry["role"],
        DIGEST_TAG: ref.digest,
        STEP_TAG: str(entry["step"]),
        WEIGHTS_TAG: f"runs:/{run_id}/{ref.stage}/{entry['path']}",
        "instructflow.stage": ref.stage,
    }
    return mlflow.create_external_model(
        name=name, source_run_id=run_id, tags=tags, model_type=entry["role"], experiment_id=exp
    )


def _timestamps(client, run_id: str, stage: str, entries: list[dict], metric_name) -> dict:
    """{(metric, step, value): timestamp} of the run's points the models' metrics repeat."""
    keys = {metric_name(stage, k) for e in entries for k in e["metrics"]}
    # The earliest: a run that logs the stage again adds later points; the models keep theirs.
    points = sorted(
        (m for key in keys for m in client.get_metric_history(run_id, key)),
        key=lambda m: -m.timestamp,
    )
    return {(m.key, m.step, m.value): m.timestamp for m in points}
