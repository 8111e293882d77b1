"""Every prompt format in one place: how a canonical row becomes text for training and generation.

Templates: `alpaca` (the standard Alpaca prompt), `chatml` (<|im_start|>role ... <|im_end|>)
and `chat_template` (the tokenizer's own Jinja template). A row renders to `segments`:
(text, trainable) pieces whose concatenation is the training text; assistant responses and
their end-of-turn token are trainable, everything else is prompt.

Field values are stripped of surrounding whitespace when rendered, so segment boundaries sit
next to newlines or special tokens; the tokenize stage relies on that to tokenise segments
separately and still get the ids of the whole text (it checks, and falls back when not).

Multi-turn rows under `alpaca`: Alpaca has one instruction and one response, so earlier turns
go into the `### Input:` section as a transcript ("User: ..." / "Assistant: ..." lines), the
last user message is the instruction, and only the final assistant message is trained. A
system message replaces Alpaca's opening sentence.
"""

from __future__ import annotations

from typing import Any

# Bump when the rendered text of any template changes (logged as a tokenize param; the code
# itself is in the tokenize key through instructflow.codeid).
TEMPLATE_VERSION = 1
TEMPLATES = ("alpaca", "chatml", "chat_template")

ALPACA_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# The label of a token that carries no loss (what transformers' loss functions skip).
IGNORE_INDEX = -100

Segments = list[tuple[str, bool]]


class TemplateError(ValueError):
    pass


def _check(template: str) -> None:
    if template not in TEMPLATES:
        raise TemplateError(f"unknown template {template!r}; expected one of {TEMPLATES}")


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    msgs = row.get("messages") or []
    if not msgs:
        # An Alpaca-view-only row (e.g. built by hand): derive the conversation.
        user = _join(row.get("instruction", ""), row.get("input", ""))
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    if msgs[-1]["role"] != "assistant":
        raise TemplateError(f"row {row.get('id')}: the last message must be from the assistant")
    return [{"role": m["role"], "content": str(m["content"]).strip()} for m in msgs]


def _join(*parts: str) -> str:
    return "\n\n".join(p.strip() for p in parts if p and p.strip())


def reference(row: dict[str, Any]) -> str:
    """The final assistant message: what a generation is compared against."""
    return _messages(row)[-1]["content"]


def add_special_tokens(template: str) -> bool:
    """Whether to let the tokenizer add its own BOS/EOS specials around the text.

    Chat templates write their own (e.g. a BOS) into the text, so adding them again would
    double them; the other templates rely on the tokenizer's usual BOS, if it has one.
    """
    _check(template)
    return template != "chat_template"


def end_of_turn_token(template: str, tokenizer) -> str:
    """The token that ends an assistant turn and is trained, so generations stop."""
    _check(template)
    if template == "alpaca":
        return tokenizer.eos_token
    if template == "chatml":
        return IM_END
    return _chat_template_eot(tokenizer)


def stop_strings(template: str, tokenizer) -> list[str]:
    """Strings that end a generation (besides the EOS id), for generate(stop_strings=...)."""
    eot = end_of_turn_token(template, tokenizer)
    extra = {
        "alpaca": ["### Instruction:", "### Response:"],
        "chatml": [IM_END, IM_START],
        "chat_template": [],
    }[template]
    out = [eot, *extra]
    if tokenizer.eos_token and tokenizer.eos_token not in out:
        out.append(tokenizer.eos_token)
    return [s for i, s in enumerate(out) if s and s not in out[:i]]


def segments(row: dict[str, Any], template: str, tokenizer) -> Segments:
    """(text, trainable) pieces of the training text of `row` under `template`."""
    _check(template)
    msgs = _messages(row)
    if template == "alpaca":
        return _alpaca(row, msgs, tokenizer)
    if template == "chatml":
        return _chatml(msgs)
    return _chat_template(msgs, tokenizer)


