"""LLM-as-judge: single-answer grading (1-10 vs the reference) and pairwise comparison.

Backends: `openai` (any OpenAI-compatible /v1/chat/completions endpoint; the API key is read
from the environment variable NAMED by `judge.api_key_env` and lives only in the request
header), `hf` (a local causal LM scored from next-token probabilities, so it cannot fail to
parse) and `none`. Pairwise verdicts are taken in both orders; orders that disagree are a tie.
Before grading, the judge is calibrated on answers of known quality (instructflow.calibration);
an untrusted judge's figures are logged but flagged and never used by the gate. Win rates,
ties and the length control: instructflow.win_rate. An unparsable `openai` reply is retried
once; if it fails again the verdict is failed: counted (per unit, `judge_failed_single` /
`judge_failed_pairs`, and as `judge_failure_rate`) and left out of the means. Replies are
cached under `<workspace>/judge_cache/` by (prompt hash, judge model).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from instructflow import judge_prompts as P
from instructflow.config import JudgeConfig
from instructflow.llm import ChatClient, LLMError, public_url
from instructflow.win_rate import pairwise_figures

log = logging.getLogger("instructflow.judge")
# Sampling parameters of every judge request (greedy: a verdict must not be a dice roll).
JUDGE_PARAMS = {"temperature": 0, "max_tokens": 256}


class JudgeError(LLMError):
    """A judge that cannot run at all (bad config, missing key); one-line message."""


@dataclass
class Item:
    instruction: str
    input: str
    reference: str


@dataclass
class Verdict:
    value: Any = None  # a score (float) or a winner ("A" / "B" / "tie"); None when failed
    rationale: str = ""
    failed: bool = False


@dataclass
class JudgeResult:
    metrics: dict[str, float] = field(default_factory=dict)
    columns: dict[str, list[Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    # Whether the gate may use these figures, and the one-line reason either way.
    usable: bool = False
    status: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)
    # Why the length-controlled win rate is not evidence, or that length explains the outcome.
    length_note: str = ""


def judge_params(cfg: JudgeConfig) -> dict[str, Any]:
    """What identifies the judge, for MLflow params and report.json; never the key itself."""
    model = cfg.model if cfg.backend == "openai" else cfg.hf_model
    out: dict[str, Any] = {
        "judge_backend": cfg.backend,
        "judge_mode": cfg.mode,
        "judge_model": model if cfg.backend != "none" else None,
        "judge_prompt_version": P.PROMPT_VERSION,
        "judge_prompt_hash": P.prompt_hash(),
    }
    if cfg.backend == "openai":
        out["judge_base_url"] = public_url(cfg.base_url)
        out["judge_api_key_env"] = cfg.api_key_env
    return out


# -- parsing ----------------------------------------------------------------------------------
def _json_object(reply: str) -> dict[str, Any] | None:
    text = reply.strip()
    if text.startswith("```"):
        # Models often fence JSON; the fence is markup, not content.
        text = text.strip("`").removeprefix("json").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def parse_single(reply: str) -> Verdict | None:
    obj = _json_object(reply)
    score = obj.get("score") if obj else None
    if isinstance(score, bool) or not isinstance(score, int | float) or not 1 <= score <= 10:
        return None
    if isinstance(score, float) and not score.is_integer():
        return None
    return Verdict(float(score), str(obj.get("rationale", "")))


def parse_pairwise(reply: str) -> Verdict | None:
    obj = _json_object(reply)
    winner = obj.get("winner") if obj else None
    if not isinstance(winner, str) or winner.strip().lower() not in ("a", "b", "tie"):
        return None
    w = winner.strip().lower()
    return Verdict("tie" if w == "tie" else w.upper(), str(obj.get("rationale", "")))


# -- backends ---------------------------------------------------------------------------------
class OpenAIBackend:
    def __init__(self, cfg: JudgeConfig):
        if not cfg.base_url or not cfg.model:
            raise JudgeError("judge.backend=openai needs judge.base_url and judge.model")
        if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
            raise JudgeError(f"judge.api_key_env: environment variable {cfg.api_key_env} is unset")
        self.cfg = cfg
        self.client = ChatClient.for_endpoint(
            cfg, params=JUDGE_PARAMS, cache_root=None, what="judge endpoint"
        )

    def close(self) -> None:
        self.client.close()

    def chat(self, messages: list[dict[str, str]]) -> str:
        return self.client.chat(messages)

    def _ask(self, prompt: str, parse: Callable[[str], Verdict | None]) -> Verdict:
        messages = [{"role": "system", "content": P.SYSTEM}, {"role": "user", "content": prompt}]
        try:
            reply = self.chat(messages)
            verdict = parse(reply)
            if verdict is None:
                retry = [*messages, {"role": "assistant", "content": reply}]
                retry.append({"role": "user", "content": P.RETRY})
                reply = self.chat(retry)
                verdict = parse(reply)
        except LLMError as exc:
            return Verdict(failed=True, rationale=str(exc))
        if verdict is None:
            return Verdict(failed=True, rationale=f"unparsable judge reply: {reply[:120]!r}")
        return verdict

    def _map(self, prompts: list[str], parse) -> list[Verdict]:
        with ThreadPoolExecutor(max_workers=self.cfg.max_concurrency) as pool:
            return list(pool.map(lambda p: self._ask(p, parse), prompts))

    def single(self, items: Sequence[Item], responses: Sequence[str]) -> list[Verdict]:
        prompts = [
            P.single(it.instruction, it.input, it.reference, r)
            for it, r in zip(items, responses, strict=True)
        ]
        return self._map(prompts, parse_single)

    def pairwise(self, items: Sequence[Item], a: Sequence[str], b: Sequence[str]) -> list[Verdict]:
        prompts = [
            P.pairwise(it.instruction, it.input, it.reference, x, y)
            for it, x, y in zip(items, a, b, strict=True)
        ]
        return self._map(prompts, parse_pairwise)


class HFBackend:
    """A local causal LM; verdicts come from next-token probabilities after the JSON cue."""

    def __init__(self, cfg: JudgeConfig):
        from instructflow.model_specs import load_for_inference

        self.cfg = cfg
        self.model, self.tok, _ = load_for_inference(cfg.hf_model)
        self.ratings = self._single_token_choices([str(r) for r in range(1, 11)])
        self.sides = self._single_token_choices(["A", "B"])
        if len(self.ratings) < 2 or len(self.sides) < 2:
            raise JudgeError(f"judge.hf_model={cfg.hf_model}: rating tokens are not single tokens")

    def close(self) -> None:
        pass

    def _single_token_choices(self, labels: list[str]) -> dict[str, list[int]]:
        """label -> token ids that spell it alone (with / without a leading space)."""
        out: dict[str, list[int]] = {}
        seen: set[int] = set()
        for label in labels:
            ids = []
            for variant in (label, " " + label):
                enc = self.tok.encode(variant, add_special_tokens=False)
                if len(enc) == 1 and enc[0] not in seen:
                    ids.append(enc[0])
                    seen.add(enc[0])
            if ids:
                out[label] = ids
        return out

    def _prompt(self, user: str, cue: str) -> str:
        msgs = [{"role": "system", "content": P.SYSTEM}, {"role": "user", "content": user}]
        if getattr(self.tok, "chat_template", None):
            head = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            head = f"{P.SYSTEM}\n\n{user}\n\n"
        return head + cue

    def _probs(self, prompts: list[str], choices: dict[str, list[int]]):
        from instructflow.generation import next_token_logprobs

        flat = [i for ids in choices.values() for i in ids]
        lp = next_token_logprobs(self.model, self.tok, prompts, flat, batch_size=8).exp()
        cols, out = 0, []
        for ids in choices.values():
            out.append(lp[:, cols : cols + len(ids)].sum(1))
            cols += len(ids)
        import torch

        probs = torch.stack(out, 1)
        return probs / probs.sum(1, keepdim=True)

    def single(self, items: Sequence[Item], responses: Sequence[str]) -> list[Verdict]:
        prompts = [
            self._prompt(P.single(it.instruction, it.input, it.reference, r), P.SINGLE_SCORE_CUE)
            for it, r in zip(items, responses, strict=True)
        ]
        values = [float(v) for v in self.ratings]
        out = []
        for row in self._probs(prompts, self.ratings).tolist():
            score = sum(p * v for p, v in zip(row, values, strict=True))
            top = max(range(len(row)), key=row.__getitem__)
            why = f"expected rating (next-token probs); mode {values[top]:g} p={row[top]:.2f}"
            out.append(Verdict(score, why))
        return out

    def pairwise(self, items: Sequence[Item], a: Sequence[str], b: Sequence[str]) -> list[Verdict]:
        prompts = [
            self._prompt(
                P.pairwise(it.instruction, it.input, it.reference, x, y), P.PAIRWISE_SCORE_CUE
            )
            for it, x, y in zip(items, a, b, strict=True)
        ]
        out = []
        for pa, pb in self._probs(prompts, self.sides).tolist():
            winner = "A" if pa > pb else "B" if pb > pa else "tie"
            out.append(Verdict(winner, f"p(A)={pa:.3f} p(B)={pb:.3f}"))
        return out


def make_backend(cfg: JudgeConfig):
    if cfg.backend == "openai":
        return OpenAIBackend(cfg)
    if cfg.backend == "hf":
        return HFBackend(cfg)
    return None


# -- aggregation ------------------------------------------------------------------------------
def combine_orders(first: Verdict, second: Verdict) -> str:
    """Candidate's outcome from (candidate as A, baseline as B) and the swapped order."""
    if first.failed or second.failed:
        return "failed"
    if first.value == "A" and second.value == "B":
        return "win"
    if first.value == "B" and second.value == "A":
        return "loss"
    return "tie"  # an explicit tie, or the two orders disagree


