"""Several data sources mixed by weight: the counts (hand-computed), seeded draws, repeats
kept out of evaluation, and the real flow on two shared datasets (per-source stages, MLflow
breakdown, a weight change re-running only the mix and what follows)."""

from __future__ import annotations

import json

import pytest
import yaml

from instructflow import workspace
from instructflow.config import ConfigError, MixConfig, ValidateConfig, load_config
from tasks.download import download
from tasks.mix import MixError, draw, mix, plan_counts
from tasks.split import split_rows
from tasks.validate import validate


def test_counts_follow_the_weights_and_the_scarcest_source_bounds_the_total():
    # No weights: every row of every source.
    assert plan_counts({"a": 70, "b": 30}, {"a": None, "b": None}, None) == {"a": 70, "b": 30}
    # 3:1 over 100 + 100 rows: b could give 400 at its share, a only 133.33 -> total 133;
    # exact 99.75 / 33.25 -> floors 99 / 33, the one left goes to the larger remainder (a).
    assert plan_counts({"a": 100, "b": 100}, {"a": 3, "b": 1}, None) == {"a": 100, "b": 33}
    # A fixed total, split 1:1:1 of 10 -> 3.33 each: the remainder goes to the first.
    assert plan_counts({"a": 9, "b": 9, "c": 9}, {"a": 1, "b": 1, "c": 1}, 10) == {
        "a": 4,
        "b": 3,
        "c": 3,
    }
    # 300 / (300 / 1000) must not lose a row to floating point.
    assert plan_counts({"a": 700, "b": 300}, {"a": 0.7, "b": 0.3}, None) == {"a": 700, "b": 300}


def _rows(n: int, source: str = "s"):
    return [{"id": f"{source}:{i}", "group": f"g{i}", "source": source} for i in range(n)]


def test_draws_are_seeded_samples_and_repeats_only_when_allowed():
    import random

    rows = _rows(10)
    first = draw(rows, 4, random.Random("0:s"), False, "s")
    assert first == draw(rows, 4, random.Random("0:s"), False, "s")
    assert first != draw(rows, 4, random.Random("1:s"), False, "s")
    assert [r["id"] for r in first] == sorted((r["id"] for r in first), key=lambda x: int(x[2:]))
    with pytest.raises(MixError, match=r"data.sources\[s\]: the mix asks for 13 rows, it has 10"):
        draw(rows, 13, random.Random(0), False, "s")
    more = draw(rows, 13, random.Random(0), True, "s")
    assert more[:10] == rows and len({r["id"] for r in more}) == 13
    repeats = more[10:]
    assert all(
        r["repeat_of"] and r["group"] == rows[int(r["repeat_of"][2:])]["group"] for r in repeats
    )
    # A repeat is a copy: split keeps it in train, never in validation or test.
    parts, _ = split_rows(more, load_config(None, ["split.decontaminate=false"]).split)
    held_out = parts["validation"] + parts["test"]
    assert held_out and not any(r.get("repeat_of") for r in held_out)


def _validated(shared_datasets, tmp_path):
    alpaca = shared_datasets / "llamafactory_demo" / "alpaca_en_demo.json"
    scratch = shared_datasets / "llms_from_scratch_ch07" / "instruction-data.json"
    out = {}
    for name, path in (("alpaca", alpaca), ("scratch", scratch)):
        out[name] = validate(
            download(load_config(None).data.spec().model_copy(update={"source": str(path)}),
                     f"download/{name}"),
            ValidateConfig(),
            f"validate/{name}",
        )  # fmt: skip
    return out


