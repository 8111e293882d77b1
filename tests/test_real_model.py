"""A real pretrained LLM through the product: SmolLM2-135M-Instruct (builtin:smollm2-135m-instruct,
de-quantised from its GGUF once per test session) answers, trains a few QLoRA steps, serves,
and runs the whole real-model pipeline on a small budget through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from serving import serving
from tokenized_fixtures import write_tokenized

from instructflow import generation, loading, model_specs, templates
from instructflow.builtin import smollm2
from instructflow.config import ModelConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CH07 = ROOT / "instructflow" / "data" / "ch07" / "instruction-data.json"
pytestmark = pytest.mark.slow


def _chat(model, tok, question: str, max_new_tokens: int = 24) -> str:
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    (out,) = generation.generate(
        model,
        tok,
        [prompt],
        max_new_tokens=max_new_tokens,
        stop_tokens=[templates.end_of_turn_token("chat_template", tok)],
        add_special_tokens=False,
    )
    return out


def test_smollm2_is_the_real_model_and_answers(smollm2_dir, smollm2_gguf):
    from transformers import AutoModelForCausalLM

    model, tok, template = model_specs.load_for_inference(smollm2.NAME)
    assert template == "chat_template"
    assert type(model).__name__ == "LlamaForCausalLM" and len(tok) == 49_152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert "Paris" in _chat(model, tok, "What is the capital of France?")
    # The converted folder computes what transformers' own GGUF loading computes.
    direct = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)


def test_qlora_steps_on_smollm2_give_an_adapter_plain_peft_loads(home, smollm2_dir):
    from peft import AutoPeftModelForCausalLM

    from tasks.base_model import prepare_base_model, prepare_tokenizer
    from tasks.train import train

    cfg = ModelConfig(name_or_path=smollm2.NAME)
    tok_ref = prepare_tokenizer(cfg)
    base = prepare_base_model(cfg, tok_ref)
    tok = loading.load_tokenizer(tok_ref)
    rows = json.loads(CH07.read_text())[:40]
    tokenized = write_tokenized({"train": rows[:32], "validation": rows[32:]}, tok, max_length=256)
    train_cfg = TrainConfig(
        method={"name": "qlora", "r": 8, "alpha": 16, "dropout": 0.0},
        learning_rate=1e-3,
        max_steps=3,
        per_device_batch_size=8,
        logging_steps=1,
        save_steps=3,
        eval_steps=3,
        max_eval_examples=8,
    )
    ref = train(tokenized, base, tok_ref, train_cfg)
    losses = [v for _, v in ref.meta["step_metrics"]["loss"]]
    assert len(losses) == 3 and all(0 < v < 10 for v in losses)
    info = json.loads(ref.file("train.json").read_text())
    assert info["method"] == "qlora" and info["base_model"]["kind"] == "gguf"
    adapter_cfg = json.loads(ref.file("adapter/adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(smollm2_dir)

    peft_only = AutoPeftModelForCausalLM.from_pretrained(str(ref.file("adapter")))
    ours, tok = loading.load_finetuned(ref, base)
    plain = loading.load_base_model(base)
    ids = tok("### Instruction:\nName a primary colour.\n\n### Response:\n", return_tensors="pt")
    with torch.no_grad():
        tuned = ours(input_ids=ids.input_ids).logits
        assert torch.allclose(peft_only(input_ids=ids.input_ids).logits, tuned, atol=1e-4)
        assert not torch.allclose(plain(input_ids=ids.input_ids).logits, tuned, atol=1e-3)


def test_serve_streams_smollm2_answers(tmp_path, smollm2_dir):
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 24,
    }
    with serving(tmp_path / "home", smollm2.NAME) as url:
        plain = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        assert plain.status_code == 200
        answer = plain.json()["choices"][0]["message"]["content"]
        assert "Paris" in answer
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=300
        ) as resp:
            events = [ln[6:] for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]]
    assert len([d for d in deltas if d]) > 1 and "".join(deltas) == answer


def test_the_real_model_pipeline_runs_offline_end_to_end(tmp_path, smollm2_dir):
    """`make demo-real`'s config on a small budget: every stage, BERTScore with the real
    MiniLM, SmolLM2 as its own judge (through calibration), the registered model serving."""
    home, summary = tmp_path / "home", tmp_path / "summary.json"
    env = {**os.environ, "INSTRUCTFLOW_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    budget = [
        "train.max_steps=2",
        "train.save_steps=2",
        "train.eval_steps=2",
        "train.max_eval_examples=4",
        "evaluate.max_examples=4",
        "evaluate.max_new_tokens=24",
        "judge.max_examples=2",
        "judge.calibration_examples=2",
    ]
    args = [sys.executable, "-m", "instructflow.cli", "run", "-c", "smollm2-ch07", "--plain"]
    for item in budget:
        args += ["--set", item]
    proc = subprocess.run(
        [*args, "--summary-json", str(summary)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert {s["state"] for s in result["stages"].values()} == {"Completed"}
    m = result["metrics"]
    for name in ("rougeL", "bleu", "perplexity", "bertscore_f1", "exact_match"):
        assert f"evaluate/{name}" in m and f"evaluate/base/{name}" in m, name
    assert result["helpers"]["base_model"]["state"] in ("Completed", "Cached")
    split = json.loads(
        next((home / "artifacts" / "split").glob("*/report.json")).read_text(encoding="utf-8")
    )
    assert split["rows"]["test"] > 100  # the book's 10 %, in file order
    out = proc.stdout
    assert "evaluation on 4 held-out test rows" in out and "BERTScore F1" in out
    assert "judge builtin:smollm2-135m-instruct:" in out  # trusted or not, it says which

    with serving(home, "models:/smollm2-ch07@champion") as url:
        body = {"messages": [{"role": "user", "content": "Name a primary colour."}]}
        resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"].strip()