def _mean(verdicts: list[Verdict]) -> float | None:
    ok = [v.value for v in verdicts if not v.failed]
    return sum(ok) / len(ok) if ok else None


def run_judge(
    cfg: JudgeConfig,
    items: Sequence[Item],
    candidate: Sequence[str],
    baseline: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> JudgeResult:
    """Calibrate the judge, then judge `candidate` outputs (and `baseline` ones: the base
    model or the champion).

    Calibration (instructflow.calibration) runs first on a sanity set from `items`; a judge
    that misses `judge.min_calibration` in any mode it runs, or `judge.min_position_consistency`
    in pairwise mode, is untrusted. A failed verdict (no usable reply after a retry) is counted
    per unit, single verdicts and pairs apart, and left out of the means and the win rates;
    `judge_failure_rate` is failed units / judged units, and above `judge.max_failure_rate` the
    judge's figures are not used either. `result.usable` and `result.status` say whether and
    why; every figure is logged either way.
    """
    from instructflow import calibration

    result = JudgeResult()
    backend = make_backend(cfg)
    if backend is None:
        return result
    n = min(len(items), cfg.max_examples or len(items))
    items, candidate = list(items[:n]), list(candidate[:n])
    baseline = list(baseline[:n]) if baseline is not None else None
    failed_single = failed_pairs = units = 0
    try:
        if progress:
            progress("judge: calibrating on answers of known quality")
        cal = calibration.calibrate(backend, items, cfg.mode, cfg.calibration_examples, cfg.seed)
        problems = cal.problems(cfg.min_calibration, cfg.min_position_consistency)
        result.calibration = {
            "accuracy": cal.accuracy,
            "single": cal.single,
            "pairwise": cal.pairwise,
            "position_consistency": cal.position_consistency,
            "pairs": cal.pairs,
            "reference_longer": cal.reference_longer,
            "failed": cal.failed,
            "problems": problems,
            "table": cal.table,
        }
        result.metrics["calibration_accuracy"] = cal.accuracy
        for name, value in (("single", cal.single), ("pairwise", cal.pairwise)):
            if value is not None:
                result.metrics[f"calibration_accuracy_{name}"] = value
        if cal.position_consistency is not None:
            result.metrics["position_consistency"] = cal.position_consistency
        result.metrics["judge_trusted"] = float(not problems)
        if cfg.mode in ("single", "both"):
            if progress:
                progress("judge: grading answers")
            ft = backend.single(items, candidate)
            result.columns["judge_score"] = [v.value for v in ft]
            result.columns["judge_rationale"] = [v.rationale for v in ft]
            failed_single += sum(v.failed for v in ft)
            units += len(ft)
            result.failures += [v.rationale for v in ft if v.failed]
            if (m := _mean(ft)) is not None:
                result.metrics["judge_score"] = m
            if baseline is not None:
                base = backend.single(items, baseline)
                result.columns["judge_score_base"] = [v.value for v in base]
                failed_single += sum(v.failed for v in base)
                units += len(base)
                result.failures += [v.rationale for v in base if v.failed]
                if (m := _mean(base)) is not None:
                    result.metrics["judge_score_base"] = m
        if cfg.mode in ("pairwise", "both") and baseline is not None:
            if progress:
                progress("judge: pairwise, both orders")
            first = backend.pairwise(items, candidate, baseline)
            second = backend.pairwise(items, baseline, candidate)
            outcomes = [combine_orders(x, y) for x, y in zip(first, second, strict=True)]
            result.columns["pairwise"] = outcomes
            failed_pairs += outcomes.count("failed")
            units += len(outcomes)
            result.failures += [v.rationale for v in first + second if v.failed]
            figures, lc = pairwise_figures(
                outcomes,
                candidate,
                baseline,
                samples=cfg.bootstrap_samples,
                seed=cfg.seed,
                lc_min_comparisons=cfg.lc_min_comparisons,
            )
            result.metrics.update(figures)
            result.length_note = lc.note
    finally:
        backend.close()
    rate = (failed_single + failed_pairs) / units if units else 0.0
    result.metrics.update(
        judge_failed_single=failed_single,
        judge_failed_pairs=failed_pairs,
        judge_failure_rate=rate,
    )
    if problems:
        result.status = f"judge untrusted: calibration accuracy {cal.accuracy:.2f}: " + "; ".join(
            problems
        )
    elif rate > cfg.max_failure_rate:
        result.status = (
            f"judge not used: it failed on {rate:.0%} of its units > "
            f"judge.max_failure_rate {cfg.max_failure_rate:.0%}"
        )
    else:
        result.usable = True
        pc = cal.position_consistency
        result.status = f"judge trusted: calibration accuracy {cal.accuracy:.2f}" + (
            f", position consistency {pc:.2f}" if pc is not None else ""
        )
    if result.failures:
        log.warning(
            "judge: %d verdict(s) failed; first: %s",
            failed_single + failed_pairs,
            result.failures[0],
        )
    return result
