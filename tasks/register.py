"""register: log the fine-tuned model to MLflow, register it as `challenger`, gate `champion`.

Never cached: it reads live registry state (who the champion is). The model is a pyfunc
around the adapter + a reference to the base weights (see instructflow/registry.py). The
gate compares the challenger's evaluate report with the champion's (metrics are stored as
tags on each version, with the digest of the test split they were measured on); passing
moves `champion`. The decision and its reasons become tags on the version and on the run,
and `decision.json` in this stage's artifact. The pyfunc is logged into the run's final
LoggedModel of the train artifact (instructflow.logged_models): the version's source is
`models:/<its model_id>`.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from instructflow import gate, logged_models, registry, tracking
from instructflow.artifacts import ArtifactRef, write_artifact
from instructflow.caching import stage_task
from instructflow.config import RegisterConfig


def report_metrics(report: ArtifactRef) -> tuple[dict[str, float], dict[str, Any]]:
    """(numeric metrics, judge section) of an evaluate report."""
    data = json.loads(report.file("report.json").read_text())
    judge = data.get("judge") or {}
    merged = {**{k: v for k, v in judge.items() if k == "win_rate"}, **data.get("metrics", {})}
    nums = {k: float(v) for k, v in merged.items() if _num(v)}
    return nums, judge


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v


def _active_run() -> tuple[str, bool]:
    """The pipeline's MLflow run (inside the flow), or a new one for a direct call."""
    import mlflow

    run = mlflow.active_run()
    if run is not None:
        return run.info.run_id, False
    exp = tracking.setup(None, "instructflow")
    return mlflow.start_run(experiment_id=exp, run_name="register").info.run_id, True


def model_card(
    name: str, run_id: str, train: dict, base: dict, params: dict, digests: dict, metrics, judge
):
    """The version's description: base, data digests (stage -> digest), config, metrics."""
    config = {
        k: v
        for k, v in sorted(params.items())
        if k.split(".")[0] in ("data", "model", "tokenize", "train", "evaluate", "judge")
    }
    ref = (
        f"`{base.get('name_or_path')}` ({base.get('kind')}"
        + (f", revision `{base['revision']}`" if base.get("revision") else "")
        + ")"
    )
    where = (
        "weights shipped with this model (they exist only in the workspace)"
        if base.get("weights")
        else "referenced, not copied: loaded from the hub id + revision or the local path"
    )
    lines = [
        f"# {name}",
        "",
        f"Fine-tuned with instructflow (MLflow run `{run_id}`), method `{train.get('method')}`, "
        f"prompt template `{train.get('template')}`.",
        "",
        f"**Base model**: {ref}; {where}.",
        *_distilled_from(train),
        "",
        "## Data (artifact digests)",
        *[f"- `{k}`: `{v}`" for k, v in sorted(digests.items())],
        "",
        "## Metrics (test split)",
        *[f"- {k}: {v:.4g}" for k, v in sorted(metrics.items())],
        "",
        "## Judge",
        "```json",
        json.dumps(judge, indent=1, sort_keys=True, default=str),
        "```",
        "",
        "## Config",
        *[f"- `{k}`: `{v}`" for k, v in config.items()],
        "",
        "Usage: `instructflow generate --model models:/" + name + "@champion 'instruction'`",
    ]
    return "\n".join(lines) + "\n"


def _distilled_from(train: dict) -> list[str]:
    """A distilled student's card names its teacher and the loss (tasks/distill.py)."""
    kd = train.get("distill")
    if not kd:
        return []
    return [
        "",
        f"**Distilled from** {kd['teacher']}: loss alpha {kd['alpha']} * T^2 * KL(teacher_T "
        f"|| student_T) + (1 - alpha) * CE at T {kd['temperature']}, on the teacher's top-"
        f"{kd['top_k']} logits per response token.",
    ]


