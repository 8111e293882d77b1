"""validate stage (placeholder until implemented)."""

from instructflow.caching import stage_task


def validate(raw, cfg):
    raise NotImplementedError("the validate stage is not implemented yet")


validate_task = stage_task("validate")(validate)
