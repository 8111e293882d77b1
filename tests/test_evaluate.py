"""The evaluate stage and its generation / perplexity pieces, on the builtin tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from evaluate_fixtures import canonical_rows, make_base, make_inputs, make_train

from instructflow import generation, templates
from instructflow.config import EvaluateConfig, JudgeConfig, TokenizeConfig
from instructflow.loading import load_base_model, load_tokenizer
from instructflow.metrics import text_metrics
from instructflow.scoring import scored_examples
from tasks.evaluate import evaluate


@pytest.fixture
def tiny(home):
    tok_ref, base = make_base()
    return tok_ref, base, load_base_model(base), load_tokenizer(tok_ref)


def test_batched_generation_matches_one_by_one_generate(tiny):
    _, _, model, tok = tiny
    rows = canonical_rows(12)
    prompts = [templates.generation_prompt(r, "alpaca", tok) for r in rows]
    prompts[3] = prompts[3] + " and a much longer prompt " * 6  # uneven lengths -> padding
    stops = templates.stop_strings("alpaca", tok)
    # Tokens this (random) model emits mid-answer become extra stop tokens, so rows finish at
    # different steps and queued prompts are spliced into the running batch.
    free = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt")
        out = model.generate(
            **enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id
        )
        free.append(out[0, enc.input_ids.shape[1] :].tolist())

    def lengths(ids: set[int]) -> list[int]:
        return [next((k + 1 for k, t in enumerate(o) if t in ids), 12) for o in free]

    stop_ids: set[int] = set()
    for _ in range(4):  # greedily pick the stop tokens that spread the lengths most
        pool = {t for o in free for t in o} - stop_ids
        stop_ids.add(max(sorted(pool), key=lambda t: len(set(lengths(stop_ids | {t})))))
    eos = [tok.eos_token_id, *stop_ids]
    stop_toks = tok.convert_ids_to_tokens(sorted(stop_ids))
    batched = generation.generate(
        model,
        tok,
        prompts,
        max_new_tokens=12,
        batch_size=4,
        stop_strings=stops,
        stop_tokens=stop_toks,
        details=True,
    )
    for prompt, got in zip(prompts, batched, strict=True):
        ids = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
            )
        new = out[0, ids.input_ids.shape[1] :]
        ends = [*stops, tok.eos_token, *stop_toks]  # a stop token ends the text, excluded
        assert got["text"] == generation.cut_at_stop(tok.decode(new), ends)
        assert got["completion_tokens"] == len(new)
    assert len({b["completion_tokens"] for b in batched}) > 2
    assert len({b["text"] for b in batched}) > 1


def test_shared_prefixes_group_prompts_by_their_common_header():
    head_a, head_b = list(range(100, 130)), list(range(100, 110)) + list(range(200, 220))
    prompts = [
        head_a + [1, 2, 3],
        head_a + [1, 2, 4, 5],
        head_b + [7],
        head_a + [9],
        head_b + [8, 8],
        list(range(300, 340)),  # shares nothing: no prefix
        head_a,  # the whole prompt is the header: one token is left to compute
    ]
    assert generation.shared_prefixes(prompts) == [29, 29, 30, 29, 30, 0, 29]
    # Stricter: only the two rows that share 32 tokens still group.
    assert generation.shared_prefixes(prompts, min_tokens=31) == [32, 32, 0, 0, 0, 0, 0]
    assert generation.shared_prefixes([head_a + [1]]) == [0]  # a group needs two rows


def test_prefix_sharing_and_chunked_prefill_give_the_same_outputs(tiny, monkeypatch):
    _, _, model, tok = tiny
    rows = canonical_rows(24)
    prompts = [templates.generation_prompt(r, "alpaca", tok) for r in rows]
    prompts[5] = "An unrelated prompt with no template at all."
    encoded = tok(prompts)["input_ids"]
    shared = generation.shared_prefixes(encoded)
    assert sum(n > 0 for n in shared) >= 20 and shared[5] == 0
    kw = dict(max_new_tokens=10, batch_size=8, details=True)
    plain = generation.generate(model, tok, prompts, share_prefix=False, **kw)
    computed: list[int] = []
    prefix_kv = generation._prefix_kv
    monkeypatch.setattr(
        generation, "_prefix_kv", lambda m, t, v=None: computed.append(len(t)) or prefix_kv(m, t, v)
    )
    assert generation.generate(model, tok, prompts, **kw) == plain
    assert computed and all(n >= 16 for n in computed)  # headers were computed once each
    assert len(computed) == len(
        set(tuple(e[:n]) for e, n in zip(encoded, shared, strict=True) if n)
    )
    monkeypatch.setattr(generation, "PREFILL_ROWS", 3)  # several prefill calls per refill
    assert generation.generate(model, tok, prompts, **kw) == plain


def test_fold_adapter_merges_lora_into_plain_weights_with_the_same_outputs(tiny):
    tok_ref, base, _, tok = tiny
    from peft import PeftModel

    from instructflow.loading import load_finetuned

    model, _ = load_finetuned(make_train(base, tok_ref), base)
    assert isinstance(model, PeftModel)
    prompts = [templates.generation_prompt(r, "alpaca", tok) for r in canonical_rows(6)]
    before = generation.generate(model, tok, prompts, max_new_tokens=8)
    examples = scored_examples(make_inputs(canonical_rows(6), tok_ref)[1], None)
    ppl_before, _ = generation.perplexity(model, examples, pad_id=tok.pad_token_id)
    folded = generation.fold_adapter(model)
    assert not isinstance(folded, PeftModel)
    assert not any("lora" in name for name, _ in folded.named_parameters())
    assert generation.generate(folded, tok, prompts, max_new_tokens=8) == before
    ppl_after, _ = generation.perplexity(folded, examples, pad_id=tok.pad_token_id)
    assert ppl_after == pytest.approx(ppl_before, rel=1e-4)
    plain = load_base_model(base)
    assert generation.fold_adapter(plain) is plain


def test_generation_stops_at_stop_string_and_sampling_is_seeded(tiny):
    _, _, model, tok = tiny
    prompts = [templates.generation_prompt(r, "alpaca", tok) for r in canonical_rows(3)]
    free = generation.generate(model, tok, prompts, max_new_tokens=10)
    word = free[0].split()[1] if len(free[0].split()) > 1 else free[0][:3]
    cut = generation.generate(model, tok, prompts, max_new_tokens=10, stop_strings=[word])
    assert word not in cut[0] and free[0].startswith(cut[0])
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    a = generation.generate(model, tok, prompts, seed=3, **kw)
    assert a == generation.generate(model, tok, prompts, seed=3, **kw)
    assert a != generation.generate(model, tok, prompts, seed=4, **kw)


def test_perplexity_counts_only_response_tokens_and_is_token_weighted(tiny):
    tok_ref, _, model, tok = tiny
    rows = canonical_rows(5)
    examples = scored_examples(make_inputs(rows, tok_ref)[1], None)
    for row, (ids, labels) in zip(rows, examples, strict=True):
        scored = tok.decode([t for t in labels if t != -100])
        assert scored == templates.reference(row) + tok.eos_token
        assert len(ids) == len(labels)
    ppl, n = generation.perplexity(model, examples, pad_id=tok.pad_token_id, batch_size=2)
    # Reference: one example at a time, summed NLL over the scored tokens.
    nll, count = 0.0, 0
    for ids, labels in examples:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        k = sum(t != -100 for t in labels[1:])
        nll, count = nll + out.loss.item() * k, count + k
    assert n == count
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_text_metrics_use_the_libraries():
    import sacrebleu

    hyps, refs = ["the cat sat on the mat", "Hello"], ["the cat sat on a mat", "hello"]
    metrics, per = text_metrics(hyps, refs)
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    # Exact match is case-sensitive (whitespace collapsed only); the SQuAD-normalised twin
    # ignores case, punctuation and articles.
    assert metrics["exact_match"] == 0.0 and metrics["exact_match_normalized"] == 1.0
    assert 0 < metrics["rougeL"] < 1 and per["rougeL"][1] == 1.0  # lowercased by rouge-score
    assert metrics["answer_words"] == (6 + 1) / 2
    # Copying the lower-case input is no answer to an upper-case task.
    copied, _ = text_metrics(["falcon tiger", " FALCON\n TIGER "], ["FALCON TIGER"] * 2)
    assert copied["exact_match"] == 0.5


def test_bleu_is_flagged_when_references_are_too_short_for_4_grams():
    from instructflow.metrics import bleu_signal_note

    short = ["Khartoum", "New York", "the plural is mice", "one two three"]
    assert bleu_signal_note(short).startswith("no signal: the references' median length is 2.5")
    assert bleu_signal_note(["the cat sat on the mat", "a dog ran in the park today"]) is None


def test_evaluate_stage_writes_the_contract_with_hf_judge(tiny):
    tok_ref, base, _, _ = tiny
    rows = canonical_rows(6)
    ref = evaluate(
        *make_inputs(rows, tok_ref),
        make_train(base, tok_ref),
        base,
        TokenizeConfig(max_length=128),
        EvaluateConfig(max_new_tokens=8, batch_size=4),
        JudgeConfig(backend="hf", bootstrap_samples=50, max_examples=4),
    )
    report = json.loads(ref.file("report.json").read_text())
    # One-word references: BLEU is kept in report.json and figures.json but not charted.
    assert report["bleu_note"].startswith("no signal: the references' median length is 1 word")
    assert ref.meta["tags"]["instructflow.bleu_note"] == report["bleu_note"]
    assert "bleu" not in ref.meta["metrics"] and "bleu_base" in ref.figures
    m = report["metrics"]
    for key in (
        "perplexity",
        "perplexity_base",
        "bleu",
        "bleu_base",
        "rougeL",
        "rougeL_base",
        "exact_match",
        "exact_match_base",
        "judge_score",
        "judge_score_base",
        "win_rate",
        "win_rate_low",
        "win_rate_high",
        "wins",
        "ties",
        "losses",
        "judge_failed_single",
        "judge_failed_pairs",
        "judge_failure_rate",
        "calibration_accuracy",
        "position_consistency",
        "judge_trusted",
    ):
        assert key in m, key
    assert m["perplexity"] != m["perplexity_base"]  # the adapter changes the model
    assert m["wins"] + m["ties"] + m["losses"] == 4 and m["judge_failure_rate"] == 0
    # builtin:tiny as a judge cannot tell a reference from an empty answer: untrusted.
    assert m["judge_trusted"] == 0.0 and not report["judge"]["usable"]
    assert "untrusted" in report["judge"]["status"]
    assert m["win_rate_low"] <= m["win_rate"] <= m["win_rate_high"]
    assert 1 <= m["judge_score"] <= 10
    table = json.loads(ref.file("examples.json").read_text())
    assert {len(v) for v in table.values()} == {6}
    assert table["judge_score"][4] is None and table["reference"][0] == rows[0]["output"]
    assert ref.file("scores.png").stat().st_size > 1000
    assert ref.meta["params"]["judge_backend"] == "hf"
    assert ref.meta["tables"][0]["file"] == "examples.json"


def test_evaluate_task_runs_under_prefect_and_is_cached_across_flow_runs(tiny):
    from prefect import flow

    from instructflow import workspace
    from tasks.evaluate import evaluate_task

    tok_ref, base, _, _ = tiny
    (splits, tokenized), train = make_inputs(canonical_rows(3), tok_ref), make_train(base, tok_ref)

    @flow
    def only_evaluate(max_new_tokens: int):
        state = evaluate_task(
            splits,
            tokenized,
            train,
            base,
            TokenizeConfig(max_length=128),
            EvaluateConfig(max_new_tokens=max_new_tokens, compare_base=False),
            JudgeConfig(),
            return_state=True,
        )
        return state.name, state.result()

    run = only_evaluate.with_options(result_storage=workspace.prefect_results_dir())
    first, second, other = run(4), run(4), run(5)
    assert (first[0], second[0], other[0]) == ("Completed", "Cached", "Completed")
    assert first[1].digest == second[1].digest
    metrics = json.loads(first[1].file("report.json").read_text())["metrics"]
    assert "perplexity_base" not in metrics and "judge_score" not in metrics  # backend none


def test_rouge_keeps_unicode_letters_and_splits_cjk_and_matches_rouge_score_on_ascii():
    from rouge_score import rouge_scorer

    from instructflow.metrics import UnicodeTokenizer

    same = ["今天天气很好", "naïve café", "Привет, мир"]
    metrics, per = text_metrics(same, same)
    assert per["rougeL"] == [1.0, 1.0, 1.0] and metrics["exact_match"] == 1.0
    # Chinese is split into characters: a one-character change keeps partial credit.
    _, per = text_metrics(["今天天气很好"], ["今天天气不好"])
    assert per["rougeL"][0] == pytest.approx(5 / 6)
    assert UnicodeTokenizer().tokenize("Café 東京 rocks!") == ["café", "東", "京", "rock"]
    # ASCII text scores exactly as rouge-score's own tokenizer (with stemming) scores it.
    pairs = [("The cats were running fast", "a cat runs quickly"), ("sort 3, 1, 2", "1, 2, 3")]
    ours = rouge_scorer.RougeScorer(["rouge1", "rougeL"], tokenizer=UnicodeTokenizer())
    theirs = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    for hyp, ref in pairs:
        assert ours.score(ref, hyp) == theirs.score(ref, hyp)


def test_prompts_admitted_mid_loop_join_the_batch_and_equal_alone(tiny):
    """The serving path: prompts arriving while a decode loop runs join it as rows finish,
    each result is handed over as soon as its row ends, and equals the prompt's answer alone."""
    _, _, model, tok = tiny
    prompts = [templates.generation_prompt(r, "alpaca", tok) for r in canonical_rows(9)]
    kw = {"max_new_tokens": 10, "stop_strings": templates.stop_strings("alpaca", tok)}
    alone = [generation.generate(model, tok, [p], batch_size=1, **kw)[0] for p in prompts]
    waiting, asked, finished = list(prompts[3:]), [], []

    def admit(room: int) -> list[str]:
        asked.append(room)
        if len(asked) < 3:  # the others arrive once the loop has run two steps
            return []
        taken = waiting[:room]
        del waiting[:room]
        return taken

    def on_done(i: int, text: str) -> None:
        finished.append(i)

    got = generation.generate(
        model, tok, prompts[:3], batch_size=4, admit=admit, on_done=on_done, **kw
    )
    assert got == alone  # numbered on after the first three, in arrival order
    assert sorted(finished) == list(range(9)) and len(asked) > 4
    assert finished.index(0) < finished.index(8)  # answered when done, not at the end


def test_console_shows_bleu_only_where_it_measures_and_the_answer_lengths():
    from rich.console import Console

    from instructflow import report

    metrics = {"test_examples": 2, "exact_match": 0.5, "exact_match_base": 0.0}
    metrics |= {"bleu": 28.65, "bleu_base": 8.66, "rougeL": 0.557, "rougeL_base": 0.413}
    metrics |= {"answer_words": 10.4, "answer_words_base": 22.6, "reference_words": 8.4}

    def shown(rep):
        console = Console(record=True, width=200)
        for renderable in report.tables(rep):
            console.print(renderable)
        return " ".join(console.export_text().split())

    text = shown({"metrics": metrics, "bleu_note": None})
    assert "BLEU │ 8.7 │ 28.6" in text or "BLEU │ 8.7 │ 28.7" in text
    assert "answer length, words (references 8.4) │ 22.6 │ 10.4" in text
    assert "BLEU" not in shown({"metrics": metrics, "bleu_note": "no signal: ..."})
