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
ALL_STAGES = (*STAGES[:-1], *DISTILL_STAGES, "register", "register_student")
# Helpers shown beside the stages (after the stage named), in the live view and the summary.
SHOWN_HELPERS = {"base_model": "tokenize", "student_base": "teacher_logits"}


def stages_for(distill: bool) -> tuple[str, ...]:
    """The stages a run goes through: the default DAG, or with distillation."""
    return ALL_STAGES if distill else STAGES
