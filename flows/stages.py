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
# Helpers shown beside the stages (after the stage named), in the live view and the summary.
SHOWN_HELPERS = {"base_model": "tokenize"}
