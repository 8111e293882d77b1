"""Model-made rows: paraphrase, back-translation, evol-instruct and self-instruct against a
scripted OpenAI-compatible endpoint on 127.0.0.1 (tests/llm_stub.py: the expected rows are
known), the novelty filter against hand-computed ROUGE-L, provenance, made rows never in
validation/test, the reply cache, an endpoint that dies mid-way and the call cap (the next run
continues from the cached replies), and `instructflow serve` with the built-in model."""

from __future__ import annotations

import json
import re

import pytest
from llm_stub import LLMStub

from instructflow.config import (
    AugmentConfig,
    DataConfig,
    LLMConfig,
    SplitConfig,
    SynthesizeConfig,
    ValidateConfig,
)
from instructflow.metrics import rouge_l
from tasks.augment import augment
from tasks.download import download
from tasks.split import split_rows
from tasks.synthesize import Maker, SynthesisError, synthesize
from tasks.validate import validate

TASKS = [
    ("Give three tips for staying healthy.", "Eat well, sleep, move."),
    ("Name the largest planet.", "Jupiter."),
    ("Translate good morning into Spanish.", "Buenos días."),
    ("Summarise the plot of Hamlet.", "A prince avenges his father."),
    ("Keep this SAME sentence exactly.", "Keep this SAME sentence exactly."),
    ("Describe a WILD animal briefly.", "A wolf hunts in packs."),
    ("List two primary colours.", "Red and blue."),
    ("Explain why the sky is blue.", "Rayleigh scattering."),
    ("Suggest a name for a cat.", "Miso."),
    ("Write a slogan for a bakery.", "Fresh every morning."),
]


@pytest.fixture
def rows_ref(home, tmp_path):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([{"instruction": i, "input": "", "output": o} for i, o in TASKS]))
    clean = validate(download(DataConfig(source=str(path))), ValidateConfig())
    return augment(clean, AugmentConfig(enabled=False))


@pytest.fixture
def stub():
    server = LLMStub()
    yield server
    server.close()


def _cfg(url: str, **knobs) -> SynthesizeConfig:
    llm = LLMConfig(base_url=url, model="scripted", max_concurrency=2, max_retries=0)
    return SynthesizeConfig(**{"enabled": True, "llm": llm, "fraction": 1.0, **knobs})


def _made(ref):
    return [json.loads(line) for line in open(ref.file("made.jsonl"), encoding="utf-8")]


def test_rouge_l_and_the_novelty_rule_match_a_hand_computation():
    # Stemmed tokens: give three tip for stay healthy / give three tip for good sleep:
    # LCS 4 of 6 and 6 -> P = R = 4/6 -> F1 0.667 (< 0.7: novel).
    a, b = "Give three tips for staying healthy.", "Give three tips for good sleep."
    assert rouge_l(a, b) == pytest.approx(4 / 6)
    # 6 tokens vs the same 6 + "please": LCS 6, P 6/7, R 1 -> F1 12/13 (>= 0.7: not novel).
    assert rouge_l(a, "Give three tips for staying healthy, please.") == pytest.approx(12 / 13)
    # The evaluate stage's tokenizer: text in other scripts is compared too (rouge-score's
    # default tokenizer drops every non-ASCII character, so these two scored 0).
    assert rouge_l("写一首诗", "写一首歌") == pytest.approx(3 / 4)

    cfg = SynthesizeConfig(llm=LLMConfig(backend="hf"))
    rows = [{"id": "r1", "instruction": a, "messages": [{"role": "user", "content": a}]}]
    mk = Maker(rows, cfg, ValidateConfig(), client=None, llm="x")

    def made(instruction):
        msgs = [{"role": "user", "content": instruction}, {"role": "assistant", "content": "ok"}]
        return {"instruction": instruction, "messages": msgs, "meta": {"synthesis": {}}}

    assert mk.keep("self_instruct", made(b), None, novel=True) is True
    assert mk.keep("self_instruct", made(a[:-1] + ", please."), None, novel=True) is False
    # The kept row now counts as existing: its near-copy is not novel either.
    assert (
        mk.keep("self_instruct", made("Give three tips for good sleep!"), None, novel=True) is False
    )
    assert dict(mk.counts["self_instruct"]) == {"made": 3, "kept": 1, "dropped.not_novel": 2}


