"""Config, artifacts and the cross-run cache on the real Prefect engine and MLflow store."""

from __future__ import annotations

import json

import pytest

from instructflow.artifacts import ArtifactError, verify, write_artifact
from instructflow.config import ConfigError, load_config


def test_config_rejects_unknown_key_with_its_path(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("split:\n  seeed: 3\n")
    with pytest.raises(ConfigError, match=r"split\.seeed: unknown key"):
        load_config(cfg)


def test_config_rejects_bad_value_and_applies_overrides(tmp_path):
    with pytest.raises(ConfigError, match=r"tokenize\.max_length"):
        load_config(None, ["tokenize.max_length=-3"])
    cfg = load_config(None, ["split.seed=7", "train.method=lora", "judge.backend=none"])
    assert cfg.split.seed == 7 and cfg.train.method == "lora"
    with pytest.raises(ConfigError, match="must be 1.0"):
        load_config(None, ["split.train=0.5"])


def test_artifact_is_content_addressed_and_verified(home):
    def write(tmp):
        (tmp / "a.txt").write_text("hello")
        return {"metrics": {"n": 1}}

    ref = write_artifact("demo", write)
    again = write_artifact("demo", write)
    assert ref.digest == again.digest and ref.path == again.path
    assert verify(ref) is ref
    (ref.dir / "a.txt").write_text("tampered")
    with pytest.raises(ArtifactError, match="digest check"):
        verify(ref)


def test_killed_writer_leaves_nothing_trusted(home):
    def write(tmp):
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise KeyboardInterrupt  # as if killed mid-write

    with pytest.raises(KeyboardInterrupt):
        write_artifact("demo", write)
    stage_dir = home / "artifacts" / "demo"
    assert [p.name for p in stage_dir.iterdir()] == []


def test_download_is_cached_across_flow_runs_and_recomputed_when_corrupt(home, tmp_path):
    from instructflow.pipeline import run_finetune

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    overrides = [f"data.source={data}"]
    first = run_finetune(None, overrides, until="download")
    second = run_finetune(None, overrides, until="download")
    assert first["stages"]["download"]["state"] == "Completed"
    assert second["stages"]["download"]["state"] == "Cached"
    assert (
        first["stages"]["download"]["artifact_digest"]
        == second["stages"]["download"]["artifact_digest"]
    )
    # Corrupt the cached artifact: the next run must not trust it.
    digest = second["stages"]["download"]["artifact_digest"]
    (home / "artifacts" / "download" / digest / "data" / "d.jsonl").write_text("garbage")
    third = run_finetune(None, overrides, until="download")
    assert third["stages"]["download"]["state"] == "Completed"
    assert third["stages"]["download"]["artifact_digest"] == digest
    # Editing the data file changes the key.
    data.write_text(json.dumps({"instruction": "a", "input": "", "output": "c"}) + "\n")
    fourth = run_finetune(None, overrides, until="download")
    assert fourth["stages"]["download"]["state"] == "Completed"
    assert fourth["stages"]["download"]["artifact_digest"] != digest


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)
