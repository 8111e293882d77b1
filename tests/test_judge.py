"""The LLM judge: strict parsing, both-order pairwise, retries, caching, unreachable / slow
endpoints, and the API key never leaving the request header. The OpenAI-compatible endpoint
here is a real HTTP server on 127.0.0.1 whose verdicts follow simple rules, so the expected
figures are known; tests/test_serve.py runs the judge against `instructflow serve` itself."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from instructflow import judge
from instructflow.config import JudgeConfig

SECRET = "sk-test-DO-NOT-LOG-4f1c2a"


class Stub:
    """An OpenAI-compatible endpoint. Single grading: 9 if the response says 'good', else 3.
    Pairwise: the response containing 'good' wins, except 'biased' items where it always
    answers A. 'garbage' items answer non-JSON unless the retry instruction is present;
    'hopeless' items always answer non-JSON."""

    def __init__(self, delay: float = 0.0):
        self.requests: list[dict] = []
        self.delay = delay
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"auth": self.headers.get("Authorization"), "body": body})
                time.sleep(stub.delay)
                content = stub.reply(body["messages"])
                data = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client timed out and hung up
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reply(self, messages: list[dict]) -> str:
        prompt = messages[1]["content"]
        retried = len(messages) > 2
        if "hopeless" in prompt or ("garbage" in prompt and not retried):
            return "I think it is pretty good, maybe a 7?"
        if "### Response A:" in prompt:
            a = prompt.split("### Response A:")[1].split("### Response B:")[0]
            b = prompt.split("### Response B:")[1]
            winner = "A" if "biased" in prompt or "good" in a else "B" if "good" in b else "tie"
            return json.dumps({"winner": winner, "rationale": "rule"})
        response = prompt.split("### Response to grade:")[1]
        score = 9 if "good" in response else 3
        return "```json\n" + json.dumps({"score": score, "rationale": "rule"}) + "\n```"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


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
    lo, hi = judge.bootstrap_ci([1, 0, 1, 0.5, 1], 500, seed=0)
    assert (lo, hi) == judge.bootstrap_ci([1, 0, 1, 0.5, 1], 500, seed=0) and lo < 0.7 < hi


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
    assert m["judge_failed"] == 3  # hopeless: ft single, base single, pairwise
    assert res.columns["judge_score"] == [9.0, 9.0, 9.0, None]
    assert res.columns["pairwise"] == ["win", "win", "tie", "failed"]
    assert "unparsable" in res.failures[0]
    # The key went to the endpoint, in the header only.
    assert {r["auth"] for r in stub.requests} == {f"Bearer {SECRET}"}
    assert all(r["body"]["temperature"] == 0 for r in stub.requests)
    sent = len(stub.requests)
    # 4 items x 4 prompts (2 single, 2 pairwise orders); garbage and hopeless retry each once.
    assert sent == 4 * 4 + 4 + 4

    again = judge.run_judge(cfg, items, cand, base)
    assert len(stub.requests) == sent  # every reply came from the cache
    assert again.metrics == m

    cache_text = "".join(p.read_text() for p in (home / "judge_cache").rglob("*.json"))
    params = json.dumps(judge.judge_params(cfg))
    assert cache_text and SECRET not in cache_text + params + caplog.text
    assert "JUDGE_KEY_FOR_TEST" in params and judge.judge_params(cfg)["judge_prompt_hash"]


def test_unreachable_endpoint_fails_fast_in_one_line(home):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(f"http://127.0.0.1:{port}/v1", max_retries=2, timeout_s=2)
    t0 = time.perf_counter()
    res = judge.run_judge(cfg, ITEMS, ["x"] * 4, ["y"] * 4)
    assert time.perf_counter() - t0 < 20
    assert res.metrics["judge_failed"] == 4 + 4 + 4
    assert "unreachable" in res.failures[0] and "\n" not in res.failures[0]
    assert "judge_score" not in res.metrics


def test_slow_endpoint_times_out_retries_and_counts_failures(home):
    slow = Stub(delay=3.0)
    try:
        cfg = _cfg(slow.url, timeout_s=0.3, max_retries=1, mode="single", max_concurrency=4)
        t0 = time.perf_counter()
        res = judge.run_judge(cfg, ITEMS[:2], ["good"] * 2)
        assert time.perf_counter() - t0 < 10  # no hang
        assert len(slow.requests) == 4  # each of 2 prompts: first try + one retry
        assert res.metrics["judge_failed"] == 2
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
    from evaluate_fixtures import canonical_rows, make_base, make_splits, make_train
    from mlflow.tracking import MlflowClient

    import mlflow
    from instructflow import tracking
    from instructflow.config import EvaluateConfig, TokenizeConfig
    from tasks.evaluate import evaluate

    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", SECRET)
    tok_ref, base = make_base()
    ref = evaluate(
        make_splits(canonical_rows(3)),
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
    assert "evaluate.judge_failed" in data.metrics
    logged = json.dumps([data.params, data.tags])
    for path in (home / "mlartifacts").rglob("*"):
        if path.is_file():
            logged += path.read_text(errors="ignore")
    for path in ref.dir.rglob("*"):
        if path.is_file():
            logged += path.read_text(errors="ignore")
    assert "judge_rationale" in logged  # the table really was logged
    assert SECRET not in logged
