"""Benchmark suites (instructflow.suites) on builtin:tiny's architecture, randomly initialised
(built in seconds, no pre-training): lm-eval's multiple-choice accuracy must equal the argmax
accuracy of log-likelihoods computed here with plain torch, and the MT-Bench suite is graded by
a scripted judge endpoint whose verdicts are known, so its per-turn and per-category figures and
the rubric of every turn can be checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from judge_stub import JudgeEndpoint, read_prompt

from instructflow import judge, suites
from instructflow.builtin.model import build_model, build_tokenizer
from instructflow.config import EvaluateConfig, JudgeConfig

LM_EVAL_DATA = Path(__file__).parent / "data" / "lm_eval"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_model(tok)


# -- lm-eval multiple choice --------------------------------------------------------------
@pytest.fixture
def tiny_mc(tmp_path) -> Path:
    """The shipped task with its data file by absolute path (datasets resolves a relative
    `data_files` against the cwd), so the test works from any directory."""
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    cfg = yaml.safe_load((LM_EVAL_DATA / "tiny_mc.yaml").read_text())
    data = LM_EVAL_DATA / cfg["dataset_kwargs"]["data_files"]["test"]
    cfg["dataset_kwargs"]["data_files"]["test"] = str(data.resolve())
    (task_dir / "tiny_mc.yaml").write_text(yaml.safe_dump(cfg))
    return task_dir


def mc_rows() -> list[dict]:
    lines = (LM_EVAL_DATA / "tiny_mc.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@torch.no_grad()
def own_accuracy(model, tok) -> tuple[float, float]:
    """(acc, acc_norm) by hand: the log-likelihood of " <choice>" after the task's prompt,
    one unpadded sequence at a time; acc_norm divides by the choice's length in characters."""
    model.eval()
    acc = acc_norm = 0
    for row in mc_rows():
        context = f"Question: {row['question']}\nAnswer:"
        ctx = tok.encode(context, add_special_tokens=False)
        lls = []
        for choice in row["choices"]:
            ids = tok.encode(f"{context} {choice}", add_special_tokens=False)
            assert ids[: len(ctx)] == ctx
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            lls.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(ctx), len(ids))))
        ranked = sorted(lls, reverse=True)
        assert ranked[0] - ranked[1] > 1e-4, "near tie: argmax would depend on rounding"
        norm = [ll / len(c) for ll, c in zip(lls, row["choices"], strict=True)]
        acc += max(range(4), key=lls.__getitem__) == row["answer"]
        acc_norm += max(range(4), key=norm.__getitem__) == row["answer"]
    n = len(mc_rows())
    return acc / n, acc_norm / n


