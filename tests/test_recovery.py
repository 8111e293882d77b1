"""Recovery paths of issue 34, each with the real fault: damaged checkpoint files, SIGTERM
outside training, a disk that fills at register, corrupt artifacts whose recompute gives another
digest, `gc` during a live run, secrets in a detached server's environment, the Prefect
start-up limit. Real Prefect server, real MLflow store, real signals and files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tmpfs import mounted_tmpfs

from instructflow import progress

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "INSTRUCTFLOW_PROGRESS_EVERY_S": "0.5", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run_cmd(home: Path, summary: Path, *sets: str, until: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "instructflow.cli", "--home", str(home), "run", "--plain"]
    cmd += ["--summary-json", str(summary), *(["--until", until] if until else [])]
    for item in ["data.demo_rows=20", "tracking.log_system_metrics=false", *sets]:
        cmd += ["--set", item]
    return cmd


def _paused_run(tmp_path: Path, home: Path, stage: str, pause_s: float) -> subprocess.Popen:
    """A real run held inside `stage`, its artifact written but not yet published (the
    INSTRUCTFLOW_FAULT_PAUSE_STAGE hook of instructflow.artifacts); returns once it is there."""
    marker = tmp_path / "marker"
    env = _env(
        INSTRUCTFLOW_FAULT_PAUSE_STAGE=stage,
        INSTRUCTFLOW_FAULT_MARKER=str(marker),
        INSTRUCTFLOW_FAULT_PAUSE_S=str(pause_s),
    )
    proc = subprocess.Popen(
        _run_cmd(home, tmp_path / "summary.json", until="split"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"never reached the {stage} publish point: {err[-2000:]}")
        time.sleep(0.1)
    return proc


def _prefect_states(flow_run_id: str) -> tuple[str, dict[str, str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow = client.read_flow_run(flow_run_id)
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow.id]))
        )
    return flow.state.type.value, {t.name.rsplit("-", 1)[0]: t.state.type.value for t in tasks}


def _warnings() -> tuple[list[str], object]:
    seen: list[str] = []

    def listen(event: str, payload: dict) -> None:
        if event == "warning":
            seen.append(payload["message"])

    progress.subscribe(listen)
    return seen, listen


# -- (1) a damaged newest checkpoint ----------------------------------------------------------
def test_a_damaged_newest_checkpoint_is_named_and_the_newest_that_loads_resumes(train_inputs):
    from instructflow import workspace
    from instructflow.config import TrainConfig
    from instructflow.training.stage import work_key
    from tasks.train import train

    tokenized, base, tok_ref = train_inputs
    cfg = TrainConfig(
        method={"name": "lora", "r": 4},
        max_steps=6,
        per_device_batch_size=2,
        save_steps=2,
        eval_steps=100,
        logging_steps=1,
        save_total_limit=5,
        keep_checkpoints=True,
    )
    folder = workspace.work_dir("train", work_key(tokenized, base, tok_ref, cfg)) / "checkpoints"
    train(tokenized, base, tok_ref, cfg)
    assert sorted(p.name for p in folder.iterdir()) == [f"checkpoint-{s}" for s in (2, 4, 6)]

    # Garbage over the newest adapter (before: "header too large" on every re-run).
    (folder / "checkpoint-6" / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    seen, listen = _warnings()
    try:
        ref = train(tokenized, base, tok_ref, cfg)
        assert ref.figures["resumed_from_step"] == 4 and ref.figures["steps"] == 6
        assert len(seen) == 1, seen
        assert f"checkpoint {folder / 'checkpoint-6'} is damaged" in seen[0], seen
        assert "adapter_model.safetensors" in seen[0] and "resuming from checkpoint-4" in seen[0]
        assert "\n" not in seen[0]

        # Garbage over the (new) newest optimizer state and a truncated adapter one older
        # (before: "list index out of range"): two lines, back to checkpoint-2.
        seen.clear()
        (folder / "checkpoint-6" / "optimizer.pt").write_bytes(os.urandom(8192))
        adapter = folder / "checkpoint-4" / "adapter_model.safetensors"
        adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
        ref = train(tokenized, base, tok_ref, cfg)
        assert ref.figures["resumed_from_step"] == 2 and ref.figures["steps"] == 6
        assert len(seen) == 2, seen
        assert "checkpoint-6 is damaged (optimizer.pt: not a torch checkpoint" in seen[0]
        assert "checkpoint-4 is damaged (adapter_model.safetensors: " in seen[1]
        assert "resuming from checkpoint-2" in seen[1]
    finally:
        progress.unsubscribe(listen)
    # Kept aside for inspection, out of the Trainer's checkpoint rotation.
    assert len(list(folder.glob("damaged-step-6-*"))) == 2
    assert len(list(folder.glob("damaged-step-4-*"))) == 1


# -- (2) SIGTERM outside training -------------------------------------------------------------
def test_sigterm_outside_training_ends_killed_and_crashed_with_the_stage_named(tmp_path):
    from mlflow.tracking import MlflowClient

    home = tmp_path / "home"
    proc = _paused_run(tmp_path, home, "validate", pause_s=120)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert time.monotonic() - sent < 30
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err[-3000:]
    assert lines[-1] == "error: interrupted during validate (run again: finished stages are Cached)"
    assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:], lines

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"]["download"]["state"] == "Completed"
    assert summary["stages"]["validate"]["state"] == "Interrupted"
    run = MlflowClient(f"sqlite:///{home / 'mlflow.db'}").get_run(summary["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.info.end_time  # before: FAILED
    note = run.data.tags["mlflow.note.content"]
    assert "| validate | Interrupted |" in note, note  # before: Skipped
    flow_state, task_states = _prefect_states(summary["flow_run_id"])
    assert flow_state == "CRASHED"
    assert task_states["validate"] == "CRASHED" and task_states["download"] == "COMPLETED"
    assert not list((home / "runs").glob("*.json"))  # closed, nothing for reconcile


# -- (3) a disk that fills at register --------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real 96 MB tmpfs."""
    yield from mounted_tmpfs(tmp_path / "small", 96)


