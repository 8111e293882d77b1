"""Config bounds: every numeric knob finite and never a boolean, counts capped (the cap named),
train.max_steps -1 or >= 1, required strings not blank, an empty config file an error; and the
shipped presets and the defaults still load."""

from __future__ import annotations

import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from instructflow.config import ConfigError, PipelineConfig, QLoraMethod, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
# Knobs without an upper bound on purpose: a huge value is how users switch them off.
UNCAPPED = {"train.max_grad_norm", "register.max_perplexity_increase"}


def _base_types(annotation) -> list:
    if get_origin(annotation) in (Union, UnionType):
        return [t for arg in get_args(annotation) for t in _base_types(arg)]
    if get_origin(annotation) is Annotated:
        return _base_types(get_args(annotation)[0])
    return [annotation]


def _numeric(model, prefix: str) -> list[str]:
    return [
        f"{prefix}.{name}"
        for name, field in model.model_fields.items()
        if {int, float} & set(_base_types(field.annotation))
    ]


def numeric_keys() -> list[str]:
    """Every int/float knob as users write its key path (the LoRA method's knobs included)."""
    keys = []
    for name, section in PipelineConfig.model_fields.items():
        if isinstance(section.annotation, type) and issubclass(section.annotation, BaseModel):
            keys += _numeric(section.annotation, section.alias or name)  # not `engine`
    return keys + _numeric(QLoraMethod, "train.method")


NUMERIC = numeric_keys()