def trained_on_answers(tok, steps: int = 60):
    """A fresh model trained on "Question: ...\\nAnswer: <the right choice>" lines."""
    model = build_model(tok, seed=1)
    texts = [f"Question: {r['question']}\nAnswer: {r['choices'][r['answer']]}" for r in mc_rows()]
    batch = tok(texts, padding=True, padding_side="right", return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_lm_eval_accuracy_equals_own_loglikelihood_argmax(model, tok, tiny_mc):
    out = suites.lm_eval_mc(model, tok, ["tiny_mc"], include_path=str(tiny_mc), batch_size=4)
    metrics = out["tiny_mc"]
    assert set(metrics) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
    acc, acc_norm = own_accuracy(model, tok)
    assert metrics["acc"] == pytest.approx(acc, abs=1e-9)
    assert metrics["acc_norm"] == pytest.approx(acc_norm, abs=1e-9)
    again = suites.lm_eval_mc(model, tok, ["tiny_mc"], include_path=str(tiny_mc), batch_size=4)
    assert again == out
    limited = suites.lm_eval_mc(model, tok, ["tiny_mc"], include_path=str(tiny_mc), limit=2)
    assert limited["tiny_mc"]["acc"] in (0.0, 0.5, 1.0)


def test_lm_eval_sees_a_model_taught_the_answers(tok, tiny_mc):
    model = trained_on_answers(tok)
    out = suites.lm_eval_mc(model, tok, ["tiny_mc"], include_path=str(tiny_mc))
    acc, acc_norm = own_accuracy(model, tok)
    assert out["tiny_mc"]["acc"] == pytest.approx(acc, abs=1e-9)
    assert out["tiny_mc"]["acc_norm"] == pytest.approx(acc_norm, abs=1e-9)
    assert acc == 1.0
    assert not model.training  # the mode it came in with


# -- MT-Bench -----------------------------------------------------------------------------
# The scripted judge's score per (question id, turn); question 1 never gets a JSON verdict.
SCORES = {(2, 1): 3.0, (2, 2): 4.0, (3, 1): 2.0, (4, 1): 6.0, (4, 2): 9.0, (5, 1): 4.0}
SCORES |= {(6, 1): 8.0, (7, 1): 5.0, (8, 1): 7.0}


class MTJudge(JudgeEndpoint):
    """An OpenAI-compatible judge endpoint that knows which turn it is shown (by its user
    message): an answer holding the turn's reference scores 10, any other SCORES[(question,
    turn)]; question 1 is answered without JSON, so its verdicts fail."""

    def __init__(self, questions: list[dict]):
        self.turns = {
            t: (q["question_id"], k + 1) for q in questions for k, t in enumerate(q["turns"])
        }
        super().__init__()

    def reply(self, messages: list[dict]) -> str:
        parts = read_prompt(messages[1]["content"])
        qid, turn = self.turns[parts["instruction"]]
        if qid == 1:
            return "Nice slogan!"
        ref = parts["reference"]
        score = 10 if ref and ref in parts["response"] else SCORES[(qid, turn)]
        return json.dumps({"score": score, "rationale": "scripted"})


@pytest.fixture
def grader(home):
    endpoint = MTJudge(suites.load_questions())
    backend = judge.OpenAIBackend(
        JudgeConfig(backend="openai", base_url=endpoint.url, model="mt-judge")
    )
    backend.endpoint = endpoint
    yield backend
    backend.close()
    endpoint.close()


def test_bundled_questions():
    questions = suites.load_questions()
    assert len(questions) == 8
    assert {q["category"] for q in questions} == {"writing", "math", "reasoning", "extraction"}
    assert sorted(q["question_id"] for q in questions if len(q["turns"]) == 2) == [2, 4]


def test_bad_question_files(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "category": "x", "turns": ["hi"]}\n{"question_id": 2}\n')
    with pytest.raises(suites.SuiteError, match=r"q.jsonl:2: `turns` must be"):
        suites.load_questions(bad)
    bad.write_text('{"question_id": 1, "category": "x", "turns": ["hi"]}\nnot json\n')
    with pytest.raises(suites.SuiteError, match=r"q.jsonl:2: not valid JSON"):
        suites.load_questions(bad)


@pytest.mark.parametrize("template", ["alpaca", "chatml"])
def test_mt_bench_grades_every_turn_with_the_right_rubric(tok, model, template, grader):
    import pandas as pd

    import mlflow

    questions = suites.load_questions()
    # Seeds 0 and 2: both random models answer every first turn with visible text under both
    # templates (seed 1 answers chatml prompts with whitespace only, which strips to "").
    models = {"base": (model, tok), "finetuned": (build_model(tok, seed=2), tok)}
    out = suites.mt_bench(models, template, questions, grader, max_new_tokens=12)

    table = out["table"]
    n_turns = sum(len(q["turns"]) for q in questions)
    assert n_turns == 10 and len(table) == len(models) * n_turns
    columns = {"model", "question_id", "category", "turn", "turns", "instruction", "input"}
    columns |= {"reference", "rubric", "prompt", "answer", "score", "failed", "rationale"}
    assert all(set(row) == columns for row in table)
    # What the judge endpoint was really sent, by the turn it grades (question 1 twice: the
    # unparsable reply is retried once).
    sent = [r["body"]["messages"][1]["content"] for r in grader.endpoint.requests]
    assert len(sent) == len(table) + len(models)
    for name in models:
        rows = {(r["question_id"], r["turn"]): r for r in table if r["model"] == name}
        expected: dict[str, list[float]] = {}
        by_turn: dict[int, list[float]] = {}
        for q in questions:
            answers = [rows[(q["question_id"], k + 1)]["answer"] for k in range(len(q["turns"]))]
            for k, turn in enumerate(q["turns"]):
                row = rows[(q["question_id"], k + 1)]
                assert row["turns"] == len(q["turns"]) and row["instruction"] == turn
                # Each turn's prompt is the conversation with the model's own earlier answers.
                assert row["prompt"] == suites.turn_prompt(
                    q["turns"][: k + 1], answers[:k], template, tok
                )
                ref = (q.get("reference") or [""] * len(q["turns"]))[k]
                assert row["reference"] == ref
                prompts = [p for p in sent if f"### Instruction:\n{turn}\n" in p]
                prompts = [
                    p
                    for p in prompts
                    if f"### Response to grade:\n{answers[k].strip() or '(empty)'}" in p
                ]
                assert prompts, (name, q["question_id"], k)
                if ref:
                    assert row["rubric"] == "reference"
                    assert all(f"### Reference answer:\n{ref}\n" in p for p in prompts)
                else:  # MT-Bench's reference-free grading, not "judge against the reference"
                    assert row["rubric"] == "no reference"
                    assert all("There is no reference answer" in p for p in prompts)
                    assert not any("Reference answer" in p for p in prompts)
                if k:  # a later turn sees the earlier ones, answers included
                    first = answers[0]
                    assert first and first in row["prompt"]
                    assert row["input"] == f"User: {q['turns'][0]}\nAssistant: {first}"
                if q["question_id"] == 1:
                    assert row["failed"] and row["score"] is None
                    continue
                key = (q["question_id"], k + 1)
                score = 10.0 if ref and ref in row["answer"] else SCORES[key]
                assert row["score"] == score and not row["failed"]
                expected.setdefault(q["category"], []).append(score)
                by_turn.setdefault(k + 1, []).append(score)
        figures = out["models"][name]
        assert figures["failures"] == 1 and figures["judged"] == n_turns - 1
        for category, scores in expected.items():
            assert figures["categories"][category] == pytest.approx(sum(scores) / len(scores))
        for turn, scores in by_turn.items():
            assert figures["turns"][turn] == pytest.approx(sum(scores) / len(scores))
        assert set(figures["turns"]) == {1, 2}
        every = [s for scores in expected.values() for s in scores]
        assert figures["overall"] == pytest.approx(sum(every) / len(every))

    with mlflow.start_run() as run:
        mlflow.log_table(data=pd.DataFrame(table), artifact_file="mt_bench.json")
    logged = mlflow.load_table("mt_bench.json", run_ids=[run.info.run_id])
    assert len(logged) == len(table)


def test_the_suite_answers_with_evaluate_max_new_tokens(tok, model, grader):
    """evaluate.max_new_tokens caps the suite's answers (they were capped at 64 whatever it
    said): greedy answers at 2 new tokens are prefixes of those at 24, and shorter."""
    answers = {}
    for cap in (2, 24):
        cfg = EvaluateConfig(mt_bench="builtin", max_new_tokens=cap)
        out = suites.run_configured(model, tok, "alpaca", cfg, grader, "m")
        assert {"mt_bench.overall", "mt_bench.turn1", "mt_bench.turn2"} <= set(out["metrics"])
        rows = out["tables"]["mt_bench.json"]
        answers[cap] = {(r["question_id"], r["turn"]): r["answer"] for r in rows}
    short, long_ = answers[2], answers[24]
    first_turns = [k for k in short if k[1] == 1]
    assert all(long_[k].startswith(short[k]) for k in first_turns)
    assert any(len(long_[k]) > len(short[k]) for k in first_turns)


def test_turn_prompt_needs_a_turn_to_ask(tok):
    with pytest.raises(suites.SuiteError, match="no turn to ask"):
        suites.turn_prompt(["only turn"], ["an answer"], "chatml", tok)
