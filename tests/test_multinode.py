"""Multi-node training: two torchrun node agents on 127.0.0.1 (gloo, CPU) meet at a c10d
rendezvous; the pipeline's node runs the train stage, the other `instructflow train-node`.
Rank 0 alone writes outputs; a node killed mid-run fails the stage, and the rerun resumes from
the last complete checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from serving import free_port

from instructflow import caching, workspace
from instructflow.config import TrainConfig
from instructflow.training.stage import work_key
from instructflow.training.trainer import (
    NODE_SPEC,
    ROOT,
    TrainError,
    last_complete_checkpoint,
    torchrun_command,
)
from tasks.train import train


def _cfg(**knobs) -> TrainConfig:
    return TrainConfig(
        method={"name": "lora", "r": 4},
        nnodes=2,
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        rdzv_timeout_s=120,
        per_device_batch_size=2,
        eval_steps=100,
        logging_steps=1,
        **knobs,
    )


def test_nnodes_needs_a_rendezvous_endpoint():
    with pytest.raises(ValueError, match="train.rdzv_endpoint: host:port"):
        TrainConfig(nnodes=2)
    with pytest.raises(ValueError, match="train.rdzv_endpoint"):
        TrainConfig(nnodes=2, rdzv_endpoint="node0")


def test_where_ranks_meet_is_not_in_the_cache_key(tmp_path):
    a = _cfg(max_steps=4)
    moved = a.model_copy(update={"rdzv_endpoint": "10.0.0.7:29500", "max_restarts": 3})
    assert caching.canonical(a) == caching.canonical(moved)
    assert caching.canonical(a) != caching.canonical(a.model_copy(update={"nnodes": 3}))
    cmd = torchrun_command(tmp_path / "spec.json", moved, "abc")
    assert "--nnodes=2" in cmd and "--rdzv-backend=c10d" in cmd and "--max-restarts=3" in cmd
    assert "--rdzv-endpoint=10.0.0.7:29500" in cmd and "--standalone" not in cmd
    single = torchrun_command(tmp_path / "spec.json", TrainConfig(nproc=2), "x")
    assert "--standalone" in single and "--nproc-per-node=2" in single


def _start_node(spec_path: Path, log: Path) -> subprocess.Popen:
    """The second machine: `instructflow train-node SPEC`."""
    return subprocess.Popen(
        [sys.executable, "-m", "instructflow.cli", "train-node", str(spec_path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=open(log, "w"),  # noqa: SIM115 (the process holds it)
        stderr=subprocess.STDOUT,
    )


def _power_off(proc: subprocess.Popen) -> None:
    """SIGKILL a node's whole process tree: the CLI, its torchrun agent and the agent's ranks
    (which run in sessions of their own, so killing a process group would miss them)."""
    root = psutil.Process(proc.pid)
    for p in [*root.children(recursive=True), root]:
        p.kill()
    proc.wait()


def _wait_for_spec(spec_path: Path, node0: Future, older: str | None = None) -> str:
    """The rendezvous id of the spec node 0 wrote (a new one, not `older`)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if node0.done():
            node0.result()  # raises what stopped it
            pytest.fail("node 0 finished without a second node")
        try:
            rdzv_id = json.loads(spec_path.read_text())["rdzv_id"]
            if rdzv_id != older:
                return rdzv_id
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    pytest.fail("node 0 wrote no node spec within 120 s")


@pytest.mark.slow
def test_two_nodes_train_and_rank0_alone_writes(train_inputs, tmp_path):
    tokenized, base, tok_ref = train_inputs
    cfg = _cfg(max_steps=3)
    work = workspace.work_dir("train", work_key(tokenized, base, tok_ref, cfg))
    with ThreadPoolExecutor(1) as pool:
        node0 = pool.submit(train, tokenized, base, tok_ref, cfg)
        _wait_for_spec(work / NODE_SPEC, node0)
        node1 = _start_node(work / NODE_SPEC, tmp_path / "node1.log")
        ref = node0.result(timeout=600)
        assert node1.wait(timeout=120) == 0, (tmp_path / "node1.log").read_text()[-2000:]
    info = json.loads(ref.file("train.json").read_text())
    assert info["metrics"]["world_size"] == 2 and info["metrics"]["steps"] == 3
    ranks = {r: json.loads((work / "seen" / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert [ranks[r]["wrote_outputs"] for r in (0, 1)] == [True, False]
    a, b = (set(ranks[r]["examples"]) for r in (0, 1))
    assert len(a) >= 6 and len(b) >= 6 and not a & b  # each node trained on its own shard
    assert (ref.dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_killed_node_fails_the_stage_and_the_rerun_resumes(train_inputs, tmp_path):
    tokenized, base, tok_ref = train_inputs
    steps = 16
    cfg = _cfg(max_steps=steps, save_steps=2, save_total_limit=3)
    work = workspace.work_dir("train", work_key(tokenized, base, tok_ref, cfg))
    with ThreadPoolExecutor(1) as pool:
        node0 = pool.submit(train, tokenized, base, tok_ref, cfg)
        first_id = _wait_for_spec(work / NODE_SPEC, node0)
        node1 = _start_node(work / NODE_SPEC, tmp_path / "node1.log")
        deadline = time.monotonic() + 300
        while last_complete_checkpoint(work / "checkpoints") is None:
            assert time.monotonic() < deadline and node1.poll() is None, "no checkpoint"
            time.sleep(0.05)
        _power_off(node1)
        with pytest.raises(TrainError, match="torchrun with 2 nodes x 1 processes exited"):
            node0.result(timeout=300)
    killed_at = int(last_complete_checkpoint(work / "checkpoints").name.split("-")[1])
    assert 2 <= killed_at < steps

    with ThreadPoolExecutor(1) as pool:  # both machines again: the same key, the same work dir
        node0 = pool.submit(train, tokenized, base, tok_ref, cfg)
        _wait_for_spec(work / NODE_SPEC, node0, older=first_id)
        node1 = _start_node(work / NODE_SPEC, tmp_path / "node1-again.log")
        ref = node0.result(timeout=600)
        assert node1.wait(timeout=120) == 0
    assert ref.figures["resumed_from_step"] == killed_at and ref.figures["steps"] == steps
    # The curve is whole: the killed run's steps come from the checkpoint's log history.
    logged = [s for s, _ in ref.meta["step_metrics"]["loss"]]
    assert logged == list(range(1, steps + 1))
