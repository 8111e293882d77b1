"""train stage: packing without contamination, seeded LoRA / QLoRA runs, outputs, MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenized_fixtures import write_tokenized

from instructflow import demo_data
from instructflow.artifacts import sha256_file
from instructflow.config import ModelConfig, TrainConfig
from instructflow.loading import load_finetuned, load_tokenizer
from instructflow.training.packing import (
    IGNORE,
    PackingCollator,
    PaddingCollator,
    packs_correctly,
    use_varlen_attention,
)
from instructflow.training.stage import TrainError
from instructflow.training.trainer import last_complete_checkpoint
from tasks.base_model import prepare_base_model, prepare_tokenizer
from tasks.train import train

VOCAB = 96


def _tiny(family: str):
    """Very small models of three families, built from their configs (no hub)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, **common))
    arch = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **common,
    )
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**arch))
    return tf.LlamaForCausalLM(tf.LlamaConfig(**arch))


def _examples(n: int = 4) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        length = 9 + 5 * i
        ids = torch.randint(2, VOCAB, (length,), generator=gen).tolist()
        prompt = 3 + i  # prompt tokens carry no loss
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_packed_loss_equals_token_weighted_loss_of_examples_alone(family, attention):
    model = _tiny(family).eval()
    model.config.use_cache = False
    if attention == "varlen":
        use_varlen_attention(model)
    examples = _examples()
    assert packs_correctly(model, VOCAB)
    collator = PackingCollator()
    batch = collator(examples)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**batch).loss.item()
        total, weight = 0.0, 0
        for ex in examples:
            ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
            n = int((labels[:, 1:] != IGNORE).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            weight += n
        # Control: the same row without restarting positions lets examples see each other.
        leaky = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
        # The same model still generates / scores unpacked batches normally.
        alone = model(input_ids=torch.tensor([examples[0]["input_ids"]])).logits
    assert packed == pytest.approx(total / weight, abs=1e-5)
    assert abs(leaky - packed) > 1e-3
    assert torch.allclose(
        alone,
        _tiny(family)
        .eval()(input_ids=alone.new_tensor([examples[0]["input_ids"]], dtype=torch.long))
        .logits,
        atol=1e-5,
    )
    stats = collator.stats.drain()
    assert stats["positions"] == stats["tokens"] == sum(len(e["input_ids"]) for e in examples)
    assert stats["useful"] == weight


def test_padding_fallback_matches_and_counts_padding(home):
    tok = load_tokenizer(prepare_tokenizer(ModelConfig()))
    model = _tiny("llama").eval()
    model.config.use_cache = False  # with a KV cache the packed mask is not used (leaks)
    examples = _examples(3)
    collator = PaddingCollator(tok)
    batch = collator(examples)
    stats = collator.stats.drain()
    lengths = [len(e["input_ids"]) for e in examples]
    assert stats["positions"] == 3 * max(lengths) and stats["tokens"] == sum(lengths)
    with torch.no_grad():
        padded = model(**batch).loss.item()
        packed = model(**PackingCollator()(examples)).loss.item()
    assert padded == pytest.approx(packed, abs=1e-5)


def test_last_complete_checkpoint_skips_half_written(tmp_path):
    for step, state in [(2, {"global_step": 2}), (4, {"global_step": 4}), (6, None)]:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if state:
            (d / "trainer_state.json").write_text(json.dumps(state))
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text('{"global_st')  # cut by a kill
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-4"
    assert last_complete_checkpoint(tmp_path / "nothing") is None


@pytest.fixture
def inputs(home):
    tok_ref = prepare_tokenizer(ModelConfig())
    base = prepare_base_model(ModelConfig(), tok_ref)
    tok = load_tokenizer(tok_ref)
    rows = demo_data.generate(60, seed=3)
    tokenized = write_tokenized({"train": rows[:48], "validation": rows[48:]}, tok, max_length=64)
    return tokenized, base, tok_ref


def _cfg(method: str = "lora", **kw) -> TrainConfig:
    base = dict(
        method={"name": method, "r": 4, "alpha": 8},
        max_steps=4,
        per_device_batch_size=2,
        logging_steps=1,
        save_steps=2,
        eval_steps=2,
        max_eval_examples=4,
    )
    return TrainConfig(**{**base, **kw})


def test_lora_run_is_seeded_and_writes_the_contract(inputs):
    tokenized, base, tok_ref = inputs
    first = train(tokenized, base, tok_ref, _cfg())
    second = train(tokenized, base, tok_ref, _cfg())  # checkpoints were removed: a fresh run
    curve = [v for _, v in first.meta["step_metrics"]["loss"]]
    assert len(curve) == 4
    assert [v for _, v in second.meta["step_metrics"]["loss"]] == pytest.approx(curve, rel=1e-6)
    assert second.figures["resumed_from_step"] == 0
    assert first.digest != train(tokenized, base, tok_ref, _cfg(seed=7)).digest

    info = json.loads(first.file("train.json").read_text())
    assert info["method"] == "lora" and info["base_model"]["name_or_path"] == "builtin:tiny"
    assert info["template"] == "alpaca" and info["packing"] == "flattened"
    assert info["precision"] == "fp32" and info["attention"] == "instructflow_varlen"
    steps = first.meta["step_metrics"]
    assert all(v == 0.0 for _, v in steps["padding_fraction"])
    assert all(v > 0 for _, v in steps["useful_tokens_per_s"])
    assert {"learning_rate", "grad_norm", "eval_loss"} <= set(steps)
    assert first.figures["best_eval_loss"] == min(v for _, v in steps["eval_loss"])
    adapter_cfg = json.loads(first.file("adapter/adapter_config.json").read_text())
    # The per-user folder of the pre-trained builtin:tiny, so plain PEFT loaders find the base.
    base_dir = Path(adapter_cfg["base_model_name_or_path"])
    assert (base_dir / "config.json").is_file() and (base_dir / "model.safetensors").is_file()
    assert first.file("adapter/adapter_model.safetensors").is_file()
    assert first.file("loss_curve.png").stat().st_size > 1000
    for f in tok_ref.dir.iterdir():  # the tokenizer artifact, byte for byte
        if f.name != "MANIFEST.json":
            assert sha256_file(first.file(f"tokenizer/{f.name}")) == sha256_file(f)

    model, tok = load_finetuned(first, base)
    prompt = tok("### Instruction:\nWhat is 2 plus 2?\n\n### Response:\n", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > prompt.input_ids.shape[1]


def test_the_adapter_loads_with_peft_alone_and_carries_a_model_card(inputs):
    from peft import AutoPeftModelForCausalLM

    tokenized, base, tok_ref = inputs
    ref = train(tokenized, base, tok_ref, _cfg(max_steps=2))
    # What users try first: PEFT's own loader, with nothing but the adapter folder.
    peft_only = AutoPeftModelForCausalLM.from_pretrained(str(ref.file("adapter")))
    ours, tok = load_finetuned(ref, base)
    ids = tok("### Instruction:\nabc\n\n### Response:\n", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(
            peft_only(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5
        )
    card = ref.file("adapter/README.md").read_text()
    assert "AutoPeftModelForCausalLM" in card and "builtin:tiny" in card
    assert "- **Method**: lora (r=4, alpha=8" in card and "final_loss" in card


def test_qlora_run_and_merged_model_agree(inputs):
    from transformers import AutoModelForCausalLM

    tokenized, base, tok_ref = inputs
    ref = train(tokenized, base, tok_ref, _cfg(method="qlora", max_steps=2, merge=True))
    assert ref.figures["steps"] == 2
    peft_model, tok = load_finetuned(ref, base)
    merged = AutoModelForCausalLM.from_pretrained(str(ref.file("merged")))
    ids = tok("Sort the numbers: 3, 1", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert ref.file("merged/tokenizer.json").is_file()


def test_qlora_gradients_reach_every_layer_after_an_eval_pass(inputs):
    """An eval-mode forward (the Trainer's evaluation) must not freeze gradients below the
    last layer: bitsandbytes' CPU repacking of 4-bit weights has no autograd formula."""
    import bitsandbytes as bnb

    from instructflow.training.trainer import _load_model, wrap_method

    _, base, _ = inputs
    cfg = _cfg(method="qlora")
    repacks = bnb.nn.Linear4bit(8, 8).support_avx512bf16_for_cpu  # bitsandbytes' default here

    def lowest_lora_grad(fix: bool) -> torch.Tensor | None:
        model = _load_model(base, cfg, "fp32", 0)
        if not fix:  # undo keep_4bit_differentiable
            for m in model.modules():
                if isinstance(m, bnb.nn.Linear4bit):
                    m.support_avx512bf16_for_cpu = repacks
        model = wrap_method(model, cfg)
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        # lora_B: its gradient is (upstream gradient) x (A x), non-zero iff the loss's gradient
        # reaches layer 0 (lora_A's is 0 at init, since B starts at 0).
        lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"]
        return lora_b.weight.grad

    grad = lowest_lora_grad(fix=True)
    assert grad is not None and grad.abs().sum() > 0
    if repacks:
        broken = lowest_lora_grad(fix=False)
        assert broken is None or broken.abs().sum() == 0  # what the fix prevents


def test_bad_inputs_fail_in_one_line(inputs, tmp_path):
    tokenized, base, tok_ref = inputs
    with pytest.raises(TrainError, match=r"save_steps \(3\) must be a multiple"):
        train(tokenized, base, tok_ref, _cfg(early_stopping_patience=1, save_steps=3))
    rows = demo_data.generate(4, seed=0)
    no_train = write_tokenized({"validation": rows}, load_tokenizer(tok_ref))
    with pytest.raises(TrainError, match="train/ split is missing or empty"):
        train(no_train, base, tok_ref, _cfg())


def test_max_length_beyond_the_base_models_positions_is_refused(inputs, tmp_path):
    import transformers as tf

    tokenized, base, tok_ref = inputs
    assert json.loads(base.file("model.json").read_text())["max_positions"] == 1024
    tok = load_tokenizer(tok_ref)
    config = tf.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
    )
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "short")
    short = prepare_base_model(ModelConfig(name_or_path=str(tmp_path / "short")), tok_ref)
    with pytest.raises(TrainError, match=r"max_length=64 is above .*short's max_position_emb"):
        train(tokenized, short, tok_ref, _cfg())  # tokenized at max_length=64


def test_stage_figures_reach_mlflow_without_checkpoints(inputs):
    from mlflow.tracking import MlflowClient

    import mlflow
    from instructflow import tracking

    tokenized, base, tok_ref = inputs
    ref = train(tokenized, base, tok_ref, _cfg(max_steps=2, keep_checkpoints=True))
    work = ref.dir.parents[2] / "work"  # <home>/work/train/<key>/checkpoints/checkpoint-2
    assert [p.name for p in work.rglob("checkpoint-*")] == ["checkpoint-2"]
    with mlflow.start_run() as run:
        tracking.log_stage(run.info.run_id, ref)
    client = MlflowClient()
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]
    assert client.get_run(run.info.run_id).data.metrics["train/best_eval_loss"] > 0
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "train")}
    expected = {"adapter", "tokenizer", "train.json", "loss_curve.png"}
    assert {f"train/{name}" for name in expected} <= logged
    assert not any("checkpoint" in p for p in logged)


