"""The LLM judge: strict parsing, both-order pairwise, retries, caching, unreachable / slow
endpoints, and the API key never leaving the request header. The OpenAI-compatible endpoint
here is a real HTTP server on 127.0.0.1 whose verdicts follow simple rules, so the expected
figures are known; tests/test_serve.py runs the judge against `instructflow serve` itself."""

from __future__ import annotations

import json
import logging
import re
import time

import pytest
from judge_stub import JudgeEndpoint, read_prompt

from instructflow import judge, win_rate
from instructflow.config import JudgeConfig

SECRET = "sk-test-DO-NOT-LOG-4f1c2a"


class Stub(JudgeEndpoint):
    """An OpenAI-compatible endpoint that reads the reference. Single grading: 9 if the
    response says 'good' or is the reference, else 3. Pairwise: the response that says 'good'
    or is the reference wins, except 'biased' items where it always answers A. 'garbage' items
    answer non-JSON unless the retry instruction is present; 'hopeless' items always answer
    non-JSON. A reference-free prompt is graded the same way (nothing equals no reference)."""

    def reply(self, messages: list[dict]) -> str:
        prompt = messages[1]["content"]
        retried = len(messages) > 2
        if "hopeless" in prompt or ("garbage" in prompt and not retried):
            return "I think it is pretty good, maybe a 7?"
        parts = read_prompt(prompt)

        def good(text: str) -> bool:
            return "good" in text or text == parts["reference"]

        if parts["response"] is None:
            a, b = parts["a"], parts["b"]
            winner = "A" if "biased" in prompt or good(a) else "B" if good(b) else "tie"
            return json.dumps({"winner": winner, "rationale": "rule"})
        score = 9 if good(parts["response"]) else 3
        return "```json\n" + json.dumps({"score": score, "rationale": "rule"}) + "\n```"


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


def _cfg(url: str, **kw) -> JudgeConfig:
    base = dict(backend="openai", base_url=url, model="stub-judge", bootstrap_samples=200)
    return JudgeConfig(**(base | kw))


ITEMS = [judge.Item(f"task {i}", "", "ref") for i in range(4)]


def test_strict_parsing_and_order_combination():
    assert judge.parse_single('{"score": 7, "rationale": "ok"}').value == 7.0
    assert judge.parse_single('```json\n{"score": 10}\n```').value == 10.0
    for bad in (
        "7",
        '{"score": 11}',
        '{"score": "7"}',
        '{"score": 7.5}',
        '{"score": true}',
        '[{"score": 7}]',
        'Score: {"score": 7}',
    ):
        assert judge.parse_single(bad) is None, bad
    assert judge.parse_pairwise('{"winner": "b"}').value == "B"
    assert judge.parse_pairwise('{"winner": "C"}') is None
    v = judge.Verdict
    assert judge.combine_orders(v("A"), v("B")) == "win"
    assert judge.combine_orders(v("B"), v("A")) == "loss"
    assert judge.combine_orders(v("A"), v("A")) == "tie"  # position bias -> tie
    assert judge.combine_orders(v("A"), v(failed=True)) == "failed"
    lo, hi = win_rate.bootstrap_ci([1, 0, 1, 0.5, 1], 500, seed=0)
    assert (lo, hi) == win_rate.bootstrap_ci([1, 0, 1, 0.5, 1], 500, seed=0) and lo < 0.7 < hi