def test_mixing_two_shared_datasets(home, shared_datasets, tmp_path):
    validated = _validated(shared_datasets, tmp_path)
    available = {
        n: sum(1 for _ in open(ref.file("clean.jsonl"), encoding="utf-8"))
        for n, ref in validated.items()
    }
    plan = [
        {"name": "alpaca", "weight": 3.0, "max_rows": None},
        {"name": "scratch", "weight": 1.0, "max_rows": 200},
    ]
    ref = mix(validated, plan, MixConfig(seed=0))
    report = json.loads(ref.file("report.json").read_text())
    # scratch is capped at 200 and is the scarcer one: 200 / 0.25 = 800 rows in all.
    assert report["sources"]["scratch"]["available_rows"] == 200
    assert report["sources"]["alpaca"]["validated_rows"] == available["alpaca"]
    assert report["rows"] == 800
    assert (report["sources"]["alpaca"]["rows"], report["sources"]["scratch"]["rows"]) == (600, 200)
    rows = [json.loads(line) for line in open(ref.file("clean.jsonl"), encoding="utf-8")]
    assert len(rows) == 800 and len({r["id"] for r in rows}) == 800
    assert {r["source"] for r in rows} == {"alpaca", "scratch"}
    assert all(r["id"].startswith(f"{r['source']}:") for r in rows)
    assert ref.meta["metrics"]["alpaca.share"] == pytest.approx(0.75)

    # Another weight for scratch, with alpaca's count unchanged: alpaca's rows are the same.
    plan2 = [{**plan[0]}, {**plan[1], "weight": 0.5}]  # 6:1 of 700: 600 and 100
    again = mix(validated, plan2, MixConfig(seed=0, total_rows=700))
    rows2 = [json.loads(line) for line in open(again.file("clean.jsonl"), encoding="utf-8")]
    a1 = [r["id"] for r in rows if r["source"] == "alpaca"]
    a2 = [r["id"] for r in rows2 if r["source"] == "alpaca"]
    assert len(a2) == 600 and a2 == a1
    # A total the capped source cannot give is refused in one line, naming it.
    with pytest.raises(MixError, match=r"data.sources\[scratch\]: the mix asks for 300 rows"):
        mix(validated, plan, MixConfig(total_rows=1200))


def test_config_names_sources_once(tmp_path):
    path = tmp_path / "mix.yaml"
    two = [{"name": "a", "source": "a.json"}, {"name": "a", "source": "b.json"}]
    path.write_text(yaml.safe_dump({"data": {"sources": two}}))
    with pytest.raises(ConfigError, match="names must be unique"):
        load_config(str(path))
    mixed = [{"name": "a", "source": "a.json", "weight": 1}, {"name": "b", "source": "b.json"}]
    path.write_text(yaml.safe_dump({"data": {"sources": mixed}}))
    with pytest.raises(ConfigError, match="give every source a weight, or none"):
        load_config(str(path))
    mixed[1]["weight"] = 2
    path.write_text(yaml.safe_dump({"data": {"sources": mixed}}))
    cfg = load_config(str(path), ["data.sources.1.weight=5"])
    assert cfg.data.sources[1].weight == 5
    with pytest.raises(ConfigError, match="not both"):
        load_config(str(path), ["data.source=c.json"])


def _mix_config(path, shared, weight_b: float, llm_url: str) -> str:
    sources = [
        {
            "name": "alpaca",
            "source": str(shared / "llamafactory_demo" / "alpaca_en_demo.json"),
            "weight": 1.0,
            "max_rows": 60,
        },
        {
            "name": "scratch",
            "source": str(shared / "llms_from_scratch_ch07" / "instruction-data.json"),
            "format": "alpaca",
            "weight": weight_b,
            "max_rows": 60,
        },
    ]
    synthesize = {
        "enabled": True,
        "methods": ["back_translation", "self_instruct"],
        "fraction": 0.1,
        "max_rows": 4,
        "llm": {"base_url": llm_url, "model": "scripted", "max_retries": 0},
    }
    path.write_text(yaml.safe_dump({"data": {"sources": sources}, "synthesize": synthesize}))
    return str(path)