def test_packing_off_falls_back_to_length_grouped_padding(inputs):
    tokenized, base, tok_ref = inputs
    ref = train(tokenized, base, tok_ref, _cfg(packing=False, max_steps=2))
    info = json.loads(ref.file("train.json").read_text())
    assert info["packing"] == "padded" and info["attention"] == "sdpa"
    pads = [v for _, v in ref.meta["step_metrics"]["padding_fraction"]]
    assert len(pads) == 2 and all(0 <= v < 0.5 for v in pads)


def test_generation_metrics_while_training_choose_the_kept_checkpoint(inputs):
    """eval_exact_match / eval_rougeL are logged at every evaluation, equal what the saved
    checkpoint answers when decoded on its own, and best_by keeps the best checkpoint."""
    from peft import PeftModel

    from instructflow import generation, loading
    from instructflow.metrics import text_metrics
    from instructflow.training.generation_eval import GenerationEval

    _, base, tok_ref = inputs
    tok = load_tokenizer(tok_ref)
    rows = demo_data.generate(48, seed=3)
    # Validation rows the model trains on: within seconds it answers some of them right, so
    # the figures move (held-out facts need the demo's hundreds of steps).
    tokenized = write_tokenized({"train": rows, "validation": rows[:12]}, tok, max_length=64)
    cfg = _cfg(
        max_steps=40,
        learning_rate=4e-3,
        per_device_batch_size=16,
        eval_steps=10,
        save_steps=10,
        max_eval_examples=12,
        eval_generation=12,
        best_by="rougeL",
        keep_checkpoints=True,
        save_total_limit=4,
    )
    ref = train(tokenized, base, tok_ref, cfg)
    series = ref.meta["step_metrics"]
    assert [s for s, _ in series["eval_exact_match"]] == [10, 20, 30, 40]
    assert [s for s, _ in series["eval_rougeL"]] == [10, 20, 30, 40]
    values = [v for _, v in series["eval_rougeL"]]
    assert max(values) > 0 and len(set(values)) > 1, values  # it measures something
    best_step, best = max(series["eval_rougeL"], key=lambda sv: sv[1])
    assert ref.figures["best_eval_rougeL"] == best and ref.figures["kept_step"] == best_step

    # Independently: the step-20 checkpoint's adapter, decoded by the evaluate stage's code.
    import datasets

    validation = datasets.load_from_disk(str(tokenized.file("validation")))
    sample = GenerationEval(validation, tok, "alpaca", 12, cfg.eval_max_new_tokens)
    checkpoint = next(ref.dir.parents[2].glob("work/train/*/checkpoints/checkpoint-20"))
    model = PeftModel.from_pretrained(loading.load_base_model(base), str(checkpoint))
    answers = generation.generate(
        model, tok, sample.prompts, max_new_tokens=32, stop_strings=sample.stops
    )
    scores, _ = text_metrics(answers, sample.refs)
    logged = dict(series["eval_rougeL"])[20]
    assert scores["rougeL"] == pytest.approx(logged, abs=1e-9)

    # The published adapter is the kept checkpoint's.
    kept = next(ref.dir.parents[2].glob(f"work/train/*/checkpoints/checkpoint-{best_step}"))
    assert (kept / "adapter_model.safetensors").read_bytes() == ref.file(
        "adapter/adapter_model.safetensors"
    ).read_bytes()
    # As models (tracking makes them LoggedModels): the kept one and the final share the
    # adapter's weights, the others' are copied without their optimizer state.
    models = {m["name"]: m for m in ref.meta["models"]}
    assert set(models) == {f"checkpoint-{s}" for s in (10, 20, 30, 40)} | {"final"}
    assert models["final"]["step"] == best_step and models["final"]["path"] == "adapter"
    assert models[f"checkpoint-{best_step}"]["path"] == "adapter"
    assert models["final"]["metrics"]["eval_rougeL"] == best
    copied = [m["path"] for m in models.values() if m["path"] != "adapter"]
    assert copied and all(ref.file(p).is_dir() for p in copied)
    assert not any(ref.dir.glob("checkpoints/*/optimizer.pt"))


def test_best_by_a_generation_metric_needs_generation():
    with pytest.raises(ValueError, match="needs train.eval_generation"):
        TrainConfig(best_by="exact_match")
