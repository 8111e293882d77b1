"""The DAG's stages in order: the one list the flow, the pipeline, the CLI and the tests use.

Kept apart from flows/finetune.py (which imports every stage) so the CLI can check `--until`
and draw its table without importing torch and transformers.
"""

STAGES = (
    "download",
    "validate",
    "augment",
    "split",
    "tokenize",
    "train",
    "evaluate",
    "register",
)
# Knowledge distillation (`distill.enabled`): after evaluate, the student and its report;
# the student is registered after the teacher.
DISTILL_STAGES = ("teacher_logits", "distill", "distill_baseline", "distill_report")
ALL_STAGES = (
    *STAGES[:2],
    "mix",
    "augment",
    "synthesize",
    *STAGES[3:-1],
    *DISTILL_STAGES,
    "register",
    "register_student",
)
# Helpers shown beside the stages (after the stage named), in the live view and the summary.
SHOWN_HELPERS = {"base_model": "tokenize", "student_base": "teacher_logits"}


def stages_for(
    distill: bool, sources: tuple[str, ...] = (), synthesize: bool = False
) -> tuple[str, ...]:
    """The stages a run goes through: the default DAG, with distillation, with several
    `data.sources` (download/<name> and validate/<name> per source, then mix) and with
    model-made rows (synthesize)."""
    optional = {"mix": bool(sources), "synthesize": synthesize}
    if not distill:
        optional.update({s: False for s in (*DISTILL_STAGES, "register_student")})
    stages = tuple(s for s in ALL_STAGES if optional.get(s, True))
    if not sources:
        return stages
    per_source = tuple(f"{stage}/{name}" for name in sources for stage in STAGES[:2])
    return (*per_source, *stages[2:])


def is_stage(name: str) -> bool:
    """A DAG stage (per-source ones included), not a helper."""
    return name in ALL_STAGES or name.split("/", 1)[0] in STAGES[:2]
