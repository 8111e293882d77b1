"""The fine-tuning DAG. Wiring only: each stage lives in tasks/<stage>.py.

download -> validate -> augment -> split -> tokenize -> train -> evaluate -> register
                               tokenizer (helper) --^  base model (helper) --^--------^
"""

from __future__ import annotations

from prefect import flow

from flows.stages import STAGES
from instructflow.config import load_config
from instructflow.pipeline import PipelineRun
from tasks.augment import augment_task
from tasks.base_model import base_model_task, tokenizer_task
from tasks.download import download_task
from tasks.evaluate import evaluate_task
from tasks.register import register_task
from tasks.split import split_task
from tasks.tokenize import tokenize_task
from tasks.train import train_task
from tasks.validate import validate_task


@flow(name="finetune", log_prints=True, validate_parameters=False)
def finetune(
    config_path: str | None = "configs/demo.yaml",
    overrides: list[str] | None = None,
    until: str | None = None,
) -> dict:
    cfg = load_config(config_path, overrides)
    with PipelineRun(cfg, config_path, until, STAGES) as run:
        raw = run.stage(download_task, cfg.data)
        clean = run.stage(validate_task, raw, cfg.validate_)
        augmented = run.stage(augment_task, clean, cfg.augment)
        splits = run.stage(split_task, augmented, cfg.split)
        tokenizer = run.helper(tokenizer_task, cfg.model)
        tokenized = run.stage(tokenize_task, splits, tokenizer, cfg.tokenize)
        base = run.helper(base_model_task, cfg.model, tokenizer)
        model = run.stage(train_task, tokenized, base, tokenizer, cfg.train)
        report = run.stage(
            evaluate_task, splits, tokenized, model, base, cfg.tokenize, cfg.evaluate, cfg.judge
        )
        run.stage(register_task, model, report, base, cfg.register_)
    return run.summary()
