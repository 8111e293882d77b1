"""Knowledge distillation end to end: the real flow (Prefect + MLflow + registry) with
distill.enabled, cache behaviour when alpha changes, the registered student, the refusal of
a student with another vocabulary, and a SIGKILLed student that resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from tokenized_fixtures import write_tokenized

from flows.run import run_finetune
from instructflow import demo_data, loading, model_specs, workspace
from instructflow.builtin import model as builtin
from instructflow.config import DistillTeacherConfig, ModelConfig, TrainConfig
from instructflow.training.distill import DistillError
from instructflow.training.stage import work_key
from instructflow.training.trainer import ROOT, last_complete_checkpoint
from tasks.base_model import prepare_student_base, prepare_tokenizer
from tasks.distill import distill, teacher_spec
from tasks.teacher_logits import teacher_logits

pytestmark = pytest.mark.slow

RUN = [
    "data.demo_rows=120",
    "tokenize.max_length=96",
    "train.method={name: lora, r: 4, alpha: 8, dropout: 0.0}",
    "train.learning_rate=4e-3",
    "train.max_steps=16",
    "train.per_device_batch_size=16",
    "train.save_steps=8",
    "train.eval_steps=8",
    "evaluate.max_new_tokens=8",
    "evaluate.group_by=null",
    "judge.backend=none",
    "tracking.log_system_metrics=false",
    "distill.enabled=true",
    "distill.teacher.top_k=16",
    "distill.train.max_steps=12",
    "distill.train.per_device_batch_size=16",
    "distill.train.save_steps=6",
    "distill.train.eval_steps=6",
]
DISTILL = ("teacher_logits", "distill", "distill_baseline", "distill_report")


@pytest.fixture(scope="module", autouse=True)
def micro_built():
    """builtin:micro pre-trained once for the module (per-user cache, as users get it)."""
    model_specs.load_builtin(builtin.MICRO)


def _states(summary):
    return {k: v["state"] for k, v in summary["stages"].items()}


def _ref(summary, stage):
    from instructflow.artifacts import ArtifactRef

    digest = summary["stages"][stage]["artifact_digest"]
    path = workspace.artifacts_dir() / stage / digest
    return ArtifactRef(stage=stage, path=str(path), digest=digest)


def test_distill_runs_in_the_flow_and_another_alpha_retrains_only_the_student(home):
    from mlflow.tracking import MlflowClient

    import mlflow

    first = run_finetune(None, RUN)
    states = _states(first)
    assert {states[s] for s in (*DISTILL, "register", "register_student")} == {"Completed"}
    assert first["helpers"]["student_base"]["state"] in ("Completed", "Cached")

    report = json.loads(_ref(first, "distill_report").file("compression.json").read_text())
    teacher, student, baseline = report["rows"]
    assert [r["model"] for r in report["rows"]] == ["teacher", "student", "student α=0"]
    assert student["parameters"] * 4 < teacher["parameters"]  # builtin:micro vs builtin:tiny
    assert student["compression"] == pytest.approx(teacher["parameters"] / student["parameters"])
    assert 0 < student["size_bytes"] < teacher["size_bytes"]
    for row in (student, baseline):
        assert row["speedup"] == pytest.approx(
            row["generation_tokens_per_s"] / teacher["generation_tokens_per_s"]
        )
        assert row["retained_perplexity"] == pytest.approx(
            teacher["perplexity"] / row["perplexity"]
        )
    assert report["distill"]["alpha"] == 0.7 and report["distill"]["top_k"] == 16
    assert "this run's lora model on builtin:tiny" in report["teacher"]
    student_info = json.loads(_ref(first, "distill").file("train.json").read_text())
    baseline_info = json.loads(_ref(first, "distill_baseline").file("train.json").read_text())
    assert student_info["distill"]["temperature"] == 2.0 and "distill" not in baseline_info
    assert student_info["method"] == "lora" and student_info["metrics"]["steps"] == 12

    run = MlflowClient().get_run(first["mlflow_run_id"])
    logged_metrics = run.data.metrics
    assert logged_metrics["distill_report/student/exact_match"] == student["exact_match"]
    assert logged_metrics["distill_report/baseline/parameters"] == baseline["parameters"]
    assert logged_metrics["distill_report/student/speedup"] == pytest.approx(student["speedup"])
    logged = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "distill_report")}
    assert "distill_report/compression.md" in logged

    # The student is its own registered model; its pyfunc answers like the artifact.
    name = "instructflow-demo-student"
    version = MlflowClient().get_model_version_by_alias(name, "champion")
    card = MlflowClient().get_model_version(name, version.version).description
    assert "**Distilled from** this run's lora model on builtin:tiny" in card
    registered, tok, _ = model_specs.load_for_inference(f"models:/{name}@champion")
    own, _ = loading.load_finetuned(_ref(first, "distill"), _student_base(first))
    ids = tok("### Instruction:\nName a colour.\n\n### Response:\n", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(registered(**ids).logits, own.eval()(**ids).logits, atol=1e-5)
    mlflow.end_run() if mlflow.active_run() else None

    second = run_finetune(None, [*RUN, "distill.alpha=0.5"])
    states = _states(second)
    unchanged = ("tokenize", "train", "evaluate", "teacher_logits", "distill_baseline")
    assert {states[s] for s in unchanged} == {"Cached"}
    assert states["distill"] == states["distill_report"] == "Completed"
    again = json.loads(_ref(second, "distill").file("train.json").read_text())
    assert again["distill"]["alpha"] == 0.5


def _student_base(summary):
    from instructflow.artifacts import ArtifactRef

    digest = summary["helpers"]["student_base"]["artifact_digest"]
    path = workspace.artifacts_dir() / "base_model" / digest
    return ArtifactRef(stage="base_model", path=str(path), digest=digest)


@pytest.fixture
def inputs(home):
    tok_ref = prepare_tokenizer(ModelConfig())
    tok = loading.load_tokenizer(tok_ref)
    rows = demo_data.generate(60, seed=4)
    tokenized = write_tokenized({"train": rows[:48], "validation": rows[48:]}, tok, max_length=64)
    # The pre-trained builtin:tiny as a teacher named in the config (no fine-tune needed).
    logits = teacher_logits(
        tokenized, None, None, tok_ref, DistillTeacherConfig(top_k=8, model="builtin:tiny")
    )
    student_base = prepare_student_base(ModelConfig(name_or_path=builtin.MICRO), tok_ref)
    return tokenized, logits, student_base, tok_ref


def test_a_student_with_another_vocabulary_is_refused_in_one_line(inputs, tmp_path):
    from instructflow.builtin.model import build_model, build_tokenizer

    tokenized, logits, _, tok_ref = inputs
    other = build_tokenizer(["a few other words to learn from"] * 10, vocab_size=300)
    folder = tmp_path / "other-student"
    build_model(other, dict(builtin.MICRO_ARCH, num_hidden_layers=1)).save_pretrained(str(folder))
    other.save_pretrained(str(folder))
    from tasks.base_model import prepare_base_model

    alien = prepare_base_model(ModelConfig(name_or_path=str(folder)), tok_ref)
    with pytest.raises(DistillError, match="vocabulary differs from the data's") as err:
        distill(tokenized, logits, alien, tok_ref, TrainConfig(max_steps=1), 0.7, 2.0)
    assert "\n" not in str(err.value)


DRIVER = """
import json, sys
from instructflow import workspace
workspace.configure()
from instructflow.artifacts import ArtifactRef
from instructflow.config import TrainConfig
from tasks.distill import distill, teacher_spec
spec = json.loads(sys.argv[1])
refs = [ArtifactRef.model_validate(spec[k]) for k in ("tokenized", "logits", "base", "tokenizer")]
distill(*refs, TrainConfig.model_validate(spec["cfg"]), 0.7, 2.0)
"""


def test_a_sigkilled_student_resumes_from_its_last_checkpoint(inputs):
    tokenized, logits, student_base, tok_ref = inputs
    steps = 16
    cfg = TrainConfig(
        method="full",
        learning_rate=1e-3,
        max_steps=steps,
        per_device_batch_size=4,
        save_steps=2,
        eval_steps=100,
        logging_steps=1,
        save_total_limit=3,
    )
    key = work_key(tokenized, student_base, tok_ref, cfg, teacher_spec(logits, 0.7, 2.0))
    work = workspace.work_dir("distill", key) / "checkpoints"
    spec = {
        "tokenized": tokenized.model_dump(),
        "logits": logits.model_dump(),
        "base": student_base.model_dump(),
        "tokenizer": tok_ref.model_dump(),
        "cfg": cfg.model_dump(mode="json"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(spec)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    try:
        while last_complete_checkpoint(work) is None:
            assert proc.poll() is None, "training ended before a checkpoint could be killed"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(last_complete_checkpoint(work).name.split("-")[1])
    assert 2 <= killed_at < steps

    ref = distill(tokenized, logits, student_base, tok_ref, cfg, 0.7, 2.0)
    assert ref.figures["resumed_from_step"] == killed_at and ref.figures["steps"] == steps
    # The curve is whole: the killed run's steps come from the checkpoint's log history.
    logged = [s for s, _ in ref.meta["step_metrics"]["loss"]]
    assert logged == list(range(1, steps + 1))
    assert json.loads(ref.file("train.json").read_text())["distill"]["alpha"] == 0.7


def test_distill_reports_progress_on_its_own_row_and_a_ctrl_c_names_it(inputs):
    from instructflow import progress
    from instructflow.interrupts import Interrupted

    tokenized, logits, student_base, tok_ref = inputs
    cfg = TrainConfig(
        method="full",
        max_steps=40,
        per_device_batch_size=4,
        save_steps=100,
        eval_steps=100,
        logging_steps=1,
    )
    events: list[tuple[str, dict]] = []

    def listen(event: str, payload: dict) -> None:
        if event in ("stage_progress", "stage_metrics"):
            events.append((event, dict(payload)))
        if event == "stage_progress" and (payload["stage"], payload["completed"]) == ("distill", 3):
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, three steps in

    progress.subscribe(listen)
    try:
        with pytest.raises(Interrupted) as stop:
            distill(tokenized, logits, student_base, tok_ref, cfg, 0.7, 2.0)
        baseline_cfg = cfg.model_copy(update={"max_steps": 2})
        distill(tokenized, None, student_base, tok_ref, baseline_cfg, 0.0, None)
    finally:
        progress.unsubscribe(listen)
    said = "interrupted during distill (checkpoint at step 3; run again to resume)"
    assert stop.value.line() == said
    steps = [p for e, p in events if e == "stage_progress" and p["stage"] == "distill"]
    assert [(p["completed"], p["total"]) for p in steps] == [(1, 40), (2, 40), (3, 40)]
    assert re.fullmatch(r"loss \d+\.\d{3}, [\d,]+ tok/s, ETA \d+ s", steps[-1]["message"])
    # Every figure went to the stage that made it: no student step lands on the train row.
    assert {p["stage"] for _, p in events} == {"distill", "distill_baseline"}
    assert {e for e, p in events if p["stage"] == "distill_baseline"} == {
        "stage_progress",
        "stage_metrics",
    }
