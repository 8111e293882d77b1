"""The one pydantic config: unknown keys and bad values fail with their key path, overrides
apply, the method shorthand works, and every shipped preset loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from instructflow.config import ConfigError, load_config


def test_config_rejects_unknown_key_with_its_path(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("split:\n  seeed: 3\n")
    with pytest.raises(ConfigError, match=r"split\.seeed: unknown key"):
        load_config(cfg)


def test_config_rejects_bad_value_and_applies_overrides(tmp_path):
    with pytest.raises(ConfigError, match=r"tokenize\.max_length"):
        load_config(None, ["tokenize.max_length=-3"])
    cfg = load_config(None, ["split.seed=7", "train.method=lora", "judge.backend=none"])
    assert cfg.split.seed == 7 and cfg.train.method.name == "lora"
    with pytest.raises(ConfigError, match="must be 1.0"):
        load_config(None, ["split.train=0.5"])


def test_training_method_is_a_tagged_union_with_a_shorthand():
    assert load_config(None, []).train.method.name == "qlora"
    m = load_config(None, ["train.method=dora", "train.method.r=8"]).train.method
    assert (m.name, m.r) == ("dora", 8)
    assert load_config(None, ["train.method.alpha=4"]).train.method.alpha == 4  # the default's
    with pytest.raises(ConfigError, match=r"train\.method\.r: unknown key for method 'full'"):
        load_config(None, ["train.method=full", "train.method.r=2"])
    with pytest.raises(ConfigError, match="'lora', 'qlora', 'dora', 'full'"):
        load_config(None, ["train.method=adapterx"])


def test_every_shipped_config_loads():
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def _error(path, overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("split:\n  seeed: 3\n", "split.seeed: unknown key (did you mean 'seed'?)"),
        ("trian:\n  epochs: 2\n", "trian: unknown key (did you mean 'train'?)"),
        ("validate:\n  formt: auto\n", "validate.formt: unknown key (did you mean 'format'?)"),
        ("split:\n  zzz: 1\n", "split.zzz: unknown key"),
        (
            "train:\n  method: {name: qlora, rr: 8}\n",
            "train.method.rr: unknown key for method 'qlora' (did you mean 'r'?)",
        ),
        (
            "train:\n  method: {name: lora, alpah: 8}\n",
            "train.method.alpah: unknown key for method 'lora' (did you mean 'alpha'?)",
        ),
        ("train:\n  method: qlroa\n", "'adapter' (did you mean 'qlora'?)"),
    ],
)
def test_an_unknown_name_gets_the_closest_valid_one(tmp_path, yaml_text, expected):
    cfg = tmp_path / "x.yaml"
    cfg.write_text(yaml_text)
    msg = _error(cfg, [])
    assert msg.startswith(f"{cfg}: ") and msg.endswith(expected), msg


def test_the_union_tag_is_not_shown_in_the_key_path():
    msg = _error(None, ["train.method.rr=3"])
    assert msg == (
        "--set train.method.rr=3: train.method.rr: unknown key for method 'qlora' "
        "(did you mean 'r'?)"
    )


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "blamed", "where"),
    [
        # The value itself came from --set, with or without a file.
        ("", ["tokenize.max_length=-3"], "--set tokenize.max_length=-3", "tokenize.max_length"),
        (
            "tokenize: {max_length: 64}\n",
            ["tokenize.max_length=-3"],
            "--set tokenize.max_length=-3",
            "tokenize.max_length",
        ),
        ("split: {seed: 1}\n", ["split.seeed=4"], "--set split.seeed=4", "split.seeed"),
        # The file's own bad value, with an unrelated override beside it.
        ("tokenize: {max_length: -3}\n", [], "FILE", "tokenize.max_length"),
        ("tokenize: {max_length: -3}\n", ["split.seed=3"], "FILE", "tokenize.max_length"),
        ("split: {train: 0.5}\n", ["split.seed=3"], "FILE", "split"),
        # Bad values both in the file and in an override at the same key: the override's wins.
        (
            "tokenize: {max_length: -3}\n",
            ["tokenize.max_length=-5"],
            "--set tokenize.max_length=-5",
            "tokenize.max_length",
        ),
        # An override that broke a value it did not set.
        ("split: {train: 0.85}\n", ["split.train=0.5"], "--set split.train=0.5", "split"),
        (
            "train: {method: {name: qlora, r: 4}}\n",
            ["split.seed=1", "train.method.name=full"],
            "--set train.method.name=full",
            "train.method.r",
        ),
    ],
)
def test_an_error_is_blamed_on_where_the_bad_value_came_from(
    tmp_path, yaml_text, overrides, blamed, where
):
    cfg = None
    if yaml_text:
        cfg = tmp_path / "x.yaml"
        cfg.write_text(yaml_text)
    msg = _error(cfg, overrides)
    assert msg.startswith(f"{str(cfg) if blamed == 'FILE' else blamed}: {where}: "), msg


def test_an_override_may_repair_the_file(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("tokenize: {max_length: -3}\n")
    assert load_config(cfg, ["tokenize.max_length=64"]).tokenize.max_length == 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("data:\n  source: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper than 32"),
        ("".join(f"{'  ' * i}k{i}:\n" for i in range(200)) + "  " * 200 + "x: 1\n", "(line 32)"),
        ("validate: {field_mapping: {a: " + "{b: " * 500 + "1" + "}" * 501 + "}\n", "deeper"),
        ("# padding\n" * 150_000 + "split: {seed: 1}\n", "bytes; a config is at most 1000000"),
    ],
    ids=["deep-flow", "deep-block", "deep-mapping", "too-big"],
)
def test_deep_or_huge_yaml_is_one_line_naming_the_file(tmp_path, text, expected):
    cfg = tmp_path / "deep.yaml"
    cfg.write_text(text)
    msg = _error(cfg, [])
    assert msg.startswith(f"{cfg}: ") and expected in msg and "\n" not in msg, msg[:300]
    assert len(msg) < 300


def test_deep_override_value_or_key_path_is_one_line():
    msg = _error(None, ["data.source=" + "[" * 50_000 + "]" * 50_000])
    assert msg.startswith("--set data.source: the value is nested deeper than 32"), msg[:200]
    msg = _error(None, [".".join(["a"] * 10_000) + "=1"])
    assert msg.startswith("--set a.a.") and "deeper than 32 keys" in msg and len(msg) < 200
