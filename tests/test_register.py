"""register: the pyfunc reloads exactly from the registry, aliases and the promotion gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from instructflow.artifacts import ArtifactRef, write_artifact
from instructflow.config import ModelConfig, RegisterConfig

NAME = "reg-test"


@pytest.fixture
def local_base(home, tmp_path) -> tuple[ArtifactRef, ArtifactRef]:
    """A base model in a local folder (kind=local: the registry must reference, not copy it)."""
    from instructflow.builtin.model import build_model, build_tokenizer
    from tasks.base_model import prepare_base_model, prepare_tokenizer

    folder = tmp_path / "my-base"
    tok = build_tokenizer()
    tok.save_pretrained(str(folder))
    build_model(tok).save_pretrained(str(folder), safe_serialization=True)
    cfg = ModelConfig(name_or_path=str(folder))
    tok_ref = prepare_tokenizer(cfg)
    return tok_ref, prepare_base_model(cfg, tok_ref)


def make_train(base: ArtifactRef, tok_ref: ArtifactRef, seed: int) -> tuple[ArtifactRef, object]:
    """A train artifact (contract layout) holding a tiny random LoRA adapter, and the model."""
    from peft import LoraConfig, get_peft_model

    from instructflow.loading import load_base_model, model_info

    torch.manual_seed(seed)
    # init_lora_weights=False: B is random too, so the adapter really changes the logits.
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(load_base_model(base, dtype=torch.float32), lora).eval()

    def write(tmp: Path):
        model.save_pretrained(str(tmp / "adapter"))
        shutil.copytree(tok_ref.dir, tmp / "tokenizer", ignore=shutil.ignore_patterns("MANI*"))
        info = {"method": "lora", "base_model": model_info(base), "template": "alpaca"}
        (tmp / "train.json").write_text(json.dumps(info))
        return {}

    return write_artifact("train", write), model


def make_report(**metrics) -> ArtifactRef:
    def write(tmp: Path):
        judge = {"win_rate": metrics.pop("win_rate")} if "win_rate" in metrics else {}
        (tmp / "report.json").write_text(json.dumps({"metrics": metrics, "judge": judge}))

    return write_artifact("evaluate", write)


def logits(model, tokenizer, text="### Instruction:\nreverse abc\n\n### Response:\n"):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def test_registered_model_reloads_exactly_and_first_version_is_champion(home, local_base, capsys):
    from mlflow.tracking import MlflowClient

    import mlflow
    from instructflow import model_specs, registry
    from tasks.register import register

    tok_ref, base = local_base
    train, trained = make_train(base, tok_ref, seed=1)
    report = make_report(perplexity=5.0, perplexity_base=9.0, rougeL=0.4, rougeL_base=0.1)
    ref = register(train, report, base, RegisterConfig(model_name=NAME))
    decision = json.loads(ref.file("decision.json").read_text())
    assert decision["promoted"] is True and decision["version"] == 1
    assert "the first version becomes champion" in decision["reasons"][0]

    client = MlflowClient()
    champ = client.get_model_version_by_alias(NAME, "champion")
    assert champ.version == 1
    assert client.get_model_version_by_alias(NAME, "challenger").version == 1
    assert champ.tags["instructflow.gate.decision"] == "promoted"
    assert "my-base" in champ.description  # the model card names the base model
    run = client.get_run(champ.run_id)
    assert run.data.tags["instructflow.gate.decision"] == "promoted"

    model, tok, template = model_specs.load_for_inference(f"models:/{NAME}@champion")
    assert template == "alpaca"
    assert torch.allclose(logits(model, tok), logits(trained, tok), atol=1e-5)
    # Reference, not copy: the logged model holds the adapter but no base weights.
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion"))
    weights = sorted(p.name for p in local.rglob("*.safetensors"))
    assert weights == ["adapter_model.safetensors"], weights
    assert json.loads(next(local.rglob("base/model.json")).read_text())["kind"] == "local"
    # MLflow's own loader answers through the signature's columns.
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = pyfunc.predict([{"instruction": "reverse abc"}], params={"max_new_tokens": 4})
    assert len(out) == 1 and isinstance(out[0], str)
    # The CLI answers from the registry exactly as the trained model does (greedy decoding).
    from instructflow.cli import main

    capsys.readouterr()
    args = ["generate", "--model", f"models:/{NAME}@champion", "reverse abc"]
    assert main([*args, "--max-new-tokens", "6"]) == 0
    expected = registry.generate(trained, tok, "alpaca", "reverse abc", max_new_tokens=6)
    assert capsys.readouterr().out.strip() == expected
    assert main(["generate", "--model", f"models:/{NAME}@nope", "x"]) == 1
    assert "cannot load from MLflow" in capsys.readouterr().err


def test_gate_rejects_regression_and_promotes_improvement(home):
    from mlflow.tracking import MlflowClient

    from instructflow import model_specs
    from tasks.base_model import prepare_base_model, prepare_tokenizer
    from tasks.register import register

    cfg = RegisterConfig(model_name=NAME)
    tok_ref = prepare_tokenizer(ModelConfig())
    base = prepare_base_model(ModelConfig(), tok_ref)  # builtin: weights ship with the model
    train, trained = make_train(base, tok_ref, seed=2)
    good = dict(perplexity=5.0, perplexity_base=9.0, rougeL=0.40, rougeL_base=0.1, win_rate=0.7)
    register(train, make_report(**good), base, cfg)

    worse = {**good, "rougeL": 0.30}
    second = json.loads(
        register(train, make_report(**worse), base, cfg).file("decision.json").read_text()
    )
    assert second["promoted"] is False and second["champion_before"] == 1
    assert any("ROUGE-L" in r and "> 0.02" in r for r in second["reasons"])
    client = MlflowClient()
    assert client.get_model_version_by_alias(NAME, "champion").version == 1
    assert client.get_model_version_by_alias(NAME, "challenger").version == 2
    assert client.get_model_version(NAME, 2).tags["instructflow.gate.decision"] == "rejected"

    # A re-run from the same artifacts (an unchanged nightly run) adds no version.
    again = json.loads(
        register(train, make_report(**worse), base, cfg).file("decision.json").read_text()
    )
    assert again["unchanged"] is True and again["version"] == 2 and again["alias"] is None
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2
    assert client.get_model_version_by_alias(NAME, "champion").version == 1

    better = {**good, "perplexity": 5.1, "rougeL": 0.41}  # +2% perplexity is within 5%
    third = json.loads(
        register(train, make_report(**better), base, cfg).file("decision.json").read_text()
    )
    assert third["promoted"] is True, third["reasons"]
    assert client.get_model_version_by_alias(NAME, "champion").version == 3

    model, tok, _ = model_specs.load_for_inference(f"models:/{NAME}@champion")
    assert torch.allclose(logits(model, tok), logits(trained, tok), atol=1e-5)


def test_gate_rules():
    from instructflow.gate import gate
    from instructflow.win_rate import wilson

    cfg = RegisterConfig(min_win_rate=0.5, max_rougeL_drop=0.02, max_perplexity_increase=0.05)
    champ = {"perplexity": 10.0, "perplexity_base": 20.0, "rougeL": 0.5, "rougeL_base": 0.2}
    trusted = {"usable": True, "status": "judge trusted", "pairwise_opponent": "base"}

    def judged(wins: int, ties: int, losses: int) -> dict:
        return {**champ, "wins": wins, "ties": ties, "losses": losses}

    # The decisive win rate's Wilson interval decides: 12/16 has its lower bound at 0.505.
    ok, reasons = gate(judged(12, 3, 4), champ, cfg, judge=trusted)
    assert ok and any("decisive 0.750" in r and "lower bound > 0.5" in r for r in reasons)
    ok, reasons = gate(judged(10, 0, 6), champ, cfg, judge=trusted)
    assert not ok and any("lower bound <= 0.5" in r and "vs the base model" in r for r in reasons)
    # A tie is not a win: all ties fail, and so does one win among many ties (ties counted
    # as half a win gave 0.5 [0.5, 0.5] and 0.505 [0.5, 0.52] here, and both passed).
    ok, reasons = gate(judged(0, 106, 0), champ, cfg, judge=trusted)
    tie_reason = "0 wins, 106 ties, 0 losses; a tie is not a win"
    assert not ok and any(tie_reason in r for r in reasons)
    assert not gate(judged(1, 105, 0), champ, cfg, judge=trusted)[0]
    assert not gate(judged(0, 16, 0), None, cfg, judge={**trusted, "pairwise_opponent": "base"})[0]
    # The threshold is strict: a lower bound exactly at it fails.
    at_bound = RegisterConfig(min_win_rate=wilson(12, 16)[0])
    assert not gate(judged(12, 0, 4), champ, at_bound, judge=trusted)[0]
    # An untrusted judge (or one that failed too often) is not used, and the reasons say why.
    untrusted = {"usable": False, "status": "judge untrusted: calibration accuracy 0.40: ..."}
    ok, reasons = gate(judged(0, 1, 20), champ, cfg, judge=untrusted)
    assert ok and any(
        "untrusted: calibration accuracy 0.40" in r and "skipped" in r for r in reasons
    )
    # No champion yet: the judge's opponent is the base model, and the reasons say so.
    vs_base = {**trusted, "pairwise_opponent": "base"}
    ok, reasons = gate(judged(9, 0, 7), None, cfg, judge=vs_base)
    assert not ok and any("vs the base model" in r for r in reasons)
    assert gate(judged(15, 0, 1), None, cfg, judge=vs_base)[0]

    ok, _ = gate({**champ, "perplexity": 10.6}, champ, cfg)
    assert not ok  # +6% > +5%
    ok, reasons = gate(dict(champ), champ, cfg)
    assert ok and any("no pairwise judge" in r for r in reasons)
    # Different test splits: compare each model's gain over its base, not raw values.
    new = {"perplexity": 30.0, "perplexity_base": 60.0, "rougeL": 0.3, "rougeL_base": 0.0}
    ok, reasons = gate(new, champ, cfg, same_split=False)
    assert ok and all("splits differ" in r for r in reasons if "skipped" not in r)
    assert not gate(new, champ, cfg, same_split=True)[0]


def test_gate_uses_the_length_controlled_figure_when_the_two_disagree():
    from test_win_rate import simulate

    from instructflow import win_rate
    from instructflow.gate import win_rate_rule

    cfg = RegisterConfig(min_win_rate=0.5)

    def rule(outcomes, cand, base, lc_min=80):
        m, lc = win_rate.pairwise_figures(
            outcomes, cand, base, samples=400, seed=0, lc_min_comparisons=lc_min
        )
        judge = {"usable": True, "pairwise_opponent": "base", "length_note": lc.note}
        return m, win_rate_rule(m, cfg, judge)

    # A judge that mostly rewards length: raw 0.7+ with a tight interval, equal quality at
    # equal length. The intervals do not overlap: the length-controlled one decides.
    m, (ok, reason) = rule(*simulate(400, 0.5, 2.5))
    assert m["decisive_win_rate_low"] > 0.5 and m["win_rate_lc_high"] < m["decisive_win_rate_low"]
    assert not ok and "disagree beyond their intervals" in reason
    assert f"length-controlled {m['win_rate_lc']:.3f}" in reason and "(used:" in reason
    # Without a length bias they agree and the raw figure decides.
    m, (ok, reason) = rule(*simulate(400, 0.7, 0.0))
    assert ok and "disagree" not in reason and reason.count("length-controlled") == 1
    # Too few comparisons: the length-controlled figure is shown as not evidence, raw decides.
    m, (ok, reason) = rule(*simulate(400, 0.5, 2.5), lc_min=1000)
    assert ok and "is not evidence: 400 decisive comparisons < judge.lc_min_comparisons" in reason


def test_all_ties_from_a_trusted_judge_make_no_champion(home):
    """The audit's case end to end: a calibrated judge that ties every comparison, then the
    register stage on a real MLflow store: no champion. A judge that sees the candidate win
    everywhere then promotes the next version."""
    from judge_stub import FakeJudge
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from instructflow import judge
    from instructflow.config import JudgeConfig
    from tasks.base_model import prepare_base_model, prepare_tokenizer
    from tasks.register import register

    items = [judge.Item(f"Name item {i}.", "", f"item {i} answer") for i in range(12)]
    refs = [it.reference for it in items]
    tok_ref = prepare_tokenizer(ModelConfig())
    base = prepare_base_model(ModelConfig(), tok_ref)
    train, _ = make_train(base, tok_ref, seed=3)
    cfg = RegisterConfig(model_name=NAME)
    with FakeJudge("oracle") as endpoint:
        judge_cfg = JudgeConfig(backend="openai", base_url=endpoint.url, model="oracle")
        # Neither answer is the reference: the oracle ties every pair, in both orders.
        tied = judge.run_judge(judge_cfg, items, ["I think so."] * 12, ["Maybe."] * 12)
        better = judge.run_judge(judge_cfg, items, refs, ["Maybe."] * 12)
    assert tied.usable and (tied.metrics["ties"], tied.metrics["win_rate"]) == (12, 0.5)
    assert tied.metrics["win_rate_low"] == 0.5  # what promoted it before: 0.5 >= 0.5

    first = json.loads(
        register(train, judged_report(tied), base, cfg).file("decision.json").read_text()
    )
    assert first["promoted"] is False and first["champion_before"] is None
    assert any("a tie is not a win" in r for r in first["reasons"])
    client = MlflowClient()
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(NAME, "champion")

    second = json.loads(
        register(train, judged_report(better), base, cfg).file("decision.json").read_text()
    )
    assert second["promoted"] is True and second["version"] == 2, second["reasons"]
    assert any("12 wins, 0 ties, 0 losses" in r for r in second["reasons"])
    assert client.get_model_version_by_alias(NAME, "champion").version == 2


def judged_report(res) -> ArtifactRef:
    """An evaluate report holding a judge result, as tasks/evaluate.py writes its sections."""
    judge = {
        "usable": res.usable,
        "status": res.status,
        "length_note": res.length_note,
        "pairwise_opponent": "base",
    }

    def write(tmp: Path):
        (tmp / "report.json").write_text(json.dumps({"metrics": res.metrics, "judge": judge}))

    return write_artifact("evaluate", write)


def test_a_registered_copy_is_checked_for_what_it_holds_and_refused_when_damaged(home, local_base):
    """The registry holds part of a train artifact (adapter, tokenizer, train.json) with the
    artifact's manifest: what it leaves out (a loss curve) is expected, a changed adapter
    file is refused in one line naming it."""
    from mlflow.tracking import MlflowClient

    from instructflow import loading, model_specs
    from tasks.register import register

    tok_ref, base = local_base
    _, trained = make_train(base, tok_ref, seed=4)

    def write(tmp: Path):  # a train artifact with files the registry does not copy
        trained.save_pretrained(str(tmp / "adapter"))
        shutil.copytree(tok_ref.dir, tmp / "tokenizer", ignore=shutil.ignore_patterns("MANI*"))
        info = {"method": "lora", "base_model": loading.model_info(base), "template": "alpaca"}
        (tmp / "train.json").write_text(json.dumps(info))
        (tmp / "loss_curve.png").write_bytes(b"not copied")
        (tmp / "checkpoints").mkdir()
        (tmp / "checkpoints" / "state.json").write_text("{}")

    train = write_artifact("train", write)
    report = make_report(perplexity=5.0, perplexity_base=9.0, rougeL=0.4, rougeL_base=0.1)
    register(train, report, base, RegisterConfig(model_name=NAME))
    model, tok, _ = model_specs.load_for_inference(f"models:/{NAME}@champion")
    assert torch.allclose(logits(model, tok), logits(trained, tok), atol=1e-5)

    version = MlflowClient().get_model_version_by_alias(NAME, "champion")
    stored = next(
        p
        for p in (home / "mlartifacts").rglob("adapter_model.safetensors")
        if version.source.split("/")[-1] in str(p)
    )
    stored.write_bytes(stored.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(loading.LoadError) as err:
        model_specs.load_for_inference(f"models:/{NAME}@champion")
    line = str(err.value)
    assert "\n" not in line and "adapter_model.safetensors is changed" in line, line