def test_every_method_against_a_scripted_endpoint(rows_ref, stub):
    cfg = _cfg(
        stub.url,
        methods=["paraphrase", "back_translation", "evol_instruct", "self_instruct"],
        max_rows=3,
    )
    ref = synthesize(rows_ref, cfg, ValidateConfig())
    report = json.loads(ref.file("report.json").read_text())
    counts = report["methods"]
    # max_rows=3 caps the parents of each rewriting method.
    for method in ("paraphrase", "back_translation", "evol_instruct"):
        c = counts[method]
        assert c["made"] == 3 and c["kept"] + sum(v for k, v in c.items() if "dropped" in k) == 3
    assert report["prompt_version"] == "synth-v1" and report["model"] == "scripted"
    made = _made(ref)
    by_method = {}
    for row in made:
        by_method.setdefault(row["meta"]["synthesis"]["method"], []).append(row)
    # self_instruct: the scripted replies by attempt (tests/llm_stub.py), until 3 are kept.
    assert counts["self_instruct"] == {
        "made": 6,
        "kept": 3,
        "dropped.unparsable": 1,
        "dropped.invalid_empty_output": 1,
        "dropped.not_novel": 1,
    }
    assert [r["instruction"] for r in by_method["self_instruct"]] == [
        "Write a haiku about autumn rain.",
        "Convert 5 kilometres to miles.",
        "Sort these numbers.",
    ]
    assert by_method["self_instruct"][2]["input"] == "3, 1, 2"
    for row in made:
        synthesis = row["meta"]["synthesis"]
        assert synthesis["model"] == "scripted" and synthesis["prompt_version"] == "synth-v1"
        assert row["augmented_from"] == synthesis["parents"][0]
        assert row["messages"][-1] == {"role": "assistant", "content": row["output"]}
    for row in by_method["paraphrase"]:
        assert row["instruction"].startswith("Could you ") and row["instruction"].endswith("?")
    for row in by_method["evol_instruct"]:
        assert row["instruction"].endswith("Explain your reasoning step by step.")
        assert row["output"] == f"Because {row['instruction']}"
    assert all(r["instruction"].startswith("Would you ") for r in by_method["back_translation"])
    assert ref.meta["metrics"]["self_instruct.kept"] == 3
    assert ref.meta["metrics"]["self_instruct.dropped.invalid_empty_output"] == 1
    # Every count is a valid MLflow metric name (letters, digits, _ - . / and spaces).
    assert all(re.fullmatch(r"[\w\-./ ]+", k) for k in ref.meta["metrics"])
    sent = ref.meta["figures"]["requests_sent"]
    # paraphrase 3 + back-translation 2 x 3 + evol 2 x 3 + self_instruct 6.
    assert sent == len(stub.requests) == 3 + 6 + 6 + 6

    # Made rows share their parent's group and never reach validation or test.
    rows = [json.loads(line) for line in open(ref.file("rows.jsonl"), encoding="utf-8")]
    parts, _ = split_rows(rows, SplitConfig(train=0.5, validation=0.2, test=0.3, seed=1))
    held_out = parts["validation"] + parts["test"]
    assert held_out and not any("synthesis" in r["meta"] for r in held_out)

    # The same run again: every reply from the cache, the same rows.
    again = synthesize(rows_ref, cfg, ValidateConfig())
    assert len(stub.requests) == sent
    assert again.digest == ref.digest


def test_rewrites_outside_the_similarity_bounds_are_dropped(rows_ref, stub):
    ref = synthesize(rows_ref, _cfg(stub.url, methods=["paraphrase"]), ValidateConfig())
    counts = json.loads(ref.file("report.json").read_text())["methods"]["paraphrase"]
    assert counts == {
        "made": 10,
        "kept": 8,
        "dropped.too_similar": 1,
        "dropped.too_different": 1,
    }
    kept = {r["meta"]["synthesis"]["from"] for r in _made(ref)}
    assert not any("SAME" in k or "WILD" in k for k in kept)


def test_an_endpoint_that_dies_midway_and_the_call_cap_resume_from_the_cache(rows_ref):
    dying = LLMStub(die_after=4)
    cfg = _cfg(dying.url, methods=["paraphrase"]).model_copy(
        update={
            "llm": LLMConfig(base_url=dying.url, model="scripted", max_retries=0, max_concurrency=1)
        }
    )
    with pytest.raises(SynthesisError) as failed:
        synthesize(rows_ref, cfg, ValidateConfig())
    line = str(failed.value)
    assert "\n" not in line and "run again to continue" in line and "synthesis endpoint" in line
    assert len(dying.requests) == 4

    fresh = LLMStub()
    try:
        url = fresh.url  # another port: the cache is keyed by model and messages, not URL
        cfg = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"base_url": url})})
        capped = cfg.model_copy(update={"max_calls": 3})
        with pytest.raises(SynthesisError, match=r"max_calls=3 requests sent.*run again"):
            synthesize(rows_ref, capped, ValidateConfig())
        ref = synthesize(rows_ref, cfg, ValidateConfig())
        # 10 parents: 4 answered before the endpoint died, 3 before the cap, 3 now.
        assert len(fresh.requests) == 6 and ref.meta["figures"]["requests_sent"] == 3
        assert len(_made(ref)) == 8
    finally:
        fresh.close()


