"""The prompts of model-made data (tasks/synthesize.py), versioned: PROMPT_VERSION goes into
every made row's provenance, so rows made by different prompts can be told apart.

Self-Instruct (Wang et al., 2023) and Evol-Instruct (WizardLM, Xu et al., 2023) prompts are
shortened to their instructions; each asks for one item and a strict reply format.
"""

from __future__ import annotations

import json
from typing import Any

PROMPT_VERSION = "synth-v1"

SYSTEM = "You are a careful writer of training data for instruction-following models."

PARAPHRASE = (
    "Rewrite the instruction below so that it asks for exactly the same thing in different "
    "words. Keep every detail it gives. Reply with the rewritten instruction only.\n\n"
    "Instruction: {instruction}"
)

TRANSLATE = (
    "Translate the text below into {language}. Reply with the translation only.\n\nText: {text}"
)

SELF_INSTRUCT = (
    "Here are example tasks, each with an instruction, an optional input and the output:\n\n"
    "{examples}\n\n"
    "Write one new task that is different from all of them: a new instruction, an input if "
    "it needs one (else an empty string) and a correct output. Reply with one JSON object "
    'only: {{"instruction": "...", "input": "...", "output": "..."}}'
)

# WizardLM's in-depth evolving operations and its in-breadth one.
EVOLVE_OPERATIONS = {
    "constraints": "Add one more constraint or requirement to it.",
    "deepen": "Make it ask for deeper or broader knowledge of its subject.",
    "concretize": "Replace general concepts in it with more specific ones.",
    "reasoning": "Make it explicitly require several steps of reasoning.",
    "breadth": "Write a brand-new instruction in the same domain but rarer and different.",
}
EVOLVE = (
    "Rewrite the instruction below into a more complex version that a person can still "
    "understand and answer. {operation} Do not answer it. Reply with the new instruction "
    "only.\n\nInstruction: {instruction}"
)

ANSWER = "{prompt}"


def messages(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def example_block(rows: list[dict[str, Any]]) -> str:
    return "\n\n".join(
        f"Task {i}: "
        + json.dumps(
            {"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]},
            ensure_ascii=False,
        )
        for i, r in enumerate(rows, 1)
    )
