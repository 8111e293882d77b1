"""The nightly loop end to end, as an operator runs it with a work pool (deployments/prefect.yaml's
header, README "Operating it"): a real `prefect server start`, `prefect work-pool create`,
`prefect deploy`, `prefect worker start`, and nights triggered with `prefect deployment run`.

Night 1 registers v1 as champion; night 2 (same data) is all Cached and registers nothing;
night 3 (new rows) re-runs from download on and the gate promotes v2; night 4 (more rows and a
learning rate too small to learn anything) is killed with its worker during train, and after
the worker is restarted (reconcile first) night 5 resumes it and the gate rejects v3.
Checked through the Prefect API (flow and task run states) and the MLflow registry.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import httpx
import prefect_procs
import pytest
from prefect_procs import BIN, wait_for

from flows.stages import STAGES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MODEL = "instructflow-nightly"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
# Each training night costs ~10 s of training and evaluation on 2 cores. The judge is off, so
# the gate compares perplexity, ROUGE-L and exact match with the champion's; each night's
# test split differs (new rows), so it compares gains over the base model, and perplexity
# relative to the base moves up to 10x between these ~15-row splits (base perplexity measured
# 0.8M-8.7M): the wide tolerance rejects only what is far worse, as a model trained at
# learning rate 1e-8 is (ratio ~1, against ~1e-5 for one trained at 2e-3).
CONFIG = """\
data: {{source: {data}}}
split: {{train: 0.7, validation: 0.1, test: 0.2, seed: 0}}
tokenize: {{template: alpaca, max_length: 64}}
model: {{name_or_path: "builtin:tiny"}}
train:
  method: {{name: lora, r: 4, alpha: 8, dropout: 0.0}}
  learning_rate: {lr}
  max_steps: 30
  per_device_batch_size: 8
  save_steps: 5
  eval_steps: 1000
  logging_steps: 5
