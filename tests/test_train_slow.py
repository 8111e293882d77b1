"""train stage end to end in subprocesses: SIGKILL + resume, and 2-process DDP on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from instructflow import workspace
from instructflow.config import TrainConfig
from instructflow.loading import load_base_model, load_tokenizer
from instructflow.training.stage import work_key
from instructflow.training.trainer import ROOT, last_complete_checkpoint
from tasks.train import train

pytestmark = pytest.mark.slow
STEPS = 16  # long enough after the first checkpoint (step 2) for the test to kill it

DRIVER = """
import json, sys
from instructflow import workspace
workspace.configure()
from instructflow.artifacts import ArtifactRef
from instructflow.config import TrainConfig
from tasks.train import train
spec = json.loads(sys.argv[1])
refs = [ArtifactRef.model_validate(spec[k]) for k in ("tokenized", "base", "tokenizer")]
train(*refs, TrainConfig.model_validate(spec["cfg"]))
"""


def _generates(train_ref, base) -> None:
    from peft import PeftModel

    tok = load_tokenizer(train_ref.file("tokenizer"))
    model = PeftModel.from_pretrained(load_base_model(base), str(train_ref.file("adapter")))
    prompt = tok("### Instruction:\nWhat is 1 plus 5?\n\n### Response:\n", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt.input_ids.shape[1]


def test_sigkilled_run_resumes_from_last_complete_checkpoint(train_inputs):
    tokenized, base, tok_ref = train_inputs
    cfg = TrainConfig(
        method={"name": "lora", "r": 4},
        max_steps=STEPS,
        per_device_batch_size=2,
        save_steps=2,
        eval_steps=100,
        logging_steps=1,
        save_total_limit=3,
    )
    work = workspace.work_dir("train", work_key(tokenized, base, tok_ref, cfg)) / "checkpoints"
    spec = {
        "tokenized": tokenized.model_dump(),
        "base": base.model_dump(),
        "tokenizer": tok_ref.model_dump(),
        "cfg": cfg.model_dump(mode="json"),
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(spec)],
        cwd=ROOT,
        env=env,
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
    assert 2 <= killed_at < STEPS
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {
        p.name for p in last_complete_checkpoint(work).iterdir()
    }

    ref = train(tokenized, base, tok_ref, cfg)  # same inputs -> same work dir -> resume
    metrics = ref.figures
    assert metrics["resumed_from_step"] == killed_at and metrics["steps"] == STEPS
    logged = [s for s, _ in ref.meta["step_metrics"]["loss"]]
    # Each step once: the killed run's from the checkpoint's log history, none redone.
    assert logged == list(range(1, STEPS + 1))
    assert not work.exists()  # scratch removed once the artifact is published
    _generates(ref, base)
    # Optimizer, scheduler, RNG and data order were restored: the curve continues exactly
    # as an uninterrupted run's (resume=False changes the key, so this one starts fresh).
    whole = train(tokenized, base, tok_ref, cfg.model_copy(update={"resume": False}))
    assert whole.figures["resumed_from_step"] == 0
    # The whole curve: steps up to the kill replayed from the checkpoint, the rest re-trained.
    expected = [v for _, v in whole.meta["step_metrics"]["loss"]]
    assert [v for _, v in ref.meta["step_metrics"]["loss"]] == pytest.approx(expected, rel=1e-5)


def test_two_process_ddp_trains_rank_shards_and_rank0_writes(train_inputs):
    tokenized, base, tok_ref = train_inputs
    cfg = TrainConfig(
        method={"name": "lora", "r": 4},
        nproc=2,
        max_steps=3,
        per_device_batch_size=2,
        eval_steps=2,
    )
    ref = train(tokenized, base, tok_ref, cfg)
    info = json.loads(ref.file("train.json").read_text())
    assert info["metrics"]["world_size"] == 2 and info["metrics"]["steps"] == 3
    seen_dir = workspace.work_dir("train", work_key(tokenized, base, tok_ref, cfg)) / "seen"
    ranks = {r: json.loads((seen_dir / f"rank{r}.json").read_text()) for r in (0, 1)}
    a, b = (set(ranks[r]["examples"]) for r in (0, 1))
    # Each rank took its own 2 examples a step (the loader may prefetch one more batch).
    assert len(a) >= 6 and len(b) >= 6 and not a & b
    assert ranks[0]["wrote_outputs"] and not ranks[1]["wrote_outputs"]
    assert sorted(p.name for p in ref.dir.iterdir()) == [
        "MANIFEST.json",
        "adapter",
        "loss_curve.png",
        "tokenizer",
        "train.json",
    ]
    _generates(ref, base)


def test_flow_trains_then_hits_the_cache_and_fills_mlflow(home):
    from mlflow.tracking import MlflowClient

    from flows.run import run_finetune

    overrides = [
        "data.demo_rows=40",
        "tokenize.max_length=64",
        "train.method=lora",
        "train.max_steps=2",
        "train.logging_steps=1",
        "train.method.r=4",
        "tracking.min_free_disk_mb=0",
    ]
    first = run_finetune(None, overrides, until="train")
    second = run_finetune(None, overrides, until="train")
    assert first["stages"]["train"]["state"] == "Completed"
    assert second["stages"]["train"]["state"] == "Cached"
    digest = first["stages"]["train"]["artifact_digest"]
    assert second["stages"]["train"]["artifact_digest"] == digest
    client = MlflowClient()
    for summary in (first, second):  # a Cached stage still fills its new run
        run_id = summary["mlflow_run_id"]
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2]
        logged = {a.path for a in client.list_artifacts(run_id, "train")}
        assert "train/adapter" in logged and "train/loss_curve.png" in logged
