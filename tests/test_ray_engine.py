"""`engine: ray` on a real two-node Ray cluster on 127.0.0.1 (`ray start --head` plus a worker
node): tokenize's batches run as Ray tasks on both nodes and the artifact is byte-identical to
the local engine's."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from serving import free_port
from test_tokenize import demo_split

from instructflow.config import ModelConfig, PipelineConfig, RayConfig, TokenizeConfig
from tasks.base_model import prepare_tokenizer
from tasks.tokenize import tokenize

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_cluster():
    """The address of a head node and one worker node, each with one CPU. Token auth with a
    fresh token that the nodes and this driver share (nothing read from ~/.ray)."""
    port = free_port()
    # Ray's socket paths must stay short: not under pytest's deep tmp dirs.
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    head = [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false"]
    worker = [RAY, "start", f"--address=127.0.0.1:{port}"]
    try:
        for cmd in ([*head, *common, f"--temp-dir={temp}"], [*worker, *common]):
            done = subprocess.run(cmd, env=env, timeout=120, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.fail(f"{' '.join(cmd[1:3])} failed: {done.stderr[-1500:]}")
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], env=env, timeout=120, capture_output=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_ray_engine_writes_the_local_engines_artifact(home, ray_cluster):
    splits, tokenizer = demo_split(300), prepare_tokenizer(ModelConfig())
    cfg = TokenizeConfig(template="chatml", max_length=64, batch_rows=23)  # ~10 train batches
    on_ray = tokenize(splits, tokenizer, cfg, ray=RayConfig(address=ray_cluster))
    assert on_ray.meta["params"]["engine"] == "ray"
    assert on_ray.meta["params"]["ray_nodes"] == 2  # tasks ran on both nodes
    local = tokenize(splits, tokenizer, cfg)
    assert local.digest == on_ray.digest and local.path == on_ray.path
    # The batch cut is part of the output's definition (and of the key), the engine is not.
    whole = tokenize(splits, tokenizer, cfg.model_copy(update={"batch_rows": 100_000}))
    assert whole.file("report.json").read_text() == local.file("report.json").read_text()


def test_validate_on_ray_writes_the_local_artifact_from_real_rows(home, ray_cluster, tmp_path,
                                                                 shared_datasets):  # fmt: skip
    from instructflow.config import DataConfig, ValidateConfig
    from tasks.download import download
    from tasks.validate import validate

    rows = json.loads((shared_datasets / "stanford_alpaca_subsets/random_9k.json").read_text())
    bad = [{"instruction": "", "output": "x"}, {"instruction": 3}, {"output": "no instruction"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows[:2000] + bad + rows[:50]))
    raw = download(DataConfig(source=str(tmp_path / "alpaca.json")))
    on_ray = validate(raw, ValidateConfig(), ray=RayConfig(address=ray_cluster, batch_rows=300))
    assert on_ray.meta["figures"]["rejected"] >= 53  # the bad rows and the 50 repeats
    assert validate(raw, ValidateConfig()).digest == on_ray.digest


def test_a_worker_with_other_code_fails_in_one_line(ray_cluster):
    import ray

    from instructflow import ray_engine
    from tasks.tokenize import encode_rows

    ray_engine.connect(RayConfig(address=ray_cluster))
    task = ray.remote(ray_engine._run)
    with pytest.raises(ray.exceptions.RayTaskError) as failed:
        ray.get(task.remote(encode_rows, "0" * 64, [], ()))
    cause = failed.value.as_instanceof_cause()
    assert isinstance(cause, ray_engine.RayEngineError)
    assert "runs other instructflow code than the driver" in str(cause)


def test_engine_is_a_pipeline_knob_outside_every_stage_key():
    cfg = PipelineConfig.model_validate({"engine": "ray", "ray": {"address": "auto"}})
    assert cfg.ray_engine() == RayConfig(address="auto")
    assert PipelineConfig().ray_engine() is None
