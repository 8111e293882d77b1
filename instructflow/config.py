"""The one home of every knob: a pydantic model loaded from YAML plus `--set` overrides.

Every section forbids unknown keys, so a typo fails at start with its key path.
Each stage receives only its own section(s); a section's JSON is part of that stage's cache key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the key path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    # A local file/folder, an http(s) URL, a hub dataset id, or "builtin:demo".
    source: str = "builtin:demo"
    hub_split: str = "train"
    hub_config: str | None = None
    sha256: str | None = Field(default=None, description="pin for URL sources")
    timeout_s: float = Field(default=60.0, gt=0)
    max_bytes: int = Field(default=2_000_000_000, gt=0, description="size cap for URL sources")
    # Rows of the builtin demo dataset (null: all of them, 400).
    demo_rows: int | None = Field(default=None, ge=10)
    demo_seed: int = 0


class ValidateConfig(Section):
    # auto | alpaca | sharegpt | openai | self_instruct | mapping (auto: detected per file)
    format: Literal["auto", "alpaca", "sharegpt", "openai", "self_instruct", "mapping"] = "auto"
    # For format=mapping: canonical field -> source field, e.g. {instruction: instruction,
    # input: context, output: response} for Dolly. Keys other than instruction/input/output/
    # system are copied into the row's meta (e.g. {task: category}).
    field_mapping: dict[str, str] = Field(default_factory=dict)
    min_output_chars: int = Field(default=1, ge=0)
    min_instruction_chars: int = Field(default=1, ge=0)
    max_chars: int = Field(default=20_000, gt=0, description="max characters of a whole row")
    # Outputs that mean "no answer" (case, spaces, <brackets> ignored; '<x' also as a prefix).
    placeholders: list[str] = Field(default_factory=lambda: ["<nooutput>", "<no output>", "n/a"])
    # Inputs that mean "no input": the row is kept with an empty input.
    input_placeholders: list[str] = Field(
        default_factory=lambda: ["<noinput>", "<no input>", "<none>", "n/a", "none"]
    )
    drop_exact_duplicates: bool = True
    # TF-IDF char 5-gram cosine similarity at or above which a later row is dropped; null: off.
    near_duplicate_threshold: float | None = Field(default=0.95, ge=0, le=1)
    # Fail when a file's invalid rows (duplicates not counted) exceed this fraction.
    max_reject_fraction: float = Field(default=0.5, ge=0, le=1)


class AugmentConfig(Section):
    enabled: bool = True
    fraction: float = Field(default=0.1, ge=0, le=1)
    seed: int = 0


class SplitConfig(Section):
    train: float = Field(default=0.85, gt=0, lt=1)
    validation: float = Field(default=0.10, ge=0, lt=1)
    test: float = Field(default=0.05, ge=0, lt=1)
    seed: int = 42
    stratify_by: str | None = None
    decontaminate: bool = True
    decontamination_threshold: float = Field(default=0.9, ge=0, le=1)

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must be 1.0, got {total:.4f}")
        return self


class TokenizeConfig(Section):
    template: Literal["alpaca", "chatml", "chat_template"] = "alpaca"
    max_length: int = Field(default=512, ge=8)
    train_on_inputs: bool = False
    truncation: Literal["drop", "truncate"] = "drop"
    batch_size: int = Field(default=1000, ge=1)
    # auto: ids via tiktoken where it reproduces the tokenizer (checked on a sample of every
    # split, see instructflow.fast_bpe), else the tokenizer's own backend; tokenizers: always
    # the latter.
    engine: Literal["auto", "tokenizers"] = "auto"


class ModelConfig(Section):
    # A hub id, a local directory, or "builtin:tiny".
    name_or_path: str = "builtin:tiny"
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None


class TrainConfig(Section):
    method: Literal["qlora", "lora", "full"] = "qlora"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_dora: bool = False
    learning_rate: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = Field(default=1.0, gt=0)
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = (
        "adamw_torch"
    )
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int = Field(default=-1, description="-1: use epochs")
    # With packing, the examples of a step share one flattened row and attention costs grow
    # with the row's length squared: on CPU 4 examples a row ran ~1.4x faster per useful token
    # than 16. So this is the per-step token budget knob; raise gradient_accumulation_steps
    # for larger effective batches.
    per_device_batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    gradient_checkpointing: bool = False
    packing: bool = True
    save_steps: int = Field(default=50, ge=1)
    save_total_limit: int = Field(default=2, ge=1)
    resume: bool = Field(default=True, description="resume from the work dir's last checkpoint")
    keep_checkpoints: bool = Field(default=False, description="keep them after publishing")
    max_eval_examples: int | None = Field(default=200, ge=1)
    eval_steps: int = Field(default=50, ge=1)
    logging_steps: int = Field(default=5, ge=1)
    early_stopping_patience: int | None = Field(default=None, ge=1)
    seed: int = 42
    nproc: int = Field(default=1, ge=1)
    # Sharding for models that do not fit one GPU (with nproc > 1), passed to the Trainer:
    # fsdp e.g. "full_shard auto_wrap"; deepspeed: path to a DeepSpeed (ZeRO-3) JSON config.
    fsdp: str | None = None
    deepspeed: str | None = None
    merge: bool = False


class EvaluateConfig(Section):
    max_examples: int | None = Field(default=None, ge=1)
    max_new_tokens: int = Field(default=64, ge=1)
    # Rows decoding at once (continuous batching); 64 ran ~10% faster than 32 on CPU.
    batch_size: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = 0
    stop_strings: list[str] = Field(default_factory=list)
    compare_base: bool = True
    # Exact match / ROUGE-L per value of this row column too (metrics em.<value>[_base]);
    # null or a column no row has: off.
    group_by: str | None = "meta.task"
    # BERTScore with this encoder (hub id or local dir of any transformers encoder); null: off.
    semantic_model: str | None = None
    # Multiple-choice benchmarks through lm-evaluation-harness (task names; YAMLs of local
    # tasks in lm_eval_include_path), on both models; []: off.
    lm_eval_tasks: list[str] = Field(default_factory=list)
    lm_eval_include_path: str | None = None
    lm_eval_limit: int | None = Field(default=None, ge=1)
    # MT-Bench-style suite graded by the judge: a JSONL of questions (FastChat format) or
    # "builtin" (instructflow/data/mt_bench_tiny.jsonl); null: off. Needs judge.backend.
    mt_bench: str | None = None


class JudgeConfig(Section):
    backend: Literal["none", "hf", "openai"] = "none"
    mode: Literal["single", "pairwise", "both"] = "both"
    # openai backend: any OpenAI-compatible /v1/chat/completions endpoint.
    base_url: str | None = None
    model: str | None = None
    # The NAME of the environment variable holding the key; the key itself is never stored.
    api_key_env: str | None = None
    # hf backend: a local causal LM (hub id, directory or builtin:tiny).
    hf_model: str = "builtin:tiny"
    timeout_s: float = Field(default=60.0, gt=0)
    max_concurrency: int = Field(default=4, ge=1)
    max_retries: int = Field(default=3, ge=0)
    max_examples: int | None = Field(default=None, ge=1)
    seed: int = 0
    bootstrap_samples: int = Field(default=1000, ge=10)
    # Calibration before grading: test items whose reference is compared with an empty, a
    # wrong and a corrupted answer; below min_calibration (share right) the judge is untrusted.
    calibration_examples: int = Field(default=16, ge=1)
    min_calibration: float = Field(default=0.8, ge=0, le=1)
    # Above this share of failed units (verdicts with no usable reply) the judge is not used.
    max_failure_rate: float = Field(default=0.2, ge=0, le=1)


class RegisterConfig(Section):
    enabled: bool = True
    model_name: str = "instructflow-demo"
    # A usable judge's pairwise win rate must have the LOWER bound of its 95 % bootstrap
    # interval at or above this (vs the base model, or the champion when judged against it).
    min_win_rate: float = Field(default=0.5, ge=0, le=1)
    max_rougeL_drop: float = Field(default=0.02, ge=0)
    max_perplexity_increase: float = Field(default=0.05, ge=0, description="relative")


class TrackingConfig(Section):
    experiment: str = "instructflow"
    # None: sqlite store in the workspace. Otherwise a tracking server URI.
    tracking_uri: str | None = None
    # When tracking_uri is unreachable: fail at start (default), or log to the workspace store.
    on_unreachable: Literal["fail", "local"] = "fail"
    log_system_metrics: bool = True
    min_free_disk_mb: int = Field(default=500, ge=0)


class PipelineConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    register_: RegisterConfig = Field(default_factory=RegisterConfig, alias="register")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def flat(self) -> dict[str, Any]:
        """Flattened `section.key` -> value, for MLflow params and `compare`."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json", by_alias=True))
        return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key path")
    # YAML gives ints, floats, bools, null and lists the way users type them.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _format_error(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{origin}: {loc}: {msg}{more}"


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Load a YAML preset and apply `key.path=value` overrides; raise ConfigError on any problem."""
    tree: dict[str, Any] = {}
    origin = "<defaults>"
    if path is not None:
        origin = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{origin}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"{origin}: not valid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{origin}: top level must be a mapping of sections")
        tree = loaded
    for item in overrides or []:
        keys, value = _parse_override(item)
        _set_path(tree, keys, value)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from None
