"""augment stage (placeholder until implemented)."""

from instructflow.caching import stage_task


def augment(clean, cfg):
    raise NotImplementedError("the augment stage is not implemented yet")


augment_task = stage_task("augment")(augment)