def register(
    model: ArtifactRef,
    report: ArtifactRef,
    base: ArtifactRef,
    cfg: RegisterConfig,
    stage: str = "register",
) -> ArtifactRef:
    """`stage`: "register_student" for a distilled student (its own artifact and run tags)."""
    if not cfg.enabled:
        decision = {"version": None, "alias": None, "promoted": False, "reasons": ["disabled"]}
        return _publish(decision, cfg, "register.enabled is false: nothing registered", stage)

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    import mlflow

    run_id, own_run = _active_run()
    client = MlflowClient()
    source = f"train:{model.digest} evaluate:{report.digest} base:{base.digest}"
    try:
        same = _registered_from(client, cfg.model_name, source)
        if same is not None:
            return _unchanged(client, cfg, run_id, same, stage)
        data = client.get_run(run_id).data
        params = data.params
        digests = {
            k.removeprefix(tracking.DIGEST_TAG): v
            for k, v in data.tags.items()
            if k.startswith(tracking.DIGEST_TAG)
        }
        metrics, judge = report_metrics(report)
        split_digest = digests.get("split", "")
        train_info = json.loads(model.file("train.json").read_text())
        base_info = json.loads(base.file("model.json").read_text())
        card = model_card(
            cfg.model_name, run_id, train_info, base_info, params, digests, metrics, judge
        )
        # The pyfunc goes into the run's final LoggedModel of this train artifact (tracking
        # made it when the train stage was logged), so the version is that model (source
        # models:/<model_id>), the one beside the checkpoints, with the evaluate figures.
        final = logged_models.final_model(run_id, model.digest)
        into = (
            {"model_id": final.model_id, "step": int(final.tags[logged_models.STEP_TAG])}
            if final is not None
            else {}  # a direct call outside a pipeline run: log_model makes one
        )
        with tempfile.TemporaryDirectory() as tmp:
            artifacts = registry.stage_model_files(model, base, card, Path(tmp))
            # The active run is the pipeline's (or the one started above). MLflow prints
            # "Successfully registered model ..." to stderr: the stage's summary says it.
            with contextlib.redirect_stderr(io.StringIO()):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(registry.model_code_file(Path(tmp))),
                    artifacts=artifacts,
                    signature=registry.signature(),
                    pip_requirements=registry.pip_requirements(train_info.get("method", "")),
                    registered_model_name=cfg.model_name,
                    metadata={"base_model": base_info, "template": train_info.get("template")},
                    **into,
                )
        version = str(info.registered_model_version)
        # A few key figures as tags (what the gate compares with); the rest is in the card.
        kept = {n for r in gate.RULES for n in (r.metric, f"{r.metric}_base")}
        tags = {f"{registry.METRIC_TAG}{k}": str(v) for k, v in metrics.items() if k in kept}
        tags[registry.SPLIT_TAG] = split_digest
        tags[registry.SOURCE_TAG] = source
        for k, v in tags.items():
            client.set_model_version_tag(cfg.model_name, version, k, v)
        client.set_registered_model_alias(cfg.model_name, registry.CHALLENGER, version)

        try:
            champ = client.get_model_version_by_alias(cfg.model_name, registry.CHAMPION)
        except MlflowException:
            champ = None
        champ_metrics = registry.version_metrics(champ) if champ is not None else None
        same = champ is None or champ.tags.get(registry.SPLIT_TAG, "") == split_digest
        promoted, reasons = gate.gate(metrics, champ_metrics, cfg, same_split=same, judge=judge)
        if promoted:
            client.set_registered_model_alias(cfg.model_name, registry.CHAMPION, version)
        verdict = "promoted" if promoted else "rejected"
        gate_tags = {registry.DECISION_TAG: verdict, registry.REASONS_TAG: "; ".join(reasons)}
        for k, v in gate_tags.items():
            client.set_model_version_tag(cfg.model_name, version, k, v)
            client.set_tag(run_id, _run_tag(k, stage), v)
        client.update_model_version(
            cfg.model_name, version, card + f"\n## Gate: {verdict}\n" + "\n".join(reasons)
        )
    finally:
        if own_run:
            mlflow.end_run()
    alias = registry.CHAMPION if promoted else registry.CHALLENGER
    decision = _decision(cfg, version, alias, promoted, champ, reasons)
    summary = f"{cfg.model_name} v{version} {verdict}" + (" -> champion" if promoted else "")
    return _publish(decision, cfg, summary, stage, gate_tags)


def _registered_from(client, name: str, source: str):
    """The version registered (and gated) from exactly these artifacts, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    done = [
        v
        for v in versions
        if v.tags.get(registry.SOURCE_TAG) == source and registry.DECISION_TAG in v.tags
    ]
    return max(done, key=lambda v: int(v.version), default=None)


def _run_tag(key: str, stage: str) -> str:
    """The run's tag for a registration: the student's decision beside the teacher's."""
    return key if stage == "register" else f"{key}.{stage.removeprefix('register_')}"


def _unchanged(client, cfg: RegisterConfig, run_id: str, version, stage: str) -> ArtifactRef:
    """A re-run with nothing new (e.g. a nightly run on unchanged data): no new version."""
    from mlflow.exceptions import MlflowException

    try:
        champ = client.get_model_version_by_alias(cfg.model_name, registry.CHAMPION)
    except MlflowException:
        champ = None
    is_champion = champ is not None and champ.version == version.version
    reason = (
        f"unchanged: version {version.version} was registered from the same train, evaluate "
        "and base artifacts"
    )
    tags = {registry.DECISION_TAG: "unchanged", registry.REASONS_TAG: reason}
    for k, v in tags.items():
        client.set_tag(run_id, _run_tag(k, stage), v)
    alias = registry.CHAMPION if is_champion else None
    decision = _decision(cfg, version.version, alias, False, champ, [reason], unchanged=True)
    summary = f"{cfg.model_name} v{version.version} unchanged (already registered)"
    return _publish(decision, cfg, summary, stage, tags)


def _decision(cfg: RegisterConfig, version, alias, promoted: bool, champ, reasons, **extra):
    return {
        "model_name": cfg.model_name,
        "version": int(version),
        "model_uri": f"models:/{cfg.model_name}/{version}",
        "alias": alias,
        "promoted": promoted,
        **extra,
        "champion_before": int(champ.version) if champ is not None else None,
        "reasons": reasons,
    }


def _publish(
    decision: dict, cfg: RegisterConfig, summary: str, stage: str, tags=None
) -> ArtifactRef:
    def write(tmp: Path) -> dict[str, Any]:
        (tmp / "decision.json").write_text(json.dumps(decision, indent=1))
        meta: dict[str, Any] = {
            "params": {"model_name": cfg.model_name},
            "log_files": ["decision.json"],
            "tags": {_run_tag(k, stage): v for k, v in (tags or {}).items()},
            "summary": summary,
        }
        if decision["version"] is not None:
            meta["figures"] = {
                "version": decision["version"],
                "promoted": int(decision["promoted"]),
            }
        return meta

    return write_artifact(stage, write)


register_task = stage_task("register", cache=False)(register)
