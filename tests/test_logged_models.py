"""Checkpoints and the final model as MLflow 3 LoggedModels, through the real flow (Prefect +
MLflow sqlite store + registry): one per kept checkpoint plus the final one, with the
Trainer's step figures, the evaluate figures on the final one, the registered version linked
to it, and a Cached re-run that gives its run its own models without doubling any."""

from __future__ import annotations

import json

import pytest

from flows.run import run_finetune
from instructflow import logged_models, tracking, workspace
from instructflow.artifacts import ArtifactRef
from instructflow.training.checkpoints import METRICS

pytestmark = pytest.mark.slow

NAME = "lm-test"
RUN = [
    "data.demo_rows=60",
    "tokenize.max_length=96",
    "train.method=lora",
    "train.max_steps=6",
    "train.per_device_batch_size=8",
    "train.save_steps=2",
    "train.eval_steps=2",
    "train.save_total_limit=2",  # of checkpoints 2, 4, 6: 4 and 6 are kept
    "train.max_eval_examples=4",
    "train.eval_generation=2",
    "train.eval_max_new_tokens=4",
    "evaluate.max_examples=4",
    "evaluate.max_new_tokens=4",
    "evaluate.compare_base=false",
    "evaluate.group_by=null",
    "judge.backend=none",
    f"register.model_name={NAME}",
    "tracking.log_system_metrics=false",
]
STEP_KEYS = {f"train/{k}" for k in METRICS}


def _models(run_id: str) -> dict[str, object]:
    import mlflow

    exp = mlflow.get_run(run_id).info.experiment_id
    found = mlflow.search_logged_models(
        experiment_ids=[exp], filter_string=f"source_run_id = '{run_id}'", output_format="list"
    )
    return {m.name: m for m in found}


def _ranked(run_id: str, where: str = "") -> list:
    import mlflow

    return mlflow.search_logged_models(
        experiment_ids=[mlflow.get_run(run_id).info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'{where}",
        order_by=logged_models.order_by("eval_loss"),
        output_format="list",
    )


def _values(model, keys) -> dict[str, float]:
    return {m.key: m.value for m in model.metrics if m.key in keys}


def test_checkpoints_and_final_model_are_logged_models(home, capsys):
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    from instructflow.cli import main

    client = MlflowClient()
    first = run_finetune(None, RUN)
    run_id = first["mlflow_run_id"]
    digest = first["stages"]["train"]["artifact_digest"]
    train = ArtifactRef(
        stage="train", path=str(workspace.artifacts_dir() / "train" / digest), digest=digest
    )
    history = json.loads(train.file("train.json").read_text())["log_history"]
    models = _models(run_id)
    assert set(models) == {"train-checkpoint-4", "train-checkpoint-6", "train-final"}
    for m in models.values():
        step = int(m.tags[logged_models.STEP_TAG])
        want = {
            f"train/{k}": e[k] for e in history if e.get("step") == step for k in METRICS if k in e
        }
        assert {"train/eval_loss", "train/eval_rougeL", "train/eval_exact_match"} <= set(want)
        assert _values(m, STEP_KEYS) == want, m.name
        assert m.tags[logged_models.DIGEST_TAG] == digest
    assert int(models["train-final"].tags[logged_models.STEP_TAG]) == 6
    # Weights by reference into the run: checkpoint 6 is the published adapter byte for byte.
    weights = {n: m.tags[logged_models.WEIGHTS_TAG] for n, m in models.items()}
    adapter = f"runs:/{run_id}/train/adapter"
    assert weights["train-checkpoint-6"] == weights["train-final"] == adapter
    assert weights["train-checkpoint-4"] == f"runs:/{run_id}/train/checkpoints/checkpoint-4"
    files = {a.path for a in client.list_artifacts(run_id, "train/checkpoints/checkpoint-4")}
    assert "train/checkpoints/checkpoint-4/adapter_model.safetensors" in files
    assert not any("optimizer" in f or "trainer_state" in f for f in files)
    # The run's curves hold each point once (the models' metrics reuse the run's points).
    assert [m.step for m in client.get_metric_history(run_id, "train/eval_loss")] == [2, 4, 6]

    # Evaluate's figures are the final model's; the registered version is that model.
    run_metrics = client.get_run(run_id).data.metrics
    final = models["train-final"]
    evaluated = _values(final, {"evaluate/rougeL", "evaluate/exact_match"})
    assert evaluated == {k: run_metrics[k] for k in evaluated} and len(evaluated) == 2
    assert not _values(models["train-checkpoint-4"], {"evaluate/rougeL"})
    (version,) = client.search_model_versions(f"name='{NAME}'")
    # MLflow's SQL registry keeps no model_id column (ModelVersion.model_id reads None): the
    # link is the version's source, the final LoggedModel's URI, where it loads from.
    assert version.source == f"models:/{final.model_id}"
    # The registry's pyfunc now lives in it: no longer an external model.
    registered = client.get_logged_model(final.model_id)
    assert registered.status == LoggedModelStatus.READY
    assert "mlflow.model.isExternal" not in registered.tags
    # The README's recipe: the best checkpoint by eval_loss first.
    ranked = _ranked(run_id, " AND tags.`instructflow.role` = 'checkpoint'")
    losses = [_values(m, {"train/eval_loss"})["train/eval_loss"] for m in ranked]
    assert losses == sorted(losses) and len(ranked) == 2

    # A Cached re-run: its run gets its own models (same figures, its own weights' copy);
    # logging the artifact into that run again creates and doubles nothing.
    second = run_finetune(None, RUN)
    again = second["mlflow_run_id"]
    assert second["stages"]["train"]["state"] == "Cached"
    assert second["stages"]["evaluate"]["state"] == "Cached"
    assert [m.step for m in client.get_metric_history(again, "train/eval_loss")] == [2, 4, 6]
    tracking.log_stage(again, train)
    cached = _models(again)
    assert set(cached) == set(models)
    for name, m in cached.items():
        assert _values(m, STEP_KEYS) == _values(models[name], STEP_KEYS)
        assert m.tags[logged_models.WEIGHTS_TAG].startswith(f"runs:/{again}/train/")
        assert len([x for x in m.metrics if x.key == "train/eval_loss"]) == 1
    assert len(_models(run_id)) == 3
    assert _values(cached["train-final"], {"evaluate/rougeL"})  # Cached evaluate: logged again
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1  # register: unchanged

    capsys.readouterr()
    assert main(["compare", run_id, again]) == 0
    out = capsys.readouterr().out
    assert out.count("logged models of") == 2 and final.model_id in out
    best_first = [line.split()[1] for line in out.splitlines() if "│ train-" in line]
    assert best_first[:3] == [m.name for m in _ranked(run_id)]