def generation_prompt(row: dict[str, Any], template: str, tokenizer) -> str:
    """Everything before the final assistant response: the text a model continues."""
    segs = segments(row, template, tokenizer)
    # The final response is the last run of trainable pieces; the prompt is what precedes it.
    end = len(segs)
    while end > 0 and not segs[end - 1][1]:
        end -= 1
    while end > 0 and segs[end - 1][1]:
        end -= 1
    return "".join(text for text, _ in segs[:end])


def text(row: dict[str, Any], template: str, tokenizer) -> str:
    """The whole training text (what a per-example pipeline would tokenise)."""
    return "".join(t for t, _ in segments(row, template, tokenizer))


# -- alpaca -------------------------------------------------------------------------------
def instruction_and_context(row: dict[str, Any]) -> tuple[str, str]:
    """(what the final answer responds to, everything before it): a single-turn row's
    instruction and input; for a conversation, the last user message and a transcript of the
    earlier turns ("User: ..." / "Assistant: ..." lines). Alpaca renders these two, and the
    judge and the per-example table show them, so a multi-turn answer is read in context."""
    msgs = _messages(row)
    turns = [m for m in msgs if m["role"] != "system"]
    users = [m for m in turns if m["role"] == "user"]
    if len(turns) == 2 and len(users) == 1 and row.get("instruction"):
        return str(row["instruction"]).strip(), str(row.get("input") or "").strip()
    last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=None)
    instruction = turns[last_user]["content"] if last_user is not None else ""
    before = turns[:last_user] if last_user is not None else turns[:-1]
    return instruction, "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in before)


def _alpaca(row: dict[str, Any], msgs: list[dict[str, str]], tokenizer) -> Segments:
    system = " ".join(m["content"] for m in msgs if m["role"] == "system")
    instruction, context = instruction_and_context(row)
    header = ALPACA_HEADER_INPUT if context else ALPACA_HEADER
    if system:
        header = system + "\n\n"
    segs: Segments = [(header + "### Instruction:\n", False), (instruction, False)]
    if context:
        segs += [("\n\n### Input:\n", False), (context, False)]
    segs += [
        ("\n\n### Response:\n", False),
        (msgs[-1]["content"], True),
        (tokenizer.eos_token, True),
    ]
    return [s for s in segs if s[0]]


# -- chatml -------------------------------------------------------------------------------
def _chatml(msgs: list[dict[str, str]]) -> Segments:
    segs: Segments = []
    for i, m in enumerate(msgs):
        trainable = m["role"] == "assistant"
        segs.append((f"{IM_START}{m['role']}\n", False))
        segs.append((m["content"], trainable))
        segs.append((IM_END, trainable))
        if i < len(msgs) - 1:
            segs.append(("\n", False))
    return [s for s in segs if s[0]]


# -- chat_template ------------------------------------------------------------------------
def _render(tokenizer, msgs: list[dict[str, str]], gen: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template chat_template: the tokenizer has no chat template")
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def _chat_template(msgs: list[dict[str, str]], tokenizer) -> Segments:
    """Split the rendered conversation by rendering its prefixes (each must extend the last)."""
    eot = _chat_template_eot(tokenizer)
    segs: Segments = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, msgs[:i], gen=True)
        full = _render(tokenizer, msgs[: i + 1], gen=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise TemplateError(
                "template chat_template: the tokenizer's chat template does not render "
                "conversations prefix-consistently; use template alpaca or chatml"
            )
        answer = full[len(prompt) :]
        cut = answer.find(eot) + len(eot) if eot and eot in answer else len(answer)
        segs += [(prompt[len(done) :], False), (answer[:cut], True), (answer[cut:], False)]
        done = full
    return [s for s in segs if s[0]]


def _chat_template_eot(tokenizer) -> str:
    """The special token the chat template writes right after an assistant's content."""
    probe = "instructflow-probe"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
    after = _render(tokenizer, msgs, gen=False).split(probe, 1)[-1]
    specials = sorted(set(tokenizer.all_special_tokens), key=len, reverse=True)
    hits = [(after.find(s), s) for s in specials if s and s in after]
    if hits:
        return min(hits)[1]
    return tokenizer.eos_token