FAST = [
    "split.stratify_by=source",
    "split.train=0.7",
    "split.validation=0.1",
    "split.test=0.2",
    "tokenize.max_length=256",
    "train.max_steps=2",
    "train.per_device_batch_size=8",
    "evaluate.max_new_tokens=4",
    "evaluate.max_examples=16",
    "evaluate.compare_base=false",
    "judge.backend=none",
    "tracking.log_system_metrics=false",
]


@pytest.fixture
def llm_stub():
    from llm_stub import LLMStub

    server = LLMStub()
    yield server
    server.close()


@pytest.mark.slow
def test_two_sources_and_made_rows_in_the_flow_and_a_weight_change_reruns_only_the_mix_onwards(
    home, shared_datasets, tmp_path, llm_stub
):
    """The issue's acceptance run: two shared datasets mixed by weight, plus back-translation
    and self-instruct against a local OpenAI-compatible endpoint, through evaluate."""
    from mlflow.tracking import MlflowClient

    from flows.run import run_finetune

    config = _mix_config(tmp_path / "mix.yaml", shared_datasets, 1.0, llm_stub.url)
    first = run_finetune(config, [*FAST, "split.seed=3"], "evaluate")
    states = {k: v["state"] for k, v in first["stages"].items()}
    per_source = ("download/alpaca", "validate/alpaca", "download/scratch", "validate/scratch")
    assert list(states)[:7] == [*per_source, "mix", "augment", "synthesize"]
    assert all(states[s] == "Completed" for s in (*per_source, "mix", "synthesize", "evaluate"))

    run = MlflowClient().get_run(first["mlflow_run_id"])
    m = run.data.metrics
    assert m["mix/alpaca/rows"] == m["mix/scratch/rows"] == 60
    assert m["mix/alpaca/share"] == 0.5
    assert "evaluate/source/em/alpaca" in m and "evaluate/source/rougeL/scratch" in m
    # Counts (figures: the summary, and <stage>/figures.json in MLflow) per source.
    f = first["metrics"]
    assert f["validate/alpaca/rows_out"] >= 60 and f["validate/scratch/rows_out"] >= 60
    assert f["split/alpaca/rows_train"] + f["split/scratch/rows_train"] == f["split/rows_train"]
    assert f["split/alpaca/rows_test"] > 0 and f["split/scratch/rows_test"] > 0
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert {"alpaca", "scratch", "train", "test"} <= set(inputs)
    # The synthesis counts: 12 parents (10 % of 120) capped at 4; self_instruct up to 4 kept.
    assert m["synthesize/back_translation/made"] == 4
    assert m["synthesize/self_instruct/kept"] >= 1 and m["synthesize/self_instruct/made"] >= 1
    assert f["synthesize/requests_sent"] == len(llm_stub.requests) > 0
    split_dir = workspace.artifacts_dir() / "split" / first["stages"]["split"]["artifact_digest"]
    for name, made_allowed in (("train", True), ("validation", False), ("test", False)):
        rows = [json.loads(x) for x in open(split_dir / f"{name}.jsonl", encoding="utf-8")]
        made = [r for r in rows if "synthesis" in (r.get("meta") or {})]
        assert bool(made) == made_allowed, name

    # Half the weight for scratch: 60 alpaca + 30 scratch. Only the mix and after re-run.
    config = _mix_config(tmp_path / "mix.yaml", shared_datasets, 0.5, llm_stub.url)
    second = run_finetune(config, [*FAST, "split.seed=3"], "split")
    states = {k: v["state"] for k, v in second["stages"].items()}
    assert {states[s] for s in per_source} == {"Cached"}
    assert states["mix"] == states["augment"] == states["synthesize"] == "Completed"
    assert states["split"] == "Completed"
    m2 = MlflowClient().get_run(second["mlflow_run_id"]).data.metrics
    assert (m2["mix/alpaca/rows"], m2["mix/scratch/rows"]) == (60, 30)