def test_openai_judge_scores_retries_counts_failures_and_caches(home, stub, caplog, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", SECRET)
    items = [judge.Item(i, "", "ref") for i in ("one", "two garbage", "three biased", "hopeless")]
    cand = ["a good answer", "a good answer", "a good answer", "good"]
    base = ["meh", "meh", "meh", "meh"]
    cfg = _cfg(stub.url, api_key_env="JUDGE_KEY_FOR_TEST")
    with caplog.at_level(logging.INFO):
        res = judge.run_judge(cfg, items, cand, base)
    m = res.metrics
    # Single: 3 parsable candidates score 9, base 3 each (hopeless fails twice: ft and base).
    assert m["judge_score"] == 9.0 and m["judge_score_base"] == 3.0
    # Pairwise: 'one' and 'garbage' win both orders; 'biased' says A both times -> tie.
    assert (m["wins"], m["ties"], m["losses"]) == (2, 1, 0)
    assert m["win_rate"] == pytest.approx(2.5 / 3)
    assert m["win_rate_low"] <= m["win_rate"] <= m["win_rate_high"]
    # The tie is left out of the decisive win rate, whose Wilson interval stays wide at 2/2.
    assert m["decisive_win_rate"] == 1.0 and m["decisive_win_rate_low"] < 0.5
    # Failures per unit: 2 single verdicts (hopeless, ft and base) and 1 pair; 12 units.
    assert (m["judge_failed_single"], m["judge_failed_pairs"]) == (2, 1)
    assert m["judge_failure_rate"] == pytest.approx(3 / 12)
    assert res.columns["judge_score"] == [9.0, 9.0, 9.0, None]
    assert res.columns["pairwise"] == ["win", "win", "tie", "failed"]
    assert "unparsable" in res.failures[0]
    # Calibration, 3 sanity pairs per item (every reference is "ref": one shorter, one longer
    # and one as long wrong answer). Single: the hopeless item's 3 checks fail, 9/12 right.
    # Pairwise: the biased item is right in one order only and hopeless in none: 6/12 right
    # in both orders, 6/12 consistent. The weakest mode decides: untrusted.
    assert m["calibration_accuracy_single"] == pytest.approx(9 / 12)
    assert m["calibration_accuracy_pairwise"] == pytest.approx(6 / 12)
    assert m["position_consistency"] == pytest.approx(6 / 12)
    assert m["calibration_accuracy"] == pytest.approx(6 / 12) and m["judge_trusted"] == 0.0
    assert not res.usable and "untrusted: calibration accuracy 0.50" in res.status
    for problem in ("single 0.75 <", "pairwise 0.50 <", "position consistency 0.50 <"):
        assert problem in res.status
    # The key went to the endpoint, in the header only.
    assert {r["auth"] for r in stub.requests} == {f"Bearer {SECRET}"}
    assert all(r["body"]["temperature"] == 0 for r in stub.requests)
    sent = len(stub.requests)

    again = judge.run_judge(cfg, items, cand, base)
    assert len(stub.requests) == sent  # every reply came from the cache
    assert again.metrics == m

    cache_text = "".join(p.read_text() for p in (home / "judge_cache").rglob("*.json"))
    params = json.dumps(judge.judge_params(cfg))
    assert cache_text and SECRET not in cache_text + params + caplog.text
    assert "JUDGE_KEY_FOR_TEST" in params and judge.judge_params(cfg)["judge_prompt_hash"]


def test_a_judge_that_reads_the_reference_is_trusted_a_biased_one_is_not(home, stub):
    items = [judge.Item(f"name item {i}", "", f"answer {i}") for i in range(6)]
    cand, base = [f"answer {i}" for i in range(6)], ["no idea"] * 6
    res = judge.run_judge(_cfg(stub.url), items, cand, base)
    m = res.metrics
    assert m["calibration_accuracy"] == 1.0 and m["position_consistency"] == 1.0
    assert res.usable and m["judge_trusted"] == 1.0 and m["judge_failure_rate"] == 0.0
    assert res.status.startswith("judge trusted")
    table = res.calibration["table"]
    # Two wrong answers of each kind of length per reference ("answer 3": 8 characters).
    assert len(table) == 6 * 6 and res.calibration["reference_longer"] == 0.5
    assert {row["kind"] for row in table if row["reference_longer"]} <= {"empty", "truncated"}

    biased = [judge.Item(f"biased item {i}", "", f"answer {i}") for i in range(6)]
    res = judge.run_judge(_cfg(stub.url), biased, cand, base)
    # Always "A": right in one order of each pair only, never consistent across orders.
    assert res.metrics["position_consistency"] == 0.0
    assert res.metrics["calibration_accuracy_pairwise"] == 0.0
    assert res.metrics["calibration_accuracy_single"] == 1.0  # single grading is unbiased
    assert not res.usable and res.metrics["judge_trusted"] == 0.0
    assert res.metrics["win_rate"] == 0.5  # all ties: what a fully biased judge gives
    assert "decisive_win_rate" not in res.metrics  # ... and no decisive comparison


def test_unreachable_endpoint_fails_fast_in_one_line(home):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(f"http://127.0.0.1:{port}/v1", max_retries=2, timeout_s=2)
    t0 = time.perf_counter()
    res = judge.run_judge(cfg, ITEMS, ["x"] * 4, ["y"] * 4)
    assert time.perf_counter() - t0 < 20
    assert res.metrics["judge_failed_single"] == 8 and res.metrics["judge_failed_pairs"] == 4
    assert res.metrics["judge_failure_rate"] == 1.0 and not res.usable
    assert "unreachable" in res.failures[0] and "\n" not in res.failures[0]
    assert "judge_score" not in res.metrics


def test_slow_endpoint_times_out_retries_and_counts_failures(home):
    slow = Stub(delay=3.0)
    try:
        cfg = _cfg(slow.url, timeout_s=0.3, max_retries=1, mode="single", max_concurrency=4)
        t0 = time.perf_counter()
        res = judge.run_judge(cfg, ITEMS[:2], ["good"] * 2)
        assert time.perf_counter() - t0 < 10  # no hang
        # 2 grading prompts + calibration (2 items: each reference once and its 3 wrong
        # answers, graded alone), each tried twice (first try + one retry), none answered.
        assert len(slow.requests) == 2 * (2 + 2 * (1 + 3))
        assert res.metrics["judge_failed_single"] == 2
        assert re.search(r"timed out after 0.3s", res.failures[0])
    finally:
        slow.close()


def test_missing_key_env_is_a_one_line_error(home, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(judge.JudgeError, match="NO_SUCH_KEY_VAR"):
        judge.run_judge(
            _cfg("http://127.0.0.1:9/v1", api_key_env="NO_SUCH_KEY_VAR"), ITEMS, ["x"] * 4
        )


def test_key_never_reaches_mlflow_through_the_evaluate_stage(home, stub, monkeypatch):
    """The whole path: evaluate stage with the openai judge, then tracking.log_stage."""
    from evaluate_fixtures import canonical_rows, make_base, make_inputs, make_train
    from mlflow.tracking import MlflowClient

    import mlflow
    from instructflow import tracking
    from instructflow.config import EvaluateConfig, TokenizeConfig
    from tasks.evaluate import evaluate

    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", SECRET)
    tok_ref, base = make_base()
    ref = evaluate(
        *make_inputs(canonical_rows(3), tok_ref),
        make_train(base, tok_ref),
        base,
        TokenizeConfig(max_length=128),
        EvaluateConfig(max_new_tokens=4),
        _cfg(stub.url, api_key_env="JUDGE_KEY_FOR_TEST"),
    )
    assert stub.requests and stub.requests[0]["auth"] == f"Bearer {SECRET}"
    tracking.setup(None, "judge-secret")
    with mlflow.start_run() as run:
        tracking.log_stage(run.info.run_id, ref)
    data = MlflowClient().get_run(run.info.run_id).data
    # Stage params are logged as "<stage>[.out].<name>" (tracking.log_stage decides).
    logged_params = {k.rsplit(".", 1)[-1]: v for k, v in data.params.items()}
    assert logged_params["judge_api_key_env"] == "JUDGE_KEY_FOR_TEST"
    assert logged_params["judge_model"] == "stub-judge"
    assert "evaluate/judge_failure_rate" in data.metrics
    logged = json.dumps([data.params, data.tags])
    for path in (home / "mlartifacts").rglob("*"):
        if path.is_file():
            logged += path.read_text(errors="ignore")
    for path in ref.dir.rglob("*"):
        if path.is_file():
            logged += path.read_text(errors="ignore")
    assert "judge_rationale" in logged  # the table really was logged
    assert SECRET not in logged

    # The report carries what the gate reads. Neither model's answer is the reference nor
    # says "good", so the (trusted) judge ties every pair, and the gate does not promote.
    from instructflow.config import RegisterConfig
    from instructflow.gate import gate

    report = json.loads(ref.file("report.json").read_text())
    m = report["metrics"]
    assert report["judge"]["usable"] and (m["wins"], m["ties"], m["losses"]) == (0, 3, 0)
    assert report["judge"]["length_note"] == "no decisive comparison"
    promoted, reasons = gate(m, None, RegisterConfig(), judge=report["judge"])
    assert not promoted and any("a tie is not a win" in r for r in reasons)


def test_multi_turn_rows_are_judged_with_their_conversation(home, stub, shared_datasets):
    """A ShareGPT conversation's final answer is judged against the last user turn, with the
    earlier turns as context; the per-example table shows both."""
    from evaluate_fixtures import make_base, make_inputs, make_train

    from instructflow.config import DataConfig, EvaluateConfig, TokenizeConfig, ValidateConfig
    from instructflow.rows import read_jsonl
    from tasks.download import download
    from tasks.evaluate import evaluate
    from tasks.validate import validate

    path = shared_datasets / "sharegpt_fastchat_dummy/dummy_conversation.json"
    clean = validate(download(DataConfig(source=str(path))), ValidateConfig())
    rows = [r for r in read_jsonl(clean.file("clean.jsonl")) if len(r["messages"]) >= 4][:3]
    assert len(rows) == 3
    tok_ref, base = make_base()
    ref = evaluate(
        *make_inputs(rows, tok_ref, max_length=1024),
        make_train(base, tok_ref),
        base,
        TokenizeConfig(max_length=1024),
        EvaluateConfig(max_new_tokens=4, compare_base=False),
        _cfg(stub.url, mode="single", calibration_examples=2),
    )
    table = json.loads(ref.file("examples.json").read_text())
    graded = [r["body"]["messages"][1]["content"] for r in stub.requests]
    for i, row in enumerate(rows):
        users = [m["content"] for m in row["messages"] if m["role"] == "user"]
        first_answer = next(m["content"] for m in row["messages"] if m["role"] == "assistant")
        assert table["instruction"][i] == users[-1].strip()  # not the first user turn
        assert f"User: {users[0].strip()}" in table["input"][i]
        assert first_answer.strip() in table["input"][i]
        # The judge's prompt for this row holds the last turn and the earlier conversation.
        mine = [g for g in graded if f"### Instruction:\n{users[-1].strip()}" in g]
        assert mine and all(f"User: {users[0].strip()}" in g for g in mine)
