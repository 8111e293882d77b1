"""train stage (placeholder until implemented)."""

from instructflow.caching import stage_task


def train(tokenized, base, tokenizer, cfg):
    raise NotImplementedError("the train stage is not implemented yet")


train_task = stage_task("train")(train)