evaluate: {{max_examples: 16, max_new_tokens: 4}}
judge: {{backend: none}}
register: {{model_name: {model}, max_perplexity_increase: 100}}
tracking: {{experiment: nightly, log_system_metrics: false}}
"""


@pytest.fixture
def prefect_server(tmp_path):
    with prefect_procs.prefect_server(tmp_path) as server:
        yield server


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(") ", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return out


def _kill_worker(proc: subprocess.Popen, sig: int) -> None:
    """The worker's process group, then each flow run it started: the process worker starts
    every flow run in a session of its own, which the worker's group does not include (a
    machine or container going down takes both). The worker first, so it cannot see its runs
    die and report them."""
    runs = _children(proc.pid)
    for pgid in [proc.pid, *runs]:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def test_nightly_loop_with_a_work_pool_and_a_killed_worker(prefect_server, tmp_path):
    from instructflow import demo_data

    api, server_env = prefect_server
    home = tmp_path / "home"
    data = tmp_path / "rows.jsonl"
    config = tmp_path / "nightly.yaml"
    rows = demo_data.generate(144, seed=0)

    def publish(n: int, lr: str = "2.0e-3") -> None:
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
        config.write_text(CONFIG.format(data=data, lr=lr, model=MODEL))

    # The operator's shell: the CLI talks to this server. A worker is a machine of its own
    # (its own PREFECT_HOME) sharing the workspace; nothing the test session set up for
    # itself (its Prefect results folder, MLflow URI) reaches it.
    env = {**server_env, "INSTRUCTFLOW_HOME": str(home), "PWD": str(ROOT)}
    for key in ("PREFECT_RESULTS_LOCAL_STORAGE_PATH", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    procs: list[tuple[subprocess.Popen, Path]] = []

    def cli(*args: str) -> str:
        done = subprocess.run(
            [str(BIN / args[0]), *args[1:]], cwd=ROOT, env=env, capture_output=True,
            text=True, timeout=180,
        )  # fmt: skip
        assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
        return done.stdout + done.stderr

    def start_worker(n: int) -> subprocess.Popen:
        log = tmp_path / f"worker{n}.log"
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "instructflow"],
            cwd=ROOT,
            env={
                **env,
                "PREFECT_HOME": str(tmp_path / f"worker{n}-prefect"),
                "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick a triggered night up at once
            },
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append((proc, log))
        return proc

    def trigger() -> str:
        # `prefect deploy --all` takes no --param: each night names the test's config.
        out = cli("prefect", "deployment", "run", "finetune/nightly", "--param",
                  f"config_path={config}")  # fmt: skip
        return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

    def flow_run(run_id: str) -> dict:
        return httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()

    def night(run_id: str | None = None) -> dict:
        """Trigger a night (or wait for `run_id`) until it ends: its flow run, the end state
        of each stage's task run, and its MLflow run."""
        run_id = run_id or trigger()
        alive = [p for p in procs if p[0].poll() is None]
        fr = wait_for(
            lambda: (r := flow_run(run_id))["state"]["type"] in FINAL and r, 240, "night", alive
        )
        assert fr["state"]["type"] == "COMPLETED", (fr["state"], alive[-1][1].read_text()[-4000:])
        tasks = httpx.post(
            f"{api}/task_runs/filter",
            json={"flow_runs": {"id": {"any_": [run_id]}}},
            timeout=10,
        ).json()
        states = {t["name"].rsplit("-", 1)[0]: t["state"]["name"] for t in tasks}
        return {"id": run_id, "flow_run": fr, "stages": states, "mlflow": mlflow_run(run_id)}

    from mlflow.tracking import MlflowClient

    store = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")

    def mlflow_run(flow_run_id: str):
        exp = store.get_experiment_by_name("nightly").experiment_id
        found = store.search_runs([exp], f"tags.`instructflow.flow_run_id` = '{flow_run_id}'")
        assert len(found) == 1
        return found[0]

    def digest(run, stage: str) -> str:
        return run.data.tags[f"instructflow.digest.{stage}"]

    def versions() -> dict[int, str]:
        """Registered version -> the gate's decision."""
        found = store.search_model_versions(f"name='{MODEL}'")
        return {int(v.version): v.tags.get("instructflow.gate.decision") for v in found}

    def champion() -> int:
        return int(store.get_model_version_by_alias(MODEL, "champion").version)

    try:
        cli("prefect", "work-pool", "create", "instructflow", "--type", "process")
        cli("prefect", "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
            "--all")  # fmt: skip
        dep = httpx.get(f"{api}/deployments/name/finetune/nightly", timeout=10).json()
        assert dep["work_pool_name"] == "instructflow"
        assert dep["global_concurrency_limit"]["limit"] == 1
        assert dep["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        schedule = dep["schedules"][0]
        assert (schedule["schedule"]["cron"], schedule["active"]) == ("0 2 * * *", True)
        # The test triggers the nights itself: the cron stays off, so a run at 02:00 UTC (the
        # demo config, 800 steps) cannot land in the middle of it.
        httpx.patch(
            f"{api}/deployments/{dep['id']}/schedules/{schedule['id']}",
            json={"active": False},
            timeout=10,
        ).raise_for_status()
        worker = start_worker(1)

        publish(48)
        first = night()
        assert set(first["stages"]) >= set(STAGES)
        assert all(first["stages"][s] == "Completed" for s in STAGES), first["stages"]
        assert versions() == {1: "promoted"} and champion() == 1

        second = night()  # nothing changed
        assert all(second["stages"][s] == "Cached" for s in STAGES[:-1]), second["stages"]
        assert second["mlflow"].data.tags["instructflow.gate.decision"] == "unchanged"
        assert all(digest(second["mlflow"], s) == digest(first["mlflow"], s) for s in STAGES[:-1])
        assert versions() == {1: "promoted"} and champion() == 1

        publish(96)  # new rows
        third = night()
        assert all(third["stages"][s] == "Completed" for s in STAGES), third["stages"]
        assert all(digest(third["mlflow"], s) != digest(first["mlflow"], s) for s in STAGES[:-1])
        assert versions() == {1: "promoted", 2: "promoted"} and champion() == 2

        # Night 4: SIGKILL the worker (and its flow run) once train has saved a checkpoint.
        publish(144, lr="1.0e-8")
        before = set((home / "work" / "train").rglob("checkpoint-*"))
        killed = trigger()
        wait_for(
            lambda: set((home / "work" / "train").rglob("checkpoint-*")) - before,
            240,
            "a checkpoint of night 4",
            [procs[-1]],
            every=0.2,
        )
        _kill_worker(worker, signal.SIGKILL)
        # Nothing saw it die: Prefect still shows it Running (and it holds the deployment's
        # only concurrency slot), MLflow too; its owner record is left in the workspace.
        assert flow_run(killed)["state"]["type"] == "RUNNING"
        assert mlflow_run(killed).info.status == "RUNNING"
        assert len(list((home / "runs").glob("*.json"))) == 1

        # The restart the README gives a worker: reconcile first, which closes the killed run
        # and frees its slot, else the next night waits ~5 min for the slot's lease to expire.
        out = cli("instructflow", "runs", "--reconcile")
        assert "1 stale run(s) closed" in out, out
        start_worker(2)
        fifth = night()
        # Worker 2 has a PREFECT_HOME of its own: these hits are the workspace's cache records.
        assert all(fifth["stages"][s] == "Cached" for s in STAGES[:5]), fifth["stages"]
        assert fifth["stages"]["train"] == fifth["stages"]["evaluate"] == "Completed"
        train_dir = home / "artifacts" / "train" / digest(fifth["mlflow"], "train")
        resumed = json.loads((train_dir / "train.json").read_text())["metrics"]
        assert resumed["resumed_from_step"] >= 5  # from night 4's checkpoint
        history = httpx.get(
            f"{api}/flow_run_states/", params={"flow_run_id": fifth["id"]}, timeout=10
        ).json()
        assert "AwaitingConcurrencySlot" not in {s["name"] for s in history}
        # The gate ran for real: v3 learned nothing, so its perplexity rule fails.
        assert versions() == {1: "promoted", 2: "promoted", 3: "rejected"}
        assert champion() == 2
        reasons = fifth["mlflow"].data.tags["instructflow.gate.reasons"]
        assert re.search(r"perplexity[^;]*> \+10000", reasons), reasons

        dead = flow_run(killed)
        assert dead["state"]["type"] == "CRASHED"
        assert dead["state"]["message"] == "process killed (no exit recorded)"
        assert mlflow_run(killed).info.status == "FAILED"
        running = httpx.post(
            f"{api}/flow_runs/filter",
            json={"flow_runs": {"state": {"type": {"any_": ["RUNNING", "PENDING"]}}}},
            timeout=10,
        ).json()
        assert running == []
        assert not store.search_runs(
            [store.get_experiment_by_name("nightly").experiment_id],
            "attributes.status = 'RUNNING'",
        )
        assert not list((home / "runs").glob("*.json"))
    finally:
        for proc, _ in procs:  # idle workers by now, unless the test failed mid-night
            if proc.poll() is None:
                _kill_worker(proc, signal.SIGKILL)