def error_of(overrides: list[str], path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_numeric_knobs_are_all_found():
    # Guards the introspection the tests below rely on.
    assert len(NUMERIC) > 40
    assert {"split.train", "train.max_steps", "train.method.r", "judge.timeout_s"} <= set(NUMERIC)


@pytest.mark.parametrize("key", NUMERIC)
def test_nan_has_its_own_message(key):
    assert error_of([f"{key}=.nan"]) == f"--set {key}=.nan: {key}: is NaN; give a number"


@pytest.mark.parametrize("key", NUMERIC)
@pytest.mark.parametrize("value", [".inf", "-.inf", "1e999"])
def test_infinity_is_refused(key, value):
    assert error_of([f"{key}={value}"]).endswith(f": {key}: is infinite; give a finite number")


@pytest.mark.parametrize("key", NUMERIC)
@pytest.mark.parametrize("value", ["true", "false", "yes"])
def test_a_boolean_is_not_a_number(key, value):
    expected = "true" if value in ("true", "yes") else "false"
    assert error_of([f"{key}={value}"]).endswith(f": {key}: expected a number, got {expected}")


@pytest.mark.parametrize("key", sorted(set(NUMERIC) - UNCAPPED))
def test_every_numeric_knob_is_capped_and_names_the_cap(key):
    msg = error_of([f"{key}={10**15}"])
    assert re.search(rf": {re.escape(key)}: Input should be less than (or equal to )?\d", msg), msg


@pytest.mark.parametrize("key", sorted(UNCAPPED))
def test_switch_off_knobs_take_huge_values(key):
    load_config(None, [f"{key}={10**15}"])


@pytest.mark.parametrize(
    ("override", "key", "phrase"),
    [
        # The case: NaN was reported as "less than 1".
        ("split.train=nan", "split.train", "is NaN"),
        ("train.epochs=-.inf", "train.epochs", "is infinite"),
        ("train.max_steps=0", "train.max_steps", "must be -1 (train for `epochs`) or at least 1"),
        ("train.max_steps=-2", "train.max_steps", "or at least 1, got -2"),
        ("train.max_steps=-5", "train.max_steps", "or at least 1, got -5"),
        ("train.max_steps=true", "train.max_steps", "expected a number, got true"),
        ("train.max_steps=10000001", "train.max_steps", "less than or equal to 10000000"),
        ("tokenize.max_length=1048577", "tokenize.max_length", "less than or equal to 1048576"),
        ("data.demo_rows=100001", "data.demo_rows", "less than or equal to 100000"),
        ("train.per_device_batch_size=65537", "train.per_device_batch_size", "to 65536"),
        ("evaluate.max_new_tokens=32769", "evaluate.max_new_tokens", "to 32768"),
        ("evaluate.batch_size=65537", "evaluate.batch_size", "to 65536"),
        ("train.nproc=1025", "train.nproc", "to 1024"),
        ("evaluate.temperature=100.5", "evaluate.temperature", "to 100"),
        ("train.learning_rate=11", "train.learning_rate", "to 10"),
        ("train.epochs=10001", "train.epochs", "to 10000"),
        ("judge.max_concurrency=257", "judge.max_concurrency", "to 256"),
        ("data.timeout_s=86401", "data.timeout_s", "to 86400"),
        ("judge.timeout_s=86401", "judge.timeout_s", "to 86400"),
        ("train.save_steps=10000001", "train.save_steps", "to 10000000"),
        ("train.eval_steps=10000001", "train.eval_steps", "to 10000000"),
        ("train.logging_steps=10000001", "train.logging_steps", "to 10000000"),
        ("train.max_eval_examples=10000001", "train.max_eval_examples", "to 10000000"),
        ("evaluate.lm_eval_limit=10000001", "evaluate.lm_eval_limit", "to 10000000"),
        ("judge.bootstrap_samples=1000001", "judge.bootstrap_samples", "to 1000000"),
        ("judge.calibration_examples=100001", "judge.calibration_examples", "to 100000"),
        ("judge.max_retries=101", "judge.max_retries", "to 100"),
        ("register.max_rougeL_drop=2", "register.max_rougeL_drop", "to 1"),
        ("split.seed=-1", "split.seed", "greater than or equal to 0"),
        ("train.seed=2147483648", "train.seed", "to 2147483647"),
        ("data.source=", "data.source", "is empty; give a value"),
        ("data.source='   '", "data.source", "is empty; give a value"),
        ("data.hub_split=''", "data.hub_split", "is empty; give a value"),
        ("model.name_or_path=''", "model.name_or_path", "is empty; give a value"),
        ("register.model_name=' '", "register.model_name", "is empty; give a value"),
        ("tracking.experiment=''", "tracking.experiment", "is empty; give a value"),
        ("judge.hf_model=''", "judge.hf_model", "is empty; give a value"),
        ("validate.field_mapping={output: ''}", "validate.field_mapping.output", "is empty"),
        ("evaluate.lm_eval_tasks=['']", "evaluate.lm_eval_tasks.0", "is empty"),
        ("data.hub_config=''", "data.hub_config", "or null to leave it unset"),
        ("model.revision=' '", "model.revision", "or null to leave it unset"),
        ("evaluate.group_by=''", "evaluate.group_by", "or null to leave it unset"),
        ("judge.base_url=''", "judge.base_url", "or null to leave it unset"),
        ("tracking.tracking_uri=''", "tracking.tracking_uri", "or null to leave it unset"),
        ("evaluate.stop_strings=['']", "evaluate.stop_strings.0", "end every answer at once"),
        ("train.method.target_modules=[]", "train.method.target_modules", "give 'all-linear'"),
        ("data.sha256=abc123", "data.sha256", "must be 64 hex digits"),
        ("validate.min_output_chars=30000", "validate", "above max_chars (20000)"),
        ("train.method=null", "train.method", "give a method name ('lora', 'qlora'"),
        ("data=null", "data", "is empty; give its keys"),
    ],
)
def test_bad_value_is_refused_with_its_key_and_reason(override, key, phrase):
    msg = error_of([override])
    assert msg.startswith(f"--set {override}: {key}: "), msg
    assert phrase in msg


@pytest.mark.parametrize(
    "override",
    [
        "train.max_steps=-1",
        "train.max_steps=1",
        "tokenize.max_length=1048576",
        "data.demo_rows=100000",
        "evaluate.temperature=100",
        "judge.max_concurrency=256",
        "train.seed=2147483647",
        "evaluate.stop_strings=['\\n', ' ']",  # whitespace is a real stop string
        "evaluate.group_by=null",
        "data.sha256=" + "aB" * 32,
        "tokenize.max_length='512'",  # quoted numbers still read as numbers
    ],
)
def test_values_at_the_edges_still_load(override):
    load_config(None, [override])


def test_a_yaml_boolean_in_a_file_is_blamed_on_the_file(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("train:\n  max_steps: true\n")
    assert error_of([], cfg) == f"{cfg}: train.max_steps: expected a number, got true"


@pytest.mark.parametrize("text", ["", "   \n\n", "# only a comment\n# and another\n", "---\n"])
def test_an_empty_config_file_is_an_error_naming_it(tmp_path, text):
    cfg = tmp_path / "x.yaml"
    cfg.write_text(text)
    assert error_of([], cfg) == (
        f"{cfg}: the file is empty (or only comments); give at least one section, "
        "or {} for all defaults"
    )


def test_no_file_and_an_explicit_empty_mapping_mean_all_defaults(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("{}\n")
    assert load_config(None) == load_config(cfg) == PipelineConfig()


def test_the_defaults_meet_every_rule():
    # pydantic does not validate defaults: validate them as if a user had typed them.
    dumped = PipelineConfig().model_dump(by_alias=True)
    assert PipelineConfig.model_validate(dumped) == PipelineConfig()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_still_loads(path):
    cfg = load_config(path)
    assert PipelineConfig.model_validate(cfg.model_dump(by_alias=True)) == cfg
