"""split stage (placeholder until implemented)."""

from instructflow.caching import stage_task


def split(augmented, cfg):
    raise NotImplementedError("the split stage is not implemented yet")


split_task = stage_task("split")(split)
