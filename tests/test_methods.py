"""Every training method of the lecture (full, LoRA, QLoRA, DoRA, IA3, bottleneck adapters,
prompt tuning, prefix tuning) on the pre-trained built-in model: it trains and its loss falls,
the saved model reloads with its own library's loader to identical logits, generation keeps
virtual tokens, checkpoints resume, and evaluate, register, serve and `generate` all run."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from evaluate_fixtures import canonical_rows, make_inputs
from tokenized_fixtures import write_tokenized

from instructflow import demo_data, generation, loading, model_specs, registry, templates
from instructflow.config import (
    EvaluateConfig,
    JudgeConfig,
    ModelConfig,
    RegisterConfig,
    TokenizeConfig,
    TrainConfig,
)
from instructflow.training import bottleneck, methods, trainer
from instructflow.training.stage import TrainError
from tasks.base_model import prepare_base_model, prepare_tokenizer
from tasks.train import train

ALL_METHODS = list(methods.METHODS)
# Knobs for a 16-step test: a low rank, and a rate full fine-tuning does not diverge at.
TEST_KNOBS = {
    "lora": {"r": 4, "alpha": 8},
    "qlora": {"r": 4, "alpha": 8},
    "dora": {"r": 4, "alpha": 8},
    "full": {"learning_rate": 3e-4},
}
QUESTION = "What is the capital of Japan?"


@pytest.fixture
def inputs(home):
    tok_ref = prepare_tokenizer(ModelConfig())
    base = prepare_base_model(ModelConfig(), tok_ref)
    tok = loading.load_tokenizer(tok_ref)
    rows = demo_data.generate(80, seed=3)
    # 16 training rows, 4 a step: steps 1-4 and 13-16 are whole epochs, so their loss sums
    # compare the same data before and after training (single batches vary too much).
    tokenized = write_tokenized({"train": rows[:16], "validation": rows[64:]}, tok, max_length=64)
    return tokenized, base, tok_ref


def _cfg(method: str, **kw) -> TrainConfig:
    base = dict(
        method={"name": method, **TEST_KNOBS.get(method, {})},
        max_steps=16,
        per_device_batch_size=4,
        logging_steps=1,
        save_steps=8,
        eval_steps=8,
        max_eval_examples=4,
        warmup_ratio=0.0,
        learning_rate=3e-3,  # for the adapter; the prompt-like methods bring their own
    )
    return TrainConfig(**{**base, **kw})


def alpaca_prompt(question: str, tok) -> str:
    row = {"instruction": question, "input": "", "output": ""}
    return templates.generation_prompt(row, "alpaca", tok)


def greedy_by_full_forward(model, tok, prompt: str, n: int) -> str:
    """Reference decode: the whole sequence through the model's own forward each step (PEFT
    puts the virtual tokens in front exactly as in training), no KV cache."""
    ids, out = tok(prompt)["input_ids"], []
    for _ in range(n):
        with torch.no_grad():
            t = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        out.append(t)
        ids = ids + [t]
        if t == tok.eos_token_id:
            break
    return generation.cut_at_stop(tok.decode(out), [tok.eos_token])


def library_loader(out: Path):
    """The trained model as its own library loads it, from the artifact's folder alone."""
    from transformers import AutoModelForCausalLM

    if (out / "model").is_dir():  # full fine-tuning: a plain transformers model
        return AutoModelForCausalLM.from_pretrained(str(out / "model"))
    adapter_dir = out / "adapter"
    if bottleneck.is_bottleneck(adapter_dir):
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
        return bottleneck.load(base, adapter_dir)
    from peft import AutoPeftModelForCausalLM

    return AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_once(model_spec: str, question: str) -> str:
    """One chat request to `instructflow serve`'s app on a real loopback port."""
    import uvicorn

    from instructflow import server

    chat = server.load_chat_model(model_spec, max_tokens=8)
    port = _free_port()
    # log_config=None: uvicorn's dictConfig would shut down every logging handler of the
    # process, pytest's capture handlers included (pytest then loses sys.stderr).
    config = uvicorn.Config(server.create_app(chat), host="127.0.0.1", port=port, log_config=None)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": 8}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        return reply.json()["choices"][0]["message"]["content"]
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_method_trains_reloads_and_runs_through_every_stage(method, inputs, capsys):
    from tasks.evaluate import evaluate
    from tasks.register import register

    tokenized, base, tok_ref = inputs
    ref = train(tokenized, base, tok_ref, _cfg(method))
    info = json.loads(ref.file("train.json").read_text())
    entry = methods.get(method)

    curve = [v for _, v in info["step_metrics"]["loss"]]
    assert len(curve) == 16
    assert sum(curve[-4:]) < sum(curve[:4]), curve  # it learns
    m = info["metrics"]
    plain = loading.load_base_model(base).eval()
    if entry.saves_adapter:
        assert 0 < m["trainable_parameters"] < 0.2 * m["total_parameters"]
        # The base's own count, whether its weights are stored in 4 bits or not.
        assert m["total_parameters"] == sum(p.numel() for p in plain.parameters())
    else:
        assert m["trainable_parameters"] == m["total_parameters"]
    assert m["trainable_percent"] == pytest.approx(
        100 * m["trainable_parameters"] / m["total_parameters"]
    )
    assert m["saved_bytes"] > 0 and m["peak_memory_bytes"] > 0
    # Virtual tokens would be shared by every example of a packed row: padded batches instead.
    assert info["packing"] == ("flattened" if entry.packing else "padded")
    if entry.saves_adapter:
        card = ref.file("adapter/README.md").read_text()
        assert f"# {method} adapter" in card
        assert ("bottleneck.load" in card) == (entry.attach is not None)

    # Its own library's loader, from the folder alone, gives the logits our loader gives,
    # and they are not the base's: the adapter is in the forward pass.
    model, tok = loading.load_finetuned(ref, base)
    own = library_loader(Path(ref.path)).eval()
    ids = tok(alpaca_prompt(QUESTION, tok), return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs, bare = (
            x(input_ids=ids).logits[:, -ids.shape[1] :] for x in (model, own, plain)
        )
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, bare, atol=1e-3)

    # Batched generation (KV cache, continuous batching, shared prefixes) answers what the
    # model's own full forward answers: virtual tokens included, never the bare base.
    questions = (QUESTION, "Name the largest planet.", "Who wrote Hamlet?")
    prompts = [alpaca_prompt(q, tok) for q in questions]
    batched = generation.generate(model, tok, prompts, max_new_tokens=10, batch_size=2)
    assert batched == [greedy_by_full_forward(model, tok, p, 10) for p in prompts]
    # The hf judge's next-token log-probabilities see the same model (virtual tokens too).
    logprobs = generation.next_token_logprobs(model, tok, prompts, [5, 6, 7])
    for row, p in zip(logprobs, prompts, strict=True):
        with torch.no_grad():
            last = model(input_ids=torch.tensor([tok(p)["input_ids"]])).logits[0, -1]
        assert torch.allclose(row, last.float().log_softmax(-1)[[5, 6, 7]], atol=1e-4)
    if hasattr(model, "disable_adapter"):  # evaluate's base pass: the adapter really off
        with model.disable_adapter():
            off = generation.generate(model, tok, prompts, max_new_tokens=10, batch_size=2)
        assert off == generation.generate(plain, tok, prompts, max_new_tokens=10, batch_size=2)

    # evaluate: figures on the fine-tuned model, which differ from the base's.
    splits, test_tok = make_inputs(canonical_rows(6), tok_ref, max_length=64)
    report = evaluate(
        splits,
        test_tok,
        ref,
        base,
        TokenizeConfig(template="alpaca", max_length=64),
        EvaluateConfig(max_new_tokens=8),
        JudgeConfig(backend="none"),
    )
    figures = json.loads(report.file("report.json").read_text())["metrics"]
    assert figures["perplexity"] != pytest.approx(figures["perplexity_base"])

    # register: the pyfunc reloads from the registry to identical logits.
    name = f"methods-{method.replace('_', '-')}"
    register(ref, report, base, RegisterConfig(model_name=name))
    reg_model, reg_tok, _ = model_specs.load_for_inference(f"models:/{name}@champion")
    with torch.no_grad():
        reloaded = reg_model(input_ids=ids).logits[:, -ids.shape[1] :]
    assert torch.allclose(ours, reloaded, atol=1e-5)

    # generate (CLI) and serve (a real loopback server) answer as the trained model does.
    from instructflow.cli import main

    expected = registry.generate(model, tok, "alpaca", QUESTION, max_new_tokens=8)
    capsys.readouterr()
    assert main(["generate", "--model", ref.path, QUESTION, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == expected
    assert _serve_once(ref.path, QUESTION) == expected


@pytest.mark.parametrize("method", ["prompt_tuning", "adapter"])
def test_method_checkpoints_resume(method, inputs, tmp_path):
    """A second run on the same work dir resumes from the last checkpoint (the Trainer saves
    PEFT prompt encoders and bottleneck adapters differently from LoRA)."""
    tokenized, base, tok_ref = inputs
    spec = {
        "tokenized": tokenized.path,
        "base": base.model_dump(),
        "tokenizer": tok_ref.path,
        "work": str(tmp_path / "work"),
    }
    first = _cfg(method, max_steps=4, save_steps=2, eval_steps=2)
    trainer.run_training({**spec, "cfg": first.model_dump(mode="json"), "out": str(tmp_path / "a")})
    longer = _cfg(method, max_steps=6, save_steps=2, eval_steps=2)
    trainer.run_training(
        {**spec, "cfg": longer.model_dump(mode="json"), "out": str(tmp_path / "b")}
    )
    metrics = json.loads((tmp_path / "b" / "train.json").read_text())["metrics"]
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 6


def test_merge_is_refused_in_one_line_for_methods_that_cannot_merge(inputs):
    tokenized, base, tok_ref = inputs
    for method in ("prompt_tuning", "prefix_tuning", "adapter"):
        with pytest.raises(TrainError, match=f"method {method} cannot be merged"):
            train(tokenized, base, tok_ref, _cfg(method, merge=True))


def test_ia3_merges_into_the_base(inputs):
    from transformers import AutoModelForCausalLM

    tokenized, base, tok_ref = inputs
    ref = train(tokenized, base, tok_ref, _cfg("ia3", max_steps=4, merge=True))
    peft_model, tok = loading.load_finetuned(ref, base)
    merged = AutoModelForCausalLM.from_pretrained(str(ref.file("merged")))
    ids = tok("What is the capital of Japan?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(
            peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4
        )


def test_method_knobs_reach_the_library_configs():
    pt = TrainConfig(method={"name": "prompt_tuning", "num_virtual_tokens": 8, "init": "random"})
    assert methods.get("prompt_tuning").peft_config(pt.method, "").num_virtual_tokens == 8
    prefix = TrainConfig(method={"name": "prefix_tuning", "prefix_projection": True})
    assert methods.get("prefix_tuning").peft_config(prefix.method, "").prefix_projection
    ia3 = TrainConfig(method={"name": "ia3", "target_modules": ["v_proj", "down_proj"],
                              "feedforward_modules": ["down_proj"]})  # fmt: skip
    built = methods.get("ia3").peft_config(ia3.method, "")
    assert set(built.target_modules) == {"v_proj", "down_proj"}
    # Each prompt-like method brings its own learning rate; train.learning_rate otherwise.
    assert methods.learning_rate(pt.method, 2e-4) == 3e-2
    assert methods.learning_rate(TrainConfig(method="lora").method, 2e-4) == 2e-4
    own = TrainConfig(method={"name": "adapter", "learning_rate": 1e-3})
    assert methods.learning_rate(own.method, 2e-4) == 1e-3
