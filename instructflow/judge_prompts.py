"""Every LLM-judge prompt in one place, versioned: a change here changes PROMPT_HASH.

Single-answer grading scores a response against the reference on a 1-10 rubric; pairwise
grading compares two responses (run in both orders by instructflow.judge). Where there is no
reference (an MT-Bench question without one), the reference-free variants are used instead, as
MT-Bench does: a rubric that says to judge against a reference would grade against nothing.
The `openai` backend asks for a JSON verdict; the `hf` backend starts the reply with the
`*_SCORE_CUE` opening of that JSON and reads the next-token probabilities instead, so it never
has to parse text.
"""

from __future__ import annotations

import hashlib
import json

PROMPT_VERSION = "3"

SYSTEM = (
    "You are a strict, impartial judge of instruction-following answers. "
    "Reply with a single JSON object and nothing else."
)

SINGLE = """Grade the response to the instruction below on a 1-10 scale.

Rubric: 10 = fully correct and complete, matching the reference in substance; 7 = mostly correct
with minor omissions; 4 = partly correct or badly formatted; 1 = wrong, empty or off-topic.
Judge correctness against the reference; do not reward length.

### Instruction:
{instruction}
{input_block}
### Reference answer:
{reference}

### Response to grade:
{response}

Reply with exactly: {{"score": <integer 1-10>, "rationale": "<one sentence>"}}"""

PAIRWISE = """Compare two responses to the instruction below and decide which is better.

Judge correctness (the reference answer is correct), then helpfulness and concision. Ignore the
order in which the responses are shown and their length.

### Instruction:
{instruction}
{input_block}
### Reference answer:
{reference}

### Response A:
{a}

### Response B:
{b}

Reply with exactly: {{"winner": "A" | "B" | "tie", "rationale": "<one sentence>"}}"""

SINGLE_NO_REF = """Grade the response to the instruction below on a 1-10 scale.
There is no reference answer: judge the response on its own.

Rubric: 10 = correct, complete and exactly what the instruction asks; 7 = mostly correct with
minor flaws or omissions; 4 = partly correct, partly off-target or badly formatted; 1 = wrong,
empty or off-topic. Judge correctness and how well it follows the instruction; do not reward
length.

### Instruction:
{instruction}
{input_block}
### Response to grade:
{response}

Reply with exactly: {{"score": <integer 1-10>, "rationale": "<one sentence>"}}"""

PAIRWISE_NO_REF = """Compare two responses to the instruction below and decide which is better.

There is no reference answer. Judge correctness and how well each follows the instruction, then
helpfulness and concision. Ignore the order in which the responses are shown and their length.

### Instruction:
{instruction}
{input_block}
### Response A:
{a}

### Response B:
{b}

Reply with exactly: {{"winner": "A" | "B" | "tie", "rationale": "<one sentence>"}}"""

RETRY = (
    "Your reply was not a valid JSON object of the required form. Reply with only that JSON object."
)

# hf backend: the judge's reply is started with the opening of the JSON verdict and its next
# token is read as the verdict, so the same prompts serve both backends.
SINGLE_SCORE_CUE = '{"score": '
PAIRWISE_SCORE_CUE = '{"winner": "'


def _input_block(inp: str) -> str:
    return f"\n### Input:\n{inp}\n" if inp and inp.strip() else ""


def single(instruction: str, inp: str, reference: str, response: str) -> str:
    """The grading prompt; the reference-free rubric when `reference` is blank."""
    if not reference.strip():
        return SINGLE_NO_REF.format(
            instruction=instruction.strip(),
            input_block=_input_block(inp),
            response=response.strip() or "(empty)",
        )
    return SINGLE.format(
        instruction=instruction.strip(),
        input_block=_input_block(inp),
        reference=reference.strip(),
        response=response.strip() or "(empty)",
    )


def pairwise(instruction: str, inp: str, reference: str, a: str, b: str) -> str:
    """The comparison prompt; the reference-free one when `reference` is blank."""
    if not reference.strip():
        return PAIRWISE_NO_REF.format(
            instruction=instruction.strip(),
            input_block=_input_block(inp),
            a=a.strip() or "(empty)",
            b=b.strip() or "(empty)",
        )
    return PAIRWISE.format(
        instruction=instruction.strip(),
        input_block=_input_block(inp),
        reference=reference.strip(),
        a=a.strip() or "(empty)",
        b=b.strip() or "(empty)",
    )


def prompt_hash() -> str:
    """Identity of the prompt set (logged as a param, part of every cache key)."""
    blob = json.dumps(
        [
            PROMPT_VERSION,
            SYSTEM,
            SINGLE,
            PAIRWISE,
            SINGLE_NO_REF,
            PAIRWISE_NO_REF,
            RETRY,
            SINGLE_SCORE_CUE,
            PAIRWISE_SCORE_CUE,
        ]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
