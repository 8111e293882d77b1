"""evaluate stage (placeholder until implemented)."""

from instructflow.caching import stage_task


def evaluate(splits, model, base, tokenize_cfg, cfg, judge_cfg):
    raise NotImplementedError("the evaluate stage is not implemented yet")


evaluate_task = stage_task("evaluate")(evaluate)
