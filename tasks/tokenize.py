"""tokenize stage (placeholder until implemented)."""

from instructflow.caching import stage_task


def tokenize(splits, tokenizer, cfg):
    raise NotImplementedError("the tokenize stage is not implemented yet")


tokenize_task = stage_task("tokenize")(tokenize)
