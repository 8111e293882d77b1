"""The DAG's stages in order: the one list the flow, the pipeline, the CLI and the tests use.

Kept apart from flows/finetune.py (which imports every stage) so the CLI can check `--until`
and draw its table without importing torch and transformers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One stage of the DAG. `per_source`: with several `data.sources` it runs once per source
    (download/<name>); `only_with`: the option that adds it (None: every run has it)."""

    name: str
    per_source: bool = False
    only_with: str | None = None  # "sources" | "synthesize" | "distill"


# In run order. A new stage is one record here (and its task in flows/finetune.py).
PIPELINE = (
    Stage("download", per_source=True),
    Stage("validate", per_source=True),
    Stage("mix", only_with="sources"),
    Stage("augment"),
    Stage("synthesize", only_with="synthesize"),
    Stage("split"),
    Stage("tokenize"),
    Stage("train"),
    Stage("evaluate"),
    # Knowledge distillation (`distill.enabled`): after evaluate, the student and its report;
    # the student is registered after the teacher.
    Stage("teacher_logits", only_with="distill"),
    Stage("distill", only_with="distill"),
    Stage("distill_baseline", only_with="distill"),
    Stage("distill_report", only_with="distill"),
    Stage("register"),
    Stage("register_student", only_with="distill"),
)
ALL_STAGES = tuple(s.name for s in PIPELINE)
STAGES = tuple(s.name for s in PIPELINE if s.only_with is None)  # the default DAG
DISTILL_STAGES = tuple(
    s.name for s in PIPELINE if s.only_with == "distill" and s.name != "register_student"
)
PER_SOURCE = tuple(s.name for s in PIPELINE if s.per_source)

# Helpers shown beside the stages (after the stage named), in the live view and the summary.
SHOWN_HELPERS = {"base_model": "tokenize", "student_base": "teacher_logits"}


def stages_for(
    distill: bool, sources: tuple[str, ...] = (), synthesize: bool = False
) -> tuple[str, ...]:
    """The stages a run goes through: the default DAG, with distillation, with several
    `data.sources` (download/<name> and validate/<name> per source, then mix) and with
    model-made rows (synthesize)."""
    options = {None: True, "sources": bool(sources), "synthesize": synthesize, "distill": distill}
    if not sources:
        return tuple(s.name for s in PIPELINE if options[s.only_with])
    per_source = tuple(f"{stage}/{name}" for name in sources for stage in PER_SOURCE)
    rest = tuple(s.name for s in PIPELINE if not s.per_source and options[s.only_with])
    return (*per_source, *rest)


def is_stage(name: str) -> bool:
    """A DAG stage (per-source ones included), not a helper."""
    return name in ALL_STAGES or name.split("/", 1)[0] in PER_SOURCE
