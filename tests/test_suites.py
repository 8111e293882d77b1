"""Benchmark suites (instructflow.suites) on builtin:tiny's architecture, randomly initialised
(built in seconds, no pre-training): lm-eval's multiple-choice accuracy must equal the argmax
accuracy of log-likelihoods computed here with plain torch, and the MT-Bench suite is graded by
a scripted judge whose verdicts are known, so its per-category figures can be checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from instructflow import judge, suites
from instructflow.builtin.model import build_model, build_tokenizer

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
# The scripted judge's score per question id (by its final turn); question 1 always fails.
SCORES = {2: 3.0, 3: 2.0, 4: 6.0, 5: 4.0, 6: 8.0, 7: 5.0, 8: 7.0}


class ScriptedJudge:
    """Grades a response 10 when it contains the reference, else SCORES[question]; records
    what it was asked."""

    def __init__(self, questions: list[dict]):
        self.ids = {q["turns"][-1]: q["question_id"] for q in questions}
        self.calls: list[tuple[judge.Item, str]] = []

    def single(self, items, responses):
        out = []
        for item, response in zip(items, responses, strict=True):
            self.calls.append((item, response))
            qid = self.ids[item.instruction]
            if qid == 1:
                out.append(judge.Verdict(failed=True, rationale="scripted failure"))
            elif item.reference and item.reference in response:
                out.append(judge.Verdict(10.0, "contains the reference"))
            else:
                out.append(judge.Verdict(SCORES[qid], "scripted"))
        return out


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
def test_mt_bench(tok, model, template, home):
    import pandas as pd

    import mlflow

    questions = suites.load_questions()
    grader = ScriptedJudge(questions)
    # Seeds 0 and 2: both random models answer every first turn with visible text under both
    # templates (seed 1 answers chatml prompts with whitespace only, which strips to "").
    models = {"base": (model, tok), "finetuned": (build_model(tok, seed=2), tok)}
    out = suites.mt_bench(models, template, questions, grader, max_new_tokens=12)

    table = out["table"]
    assert len(table) == len(models) * len(questions) == len(grader.calls)
    columns = {"model", "question_id", "category", "turns", "instruction", "input", "reference"}
    columns |= {"prompt", "answer", "answers", "score", "failed", "rationale"}
    assert all(set(row) == columns for row in table)
    for name in models:
        rows = {r["question_id"]: r for r in table if r["model"] == name}
        expected: dict[str, list[float]] = {}
        for q in questions:
            row = rows[q["question_id"]]
            assert len(row["answers"]) == row["turns"] == len(q["turns"])
            assert row["answer"] == row["answers"][-1]
            # The final turn's prompt is the conversation with the model's own earlier answers.
            assert row["prompt"] == suites.turn_prompt(
                q["turns"], row["answers"][:-1], template, tok
            )
            if q["question_id"] == 1:
                assert row["failed"] and row["score"] is None
                continue
            ref = (q.get("reference") or [""])[-1]
            score = 10.0 if ref and ref in row["answer"] else SCORES[q["question_id"]]
            assert row["score"] == score and not row["failed"]
            expected.setdefault(q["category"], []).append(score)
        figures = out["models"][name]
        assert figures["failures"] == 1 and figures["judged"] == 7
        for category, scores in expected.items():
            assert figures["categories"][category] == pytest.approx(sum(scores) / len(scores))
        every = [s for scores in expected.values() for s in scores]
        assert figures["overall"] == pytest.approx(sum(every) / len(every))

        for qid in (2, 4):  # two-turn questions: turn 2 sees turn 1 and its answer
            q, row = next(q for q in questions if q["question_id"] == qid), rows[qid]
            first = row["answers"][0]
            assert first and first in row["prompt"]
            assert q["turns"][0] in row["prompt"] and q["turns"][1] in row["prompt"]
            assert row["instruction"] == q["turns"][1]
            assert row["input"] == f"User: {q['turns'][0]}\nAssistant: {first}"
            assert row["reference"] == (q.get("reference") or ["", ""])[1]

    with mlflow.start_run() as run:
        mlflow.log_table(data=pd.DataFrame(table), artifact_file="mt_bench.json")
    logged = mlflow.load_table("mt_bench.json", run_ids=[run.info.run_id])
    assert len(logged) == len(table)


def test_turn_prompt_needs_a_turn_to_ask(tok):
    with pytest.raises(suites.SuiteError, match="no turn to ask"):
        suites.turn_prompt(["only turn"], ["an answer"], "chatml", tok)
