r"""The fine-tuning DAG. Wiring only: each stage lives in tasks/<stage>.py.

download -> validate -> augment -> split -> tokenize -> train -> evaluate -> register
                               tokenizer (helper) --^  base model (helper) --^--------^
With several data.sources, per source download/<name> -> validate/<name>, then
    mix (all sources, by weight) -> augment -> ...
With synthesize.enabled: augment -> synthesize (LLM-made rows) -> split.
With distill.enabled, after evaluate (student base: a helper):
    teacher_logits -> distill (student) --------> distill_report -> register_student
                  \-> distill_baseline (alpha 0) --^
"""

from __future__ import annotations

from prefect import flow

from flows.stages import stages_for
from instructflow.config import load_config
from instructflow.pipeline import PipelineRun
from tasks.augment import augment_task
from tasks.base_model import base_model_task, student_base_task, tokenizer_task
from tasks.distill import distill_task
from tasks.distill_report import distill_report_task
from tasks.download import download_task
from tasks.evaluate import evaluate_task
from tasks.mix import mix_plan, mix_task
from tasks.register import register_task
from tasks.split import split_task
from tasks.synthesize import synthesize_task
from tasks.teacher_logits import teacher_logits_task
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
    kd = cfg.distill
    names = tuple(s.name for s in cfg.data.sources)
    stages = stages_for(kd.enabled, names, cfg.synthesize.enabled)
    with PipelineRun(cfg, config_path, until, stages) as run:
        if cfg.data.sources:
            validated = {}
            for src in cfg.data.sources:
                raw = run.stage(
                    download_task, src.spec(), f"download/{src.name}", name=f"download/{src.name}"
                )
                validated[src.name] = run.stage(
                    validate_task, raw, src.validate_config(cfg.validate_),
                    f"validate/{src.name}", name=f"validate/{src.name}", ray=cfg.ray_engine(),
                )  # fmt: skip
            clean = run.stage(mix_task, validated, mix_plan(cfg.data.sources), cfg.data.mix)
        else:
            raw = run.stage(download_task, cfg.data.spec())
            clean = run.stage(validate_task, raw, cfg.validate_, ray=cfg.ray_engine())
        augmented = run.stage(augment_task, clean, cfg.augment)
        if cfg.synthesize.enabled:
            augmented = run.stage(synthesize_task, augmented, cfg.synthesize, cfg.validate_)
        splits = run.stage(split_task, augmented, cfg.split)
        tokenizer = run.helper(tokenizer_task, cfg.model)
        tokenized = run.stage(tokenize_task, splits, tokenizer, cfg.tokenize, ray=cfg.ray_engine())
        base = run.helper(base_model_task, cfg.model, tokenizer)
        model = run.stage(train_task, tokenized, base, tokenizer, cfg.train)
        report = run.stage(
            evaluate_task, splits, tokenized, model, base, cfg.tokenize, cfg.evaluate, cfg.judge
        )
        if kd.enabled:
            # A teacher named in the config does not depend on this run's model.
            own = (model, base) if kd.teacher.model is None else (None, None)
            student_base = run.helper(student_base_task, kd.student, tokenizer)
            logits = run.stage(teacher_logits_task, tokenized, *own, tokenizer, kd.teacher)
            student = run.stage(
                distill_task, tokenized, logits, student_base, tokenizer, kd.train, kd.alpha,
                kd.temperature,
            )  # fmt: skip
            baseline = None
            if kd.baseline:
                baseline = run.stage(
                    distill_task, tokenized, None, student_base, tokenizer, kd.train, 0.0, None,
                    name="distill_baseline",
                )  # fmt: skip
            compression = run.stage(
                distill_report_task, splits, tokenized, student, baseline, student_base, *own,
                kd.teacher, cfg.tokenize, cfg.evaluate,
            )  # fmt: skip
        run.stage(register_task, model, report, base, cfg.register_)
        if kd.enabled:
            student_register = kd.register_config(cfg.register_)
            run.stage(
                register_task, student, compression, student_base, student_register,
                "register_student", name="register_student",
            )  # fmt: skip
    return run.summary()
