"""register stage (placeholder until implemented)."""

from instructflow.caching import stage_task


def register(model, report, base, cfg):
    raise NotImplementedError("the register stage is not implemented yet")


register_task = stage_task("register")(register)
