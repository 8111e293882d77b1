"""Benchmark suites: multiple-choice benchmarks (MMLU-style) scored by log-likelihood through
EleutherAI's lm-evaluation-harness, and an MT-Bench-style multi-turn suite graded by the judge.

`lm_eval_mc` runs lm-eval on a model already in memory: a question counts as right when the
correct choice has the highest log-likelihood as a continuation of the prompt (`acc`), or the
highest per-character log-likelihood (`acc_norm`). Task YAMLs under `include_path` are
registered next to lm-eval's own tasks; lm-eval hands `dataset_kwargs` to `datasets`, which
resolves a relative `data_files` path against the current directory, so local tasks should
name their data by absolute path.

`mt_bench` follows FastChat's MT-Bench question format (`question_id`, `category`, `turns`,
optional `reference` per turn): each model answers turn by turn (greedy decoding, at most
`evaluate.max_new_tokens` new tokens per answer), seeing the conversation so far with its own
earlier answers, and the judge grades EVERY turn's answer with single-answer grading (1-10),
the earlier turns shown as a transcript, as MT-Bench grades both of its turns. A turn with a
reference is graded against it; one without is graded with the reference-free rubric
(instructflow.judge_prompts picks it for a blank reference), as MT-Bench does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from instructflow import judge, templates
from instructflow import rows as rows_io

MT_BENCH_TINY = Path(__file__).parent / "data" / "mt_bench_tiny.jsonl"


class SuiteError(ValueError):
    pass


# -- multiple choice through lm-eval ----------------------------------------------------------
def lm_eval_mc(
    model,
    tokenizer,
    tasks: list[str],
    *,
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's `simple_evaluate` on `model` (an already-loaded
    transformers causal LM, wrapped in lm-eval's HFLM with `tokenizer`).

    Metrics are lm-eval's "<metric>,<filter>" results with the default filter's suffix dropped
    (`acc`, `acc_stderr`, `acc_norm`, `acc_norm_stderr` for multiple choice); stderrs lm-eval
    could not compute are left out. lm-eval's own task registry (~15K tasks, ~10 s to index) is
    loaded only when a task is not found under `include_path`. lm-eval seeds Python's, numpy's
    and torch's global generators; the model's train/eval mode is restored afterwards."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = (
        TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    )
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include_path)
    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False
        )
    finally:
        model.train(was_training)
    results: dict[str, dict[str, float]] = {}
    for task, entries in out["results"].items():
        metrics = {}
        for key, value in entries.items():
            name, sep, filt = key.partition(",")
            if not sep or isinstance(value, bool) or not isinstance(value, int | float):
                continue  # alias / name / sample counts, and "N/A" stderrs
            metrics[name if filt == "none" else key] = float(value)
        results[task] = metrics
    return results


# -- MT-Bench ---------------------------------------------------------------------------------
class SingleGrader(Protocol):
    """What `mt_bench` needs from a judge backend (instructflow.judge's backends have it)."""

    def single(
        self, items: Sequence[judge.Item], responses: Sequence[str]
    ) -> list[judge.Verdict]: ...


def load_questions(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Rows of an MT-Bench question file (JSONL); default: the bundled 8-question suite."""
    path = Path(path) if path is not None else MT_BENCH_TINY
    rows = []
    try:
        numbered = list(rows_io.iter_jsonl(path))
    except rows_io.RowsError as exc:
        raise SuiteError(str(exc)) from None
    for n, row in numbered:
        turns = row.get("turns") if isinstance(row, dict) else None
        if not turns or not all(isinstance(t, str) for t in turns):
            raise SuiteError(f"{path}:{n}: `turns` must be a non-empty list of strings")
        if "question_id" not in row or "category" not in row:
            raise SuiteError(f"{path}:{n}: needs `question_id` and `category`")
        rows.append(row)
    return rows


def _conversation(turns: Sequence[str], answers: Sequence[str]) -> list[dict[str, str]]:
    msgs = []
    for user, answer in zip(turns, answers, strict=False):
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return msgs


def turn_prompt(turns: Sequence[str], answers: Sequence[str], template: str, tokenizer) -> str:
    """The prompt for turn len(answers) + 1: the earlier turns with the model's `answers`, then
    the next user turn, rendered by templates.generation_prompt (which needs a final assistant
    message: an empty placeholder, dropped from the prompt)."""
    if len(answers) >= len(turns):
        raise SuiteError(f"{len(answers)} answers leave no turn to ask (of {len(turns)})")
    msgs = _conversation(turns[: len(answers)], answers)
    msgs += [{"role": "user", "content": turns[len(answers)]}, {"role": "assistant", "content": ""}]
    return templates.generation_prompt({"messages": msgs}, template, tokenizer)


def judge_item(question: dict[str, Any], answers: Sequence[str], turn: int) -> judge.Item:
    """Turn `turn` (0-based) as the judge sees it: its user message as the instruction, the
    earlier turns with the model's answers as a "User: ..." / "Assistant: ..." transcript in
    `input` (as the Alpaca template renders conversations), and that turn's reference, or ""
    (the reference-free rubric) when the question has none for it."""
    turns = question["turns"]
    instruction, context = templates.instruction_and_context(
        {"messages": _conversation(turns[: turn + 1], answers[: turn + 1])}
    )
    refs = question.get("reference") or []
    reference = refs[turn] if turn < len(refs) and isinstance(refs[turn], str) else ""
    return judge.Item(instruction=instruction, input=context, reference=reference)


def _answer(
    model, tokenizer, template: str, questions: list[dict[str, Any]], max_new_tokens: int
) -> tuple[list[list[str]], list[list[str]]]:
    """Per question, the answer and the prompt of every turn. Turn k of all questions that
    have one is generated as one batch."""
    from instructflow import generation

    answers: list[list[str]] = [[] for _ in questions]
    prompts: list[list[str]] = [[] for _ in questions]
    for k in range(max(len(q["turns"]) for q in questions)):
        ask = [i for i, q in enumerate(questions) if len(q["turns"]) > k]
        batch = [turn_prompt(questions[i]["turns"], answers[i], template, tokenizer) for i in ask]
        outs = generation.generate(
            model,
            tokenizer,
            batch,
            max_new_tokens=max_new_tokens,
            stop_strings=templates.stop_strings(template, tokenizer),
            stop_tokens=[templates.end_of_turn_token(template, tokenizer)],
            add_special_tokens=templates.add_special_tokens(template),
        )
        for i, prompt, out in zip(ask, batch, outs, strict=True):
            answers[i].append(out)
            prompts[i].append(prompt)
    return answers, prompts


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def mt_bench(
    models: dict[str, tuple[Any, Any]],
    template: str,
    questions: list[dict[str, Any]],
    judge_backend: SingleGrader,
    *,
    max_new_tokens: int,
) -> dict[str, Any]:
    """Answer `questions` with each of `models` ({name: (model, tokenizer)}) under `template`
    and grade every turn's answer with `judge_backend.single`.

    Returns {"models": {name: {"overall", "turns": {turn number: mean}, "categories":
    {category: mean}, "judged", "failures"}}, "table": [one row per (model, question, turn)]}.
    Means are over the verdicts that did not fail (None when none did); `overall` is the mean
    over every graded turn (MT-Bench's score), not over categories. Table rows (for
    mlflow.log_table): model, question_id, category, turn (1-based), turns, instruction, input
    (transcript of earlier turns), reference, rubric ("reference" / "no reference"), prompt
    (of that turn), answer, score, failed, rationale."""
    if not questions:
        raise SuiteError("mt_bench: no questions")
    summary: dict[str, Any] = {}
    table: list[dict[str, Any]] = []
    for name, (model, tokenizer) in models.items():
        answers, prompts = _answer(model, tokenizer, template, questions, max_new_tokens)
        graded = [
            (q, k, a, p)
            for q, a, p in zip(questions, answers, prompts, strict=True)
            for k in range(len(q["turns"]))
        ]
        items = [judge_item(q, a, k) for q, k, a, _ in graded]
        verdicts = judge_backend.single(items, [a[k] for _, k, a, _ in graded])
        by_category: dict[str, list[float]] = defaultdict(list)
        by_turn: dict[int, list[float]] = defaultdict(list)
        for (q, k, a, p), item, v in zip(graded, items, verdicts, strict=True):
            if not v.failed:
                by_category[q["category"]].append(float(v.value))
                by_turn[k + 1].append(float(v.value))
            table.append(
                {
                    "model": name,
                    "question_id": q["question_id"],
                    "category": q["category"],
                    "turn": k + 1,
                    "turns": len(q["turns"]),
                    "instruction": item.instruction,
                    "input": item.input,
                    "reference": item.reference,
                    "rubric": "reference" if item.reference.strip() else "no reference",
                    "prompt": p[k],
                    "answer": a[k],
                    "score": None if v.failed else float(v.value),
                    "failed": v.failed,
                    "rationale": v.rationale,
                }
            )
        failures = sum(v.failed for v in verdicts)
        summary[name] = {
            "overall": _mean([s for scores in by_turn.values() for s in scores]),
            "turns": {t: _mean(by_turn[t]) for t in sorted({k + 1 for _, k, _, _ in graded})},
            "categories": {
                c: _mean(by_category[c]) for c in sorted({q["category"] for q in questions})
            },
            "judged": len(verdicts) - failures,
            "failures": failures,
        }
    return {"models": summary, "table": table}


# -- what the evaluate stage runs -------------------------------------------------------------
def run_configured(model, tokenizer, template: str, cfg, grader, name: str) -> dict[str, Any]:
    """The suites `cfg` (an EvaluateConfig) asks for, on one model: {"metrics": {name:
    value}, "tables": {file: rows}}. Metric names: `lm_eval.<task>.<metric>`,
    `mt_bench.overall`, `mt_bench.turn<k>`, `mt_bench.<category>`; `name` labels the table
    rows. MT-Bench answers get `cfg.max_new_tokens` new tokens, as the test split's do."""
    metrics: dict[str, float] = {}
    tables: dict[str, list[dict[str, Any]]] = {}
    if cfg.lm_eval_tasks:
        scores = lm_eval_mc(
            model,
            tokenizer,
            list(cfg.lm_eval_tasks),
            include_path=cfg.lm_eval_include_path,
            limit=cfg.lm_eval_limit,
        )
        for task, values in scores.items():
            metrics.update({f"lm_eval.{task}.{k}": v for k, v in values.items()})
        tables["lm_eval.json"] = [{"model": name, "task": t, **v} for t, v in scores.items()]
    if cfg.mt_bench and grader is not None:
        path = None if cfg.mt_bench == "builtin" else cfg.mt_bench
        result = mt_bench(
            {name: (model, tokenizer)},
            template,
            load_questions(path),
            grader,
            max_new_tokens=cfg.max_new_tokens,
        )
        summary = result["models"][name]
        if summary["overall"] is not None:
            metrics["mt_bench.overall"] = summary["overall"]
        for turn, value in summary["turns"].items():
            if value is not None:
                metrics[f"mt_bench.turn{turn}"] = value
        for category, value in summary["categories"].items():
            if value is not None:
                metrics[f"mt_bench.{category}"] = value
        metrics["mt_bench.failures"] = summary["failures"]
        tables["mt_bench.json"] = result["table"]
    return {"metrics": metrics, "tables": tables}