def test_a_missing_key_is_one_line_and_never_sent_elsewhere(rows_ref, stub, monkeypatch):
    monkeypatch.delenv("SYNTH_KEY_FOR_TEST", raising=False)
    cfg = _cfg(stub.url, methods=["paraphrase"])
    cfg = cfg.model_copy(
        update={"llm": cfg.llm.model_copy(update={"api_key_env": "SYNTH_KEY_FOR_TEST"})}
    )
    with pytest.raises(SynthesisError, match="environment variable SYNTH_KEY_FOR_TEST is unset"):
        synthesize(rows_ref, cfg, ValidateConfig())
    monkeypatch.setenv("SYNTH_KEY_FOR_TEST", "sk-synth-secret")
    ref = synthesize(rows_ref, cfg, ValidateConfig())
    assert {r["auth"] for r in stub.requests} == {"Bearer sk-synth-secret"}
    text = "".join(p.read_text() for p in ref.dir.rglob("*") if p.is_file())
    assert "sk-synth-secret" not in text


@pytest.mark.slow
def test_paraphrase_through_instructflow_serve_with_the_builtin_model(rows_ref, home):
    """The project's own server as the endpoint: the tiny model's rewrites are poor, and the
    filters say so by reason; every request reached the server once, then came from the cache."""
    from serving import serving

    with serving(home, "builtin:tiny", "--max-tokens", "16") as url:
        cfg = _cfg(f"{url}/v1", methods=["paraphrase"], fraction=0.5)
        ref = synthesize(rows_ref, cfg, ValidateConfig())
        counts = json.loads(ref.file("report.json").read_text())["methods"]["paraphrase"]
        assert counts["made"] == 5 == sum(v for k, v in counts.items() if k != "made")
        assert ref.meta["figures"]["requests_sent"] == 5
        again = synthesize(rows_ref, cfg, ValidateConfig())
        assert again.digest == ref.digest


def test_a_local_hf_model_makes_rows_in_process_and_caches_its_replies(rows_ref):
    llm = LLMConfig(backend="hf", hf_model="builtin:tiny", max_tokens=12)
    cfg = SynthesizeConfig(enabled=True, llm=llm, methods=["back_translation"], fraction=0.3)
    ref = synthesize(rows_ref, cfg, ValidateConfig())
    counts = json.loads(ref.file("report.json").read_text())["methods"]["back_translation"]
    assert counts["made"] == 3 == sum(v for k, v in counts.items() if k != "made")
    # There and back for 3 parents: 6 requests, fewer when two ask the same (cached).
    sent = ref.meta["figures"]["requests_sent"]
    assert 3 < sent <= 6 and ref.meta["params"]["model"] == "builtin:tiny"
    assert len(list((rows_ref.dir.parents[2] / "llm_cache").rglob("*.json"))) == sent
    assert synthesize(rows_ref, cfg, ValidateConfig()).digest == ref.digest


def test_a_killed_run_resumes_from_the_replies_it_had(rows_ref, home):
    """SIGKILL the process in the middle of synthesizing; the next run sends only the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    slow = LLMStub(delay=0.3)
    try:
        cfg = _cfg(slow.url, methods=["paraphrase"])
        cfg = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"max_concurrency": 1})})
        script = (
            "import sys, json\n"
            "from instructflow.artifacts import ArtifactRef\n"
            "from instructflow.config import SynthesizeConfig, ValidateConfig\n"
            "from tasks.synthesize import synthesize\n"
            "ref = ArtifactRef(**json.loads(sys.argv[1]))\n"
            "synthesize(ref, SynthesizeConfig(**json.loads(sys.argv[2])), ValidateConfig())\n"
        )
        ref_json = json.dumps(
            {"stage": rows_ref.stage, "path": rows_ref.path, "digest": rows_ref.digest}
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", script, ref_json, cfg.model_dump_json()],
            env={**os.environ, "INSTRUCTFLOW_HOME": str(home)},
        )
        deadline = time.monotonic() + 120
        while len(slow.requests) < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        answered = len(slow.requests)
        assert 4 <= answered < 10, answered
        time.sleep(0.5)  # a reply in flight when the process died is not cached
        cached = len(list((home / "llm_cache").rglob("*.json")))
        ref = synthesize(rows_ref, cfg, ValidateConfig())
        assert ref.meta["figures"]["requests_sent"] == 10 - cached
        assert len(_made(ref)) == 8
    finally:
        slow.close()
