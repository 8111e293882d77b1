"""The MLflow UI opens on the training runs with the key columns (instructflow.mlflow_view),
and evaluate's base vs fine-tuned figure is drawn with the numbers on it.

What Chromium shows for these tags was checked by hand with docs/screenshots.py (MLflow 3.17.2:
`workflowType=machine_learning` opens "Model training", `viewStateShareKey` applies the stored
columns); here: the tags a real sqlite store holds, the links `instructflow ui` prints, the PNG.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

from mlflow.tracking import MlflowClient

from instructflow import mlflow_view, plots, tracking


def test_new_and_old_experiments_get_the_training_kind_and_the_stored_columns(home):
    uri = f"sqlite:///{home / 'mlflow.db'}"
    exp_id = tracking.setup(uri, "fresh")
    client = MlflowClient(uri)
    tags = client.get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags[mlflow_view.VIEW_TAG])
    assert view["selectedColumns"][:2] == [
        "metrics.`evaluate/exact_match`",
        "metrics.`evaluate/base/exact_match`",
    ]
    assert "params.`train.method.name`" in view["selectedColumns"]
    assert view["columnOrder"] == view["selectedColumns"]

    # An experiment made by an older version (kind "finetuning": the GenAI pages) is updated.
    old = client.create_experiment("old", tags={"mlflow.experimentKind": "finetuning"})
    assert tracking.setup(uri, "old") == old
    tags = client.get_experiment(old).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert json.loads(tags[mlflow_view.VIEW_TAG]) == view


def test_links_open_model_training_with_the_stored_view():
    url = mlflow_view.experiment_url("http://127.0.0.1:5000/", "7")
    fragment = urlsplit(url).fragment
    path, _, query = fragment.partition("?")
    assert url.startswith("http://127.0.0.1:5000/#/") and path == "/experiments/7/runs"
    assert parse_qs(query) == {
        "workflowType": ["machine_learning"],
        "viewStateShareKey": [mlflow_view.VIEW_KEY],
    }
    run = mlflow_view.run_url("http://h:1", "7", "abc")
    assert run == "http://h:1/#/experiments/7/runs/abc?workflowType=machine_learning"


def test_base_vs_tuned_figure_needs_the_base_and_shows_a_zero_base(tmp_path):
    from PIL import Image

    tuned_only = {"exact_match": 0.8, "rougeL": 0.9, "perplexity": 2.0}
    assert plots.base_vs_tuned(tuned_only, tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()

    both = {
        **tuned_only,
        "exact_match_base": 0.0,
        "rougeL_base": 0.02,
        "perplexity_base": 4e5,
        "em.capital": 0.95,
        "em.capital_base": 0.0,
        "bleu": float("nan"),  # no base twin: not drawn
    }
    path = tmp_path / "both.png"
    assert plots.base_vs_tuned(both, path) is True
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > image.height > 100
    # The same figures give the same bytes (a Cached evaluate logs an identical chart).
    again = tmp_path / "again.png"
    plots.base_vs_tuned(both, again)
    assert again.read_bytes() == path.read_bytes()
