"""What the MLflow UI opens on: an experiment's training runs with the figures that decide
between them as columns, not MLflow 3's GenAI pages.

MLflow 3.17's UI picks GenAI or "Model training" from a `workflowType` URL parameter (else the
browser's last choice, GenAI on a fresh browser); its experiment tag `mlflow.experimentKind`
no longer decides it. A run-list layout (columns, sort) can be stored in the experiment as a
"shared view" (the tag `mlflow.sharedViewState.<key>`, opened with `viewStateShareKey=<key>`:
what the UI's own Share button writes). So the links this project prints carry both, and every
run refreshes the stored view. Checked in Chromium against MLflow 3.17.2 (docs/screenshots.py).
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

# Its code changes no stage's output (instructflow.codeid does not follow it).
OUTPUT_NEUTRAL = True

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # "Machine learning" in MLflow's kind selector
VIEW_KEY = "instructflow-runs"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"

# Tuned beside base, as the console's table shows them.
KEY_METRICS = (
    "evaluate/exact_match",
    "evaluate/base/exact_match",
    "evaluate/rougeL",
    "evaluate/base/rougeL",
    "evaluate/perplexity",
    "evaluate/base/perplexity",
    "train/loss",
)
KEY_PARAMS = ("model.name", "train.method.name")


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # the UI's column ids (makeCanonicalSortKey)


def view_state() -> dict:
    columns = [_column("metrics", m) for m in KEY_METRICS]
    columns += [_column("params", p) for p in KEY_PARAMS]
    columns += [_column("attributes", a) for a in ("Models", "Dataset")]
    return {
        "selectedColumns": columns,
        "columnOrder": columns,  # else the UI sorts them by name: base before tuned
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
    }


def experiment_tags() -> dict[str, str]:
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, VIEW_TAG: json.dumps(view_state())}


def refresh(client, experiment) -> None:
    """Bring an existing experiment's kind and stored view up to date (a cheap no-op when
    they are): experiments made by older versions opened on the GenAI pages."""
    have = experiment.tags or {}
    for key, value in experiment_tags().items():
        if have.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)


def experiment_url(base: str, experiment_id: str) -> str:
    query = urlencode({"workflowType": "machine_learning", "viewStateShareKey": VIEW_KEY})
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    query = urlencode({"workflowType": "machine_learning"})
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{query}"
