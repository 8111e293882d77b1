"""base model + tokenizer preparation (placeholder until implemented)."""

from instructflow.caching import stage_task


def prepare_tokenizer(cfg):
    raise NotImplementedError("tokenizer preparation is not implemented yet")


def prepare_base_model(cfg, tokenizer):
    raise NotImplementedError("base model preparation is not implemented yet")


tokenizer_task = stage_task("tokenizer", cache=False)(prepare_tokenizer)
base_model_task = stage_task("base_model", cache=False)(prepare_base_model)