def test_a_disk_full_at_register_is_one_line_and_a_failed_run(small_disk, tmp_path):
    from mlflow.tracking import MlflowClient

    home = small_disk / "home"
    sets = [
        "data.demo_rows=40",
        "train.method=lora",
        "train.max_steps=2",
        "evaluate.max_examples=2",
        "evaluate.max_new_tokens=2",
        "judge.backend=none",
        "tracking.min_free_disk_mb=0",
    ]
    first = subprocess.run(
        _run_cmd(home, tmp_path / "first.json", *sets, until="evaluate"),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    # Again to register: every stage before it Cached; the disk fills the moment evaluate is
    # done, so register (and everything after it) finds no space.
    proc = subprocess.Popen(
        _run_cmd(home, tmp_path / "full.json", *sets),
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    ballast = small_disk / "ballast"
    for line in proc.stdout:
        if line.startswith("evaluate "):
            with open(ballast, "wb") as fh:
                try:
                    while True:
                        fh.write(b"\0" * 2**20)
                except OSError:
                    pass
            break
    out, err = proc.communicate(timeout=300)
    free_mb = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize / 2**20
    ballast.unlink()
    assert proc.returncode == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    # Before: 185 lines, 5 tracebacks, Prefect's log errors after the error line.
    assert "Traceback" not in err + out, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: register failed: disk full"), lines
    assert free_mb < 1

    summary = json.loads((tmp_path / "full.json").read_text())
    assert summary["stages"]["register"]["state"] == "Failed"
    store = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    run = store.get_run(summary["mlflow_run_id"])
    if run.info.status == "RUNNING":  # its end could not be written: the next run closes it
        assert subprocess.run(
            [sys.executable, "-m", "instructflow.cli", "--home", str(home), "runs", "--reconcile"],
            cwd=ROOT, env=_env(), capture_output=True, timeout=120,
        ).returncode == 0  # fmt: skip
        run = store.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FAILED"  # before: FINISHED by MLflow's exit hook


# -- (4) corrupt artifacts: quarantined whatever the recompute gives; loaders verify ----------
def test_a_corrupt_train_artifact_is_quarantined_and_never_loaded(home, capsys):
    from flows.run import run_finetune
    from instructflow.cli import main

    sets = [
        "data.demo_rows=40",
        "tokenize.max_length=64",
        "train.method=lora",
        "train.method.r=4",
        "train.max_steps=2",
        "tracking.min_free_disk_mb=0",
        "tracking.log_system_metrics=false",
    ]
    first = run_finetune(None, sets, until="train")["stages"]["train"]["artifact_digest"]
    stage_dir = home / "artifacts" / "train"
    (stage_dir / first / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    seen, listen = _warnings()
    try:
        again = run_finetune(None, sets, until="train")["stages"]["train"]
    finally:
        progress.unsubscribe(listen)
    assert again["state"] == "Completed" and again["artifact_digest"] != first  # timings differ
    assert seen == ["train: cached artifact failed its digest check; recomputing"]
    # Before: the corrupt one stayed published beside the new one.
    assert not (stage_dir / first).exists()
    assert len(list(stage_dir.glob(f".corrupt-{first}-*"))) == 1

    # serve / generate load a train artifact dir directly: verified first.
    second = stage_dir / again["artifact_digest"]
    (second / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    capsys.readouterr()
    assert main(["--home", str(home), "serve", "--model", str(second)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {second}/adapter/adapter_model.safetensors is changed")
    assert "moved aside" in err[0]
    assert not second.exists() and list(stage_dir.glob(f".corrupt-{second.name}-*"))


# -- (5) gc during a live run -----------------------------------------------------------------
def test_gc_remove_older_than_0_spares_what_a_live_run_owns(tmp_path, monkeypatch, capsys):
    from instructflow.cli import main

    home = tmp_path / "home"
    # A killed run's temp dir from two hours ago: it goes, live run or not.
    old = home / "artifacts" / "download" / ".tmp-killed"
    old.mkdir(parents=True)
    (old / "f").write_bytes(b"x" * 10)
    two_hours_ago = time.time() - 7200
    for p in (old / "f", old):
        os.utime(p, (two_hours_ago, two_hours_ago))
    proc = _paused_run(tmp_path, home, "validate", pause_s=6)
    try:
        (live_tmp,) = (home / "artifacts" / "validate").glob(".tmp-*")
        # Not the shared per-user cache: another process may be writing there.
        monkeypatch.setenv("INSTRUCTFLOW_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("INSTRUCTFLOW_HOME", str(home))
        assert main(["--home", str(home), "gc", "--remove", "--older-than", "0"]) == 0
        out = capsys.readouterr().out
        assert f"1 run(s) of this workspace still running (pid {proc.pid})" in out, out
        assert "removed 1 leftover(s)" in out, out
        assert live_tmp.is_dir() and not old.exists()  # before: live_tmp deleted
    finally:
        _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]  # before: the run failed at its rename
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"]["validate"]["state"] == "Completed"


# -- (6) secrets and the detached Prefect server ----------------------------------------------
def _environ_of_group(pgid: int) -> list[dict[str, str]]:
    """The environment of every process in process group `pgid` (the server and its workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            raw = (stat.parent / "environ").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
        found.append({k.decode(): v.decode(errors="replace") for k, v in pairs})
    return found


def test_the_detached_prefect_server_inherits_no_secret(tmp_path, monkeypatch):
    from instructflow import prefect_server
    from instructflow.cli import key_env_names
    from instructflow.config import load_config

    cfg = load_config(None, ["judge.api_key_env=MY_JUDGE_CREDS"])
    assert key_env_names(cfg) == ("MY_JUDGE_CREDS",)
    secrets = {
        "MY_JUDGE_CREDS": "judge-value-1a2b",  # named by judge.api_key_env: no hint in its name
        "OPENAI_API_KEY": "sk-value-3c4d",
        "HF_TOKEN": "hf_value_5e6f",
        "SOME_SERVICE_SECRET": "value-7a8b",
        "DB_PASSWORD": "value-9c0d",
    }
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("INSTRUCTFLOW_TEST_PLAIN", "kept-value")
    home = tmp_path / "home"
    try:
        prefect_server.ensure(home, hide=key_env_names(cfg))
        pid = prefect_server.state(home)["pid"]
        envs = _environ_of_group(pid)
        assert envs, "the server's processes were not found"
        for env in envs:
            assert not set(secrets) & set(env), sorted(set(secrets) & set(env))
            assert env.get("INSTRUCTFLOW_TEST_PLAIN") == "kept-value"
        blob = json.dumps(envs)
        assert not [v for v in secrets.values() if v in blob]
    finally:
        prefect_server.stop(home)


# -- (7) the Prefect start-up limit ----------------------------------------------------------
def test_the_prefect_start_up_limit_is_configurable(tmp_path, monkeypatch):
    from instructflow import prefect_server
    from instructflow.prefect_server import START_TIMEOUT_ENV, ServerError, start_timeout_s

    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    assert start_timeout_s() == 600.0  # was 180 s, which a first run on a loaded machine hit
    home = tmp_path / "home"
    monkeypatch.setenv(START_TIMEOUT_ENV, "soon")
    with pytest.raises(ServerError, match=f"{START_TIMEOUT_ENV}='soon': expected a number"):
        prefect_server.ensure(home)
    monkeypatch.setenv(START_TIMEOUT_ENV, "0.5")
    t0 = time.monotonic()
    with pytest.raises(ServerError) as info:
        prefect_server.ensure(home)
    assert time.monotonic() - t0 < 20
    message = str(info.value)
    assert "did not answer within 0.5 s" in message and START_TIMEOUT_ENV in message
    started = json.loads((home / "prefect" / "server.json").read_text())
    assert not prefect_server._alive(started["pid"])  # stopped, not left behind
