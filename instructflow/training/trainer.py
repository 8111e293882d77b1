"""The training run of the train stage: transformers' Trainer on the tokenized Arrow splits,
for any method of instructflow.training.methods, in-process or as one torchrun rank.

Batches are packed without cross-contamination (instructflow.training.packing: examples of a
step share one row, position_ids restart, attention runs per example; a probe checks each
model, else length-grouped padding; `per_device_batch_size` is the token budget). Checkpoints
go to the stage's work dir and a rerun with the same key resumes from the last complete one.
`train.nproc > 1` runs `python -m instructflow.training.trainer <spec.json>` under torchrun
(DDP: gloo on CPU, nccl on GPU); only rank 0 writes outputs. `train.nnodes > 1` adds a c10d
rendezvous that the other nodes' agents join (`instructflow train-node`). The HF MLflow
callback is off: the kept checkpoints' weights reach MLflow through the train artifact
instead, as LoggedModels (instructflow.training.checkpoints, instructflow.logged_models).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from instructflow import interrupts, loading
from instructflow.artifacts import MANIFEST, ArtifactRef
from instructflow.config import TrainConfig
from instructflow.training import distill, generation_eval, methods, packing

ROOT = Path(__file__).resolve().parents[2]


class TrainError(RuntimeError):
    """A training run that cannot go on; the message is one line."""


def last_complete_checkpoint(folder: Path) -> Path | None:
    """Newest checkpoint whose trainer_state.json (the Trainer writes it last) is intact."""
    if not folder.is_dir():
        return None
    found = []
    for p in folder.glob("checkpoint-*"):
        try:
            step = int(p.name.split("-", 1)[1])
            state = json.loads((p / "trainer_state.json").read_text())
        except (ValueError, OSError):
            continue
        if state.get("global_step") == step:
            found.append((step, p))
    return max(found)[1] if found else None


def checkpoint_damage(folder: Path) -> str | None:
    """Why the Trainer could not load checkpoint `folder` (a file and what is wrong with it),
    or None. Checked without unpickling: a torch file must be a zip whose members match their
    CRC-32 (torch.save writes them), a safetensors file's header must parse and its tensors fill
    the file exactly, a JSON file must parse. Other files (README, tokenizer text) are not read
    on resume."""
    import zipfile

    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        try:
            if path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad:
                    return f"{name}: member {bad} fails its CRC check"
            elif path.suffix == ".safetensors":
                problem = _safetensors_damage(path)
                if problem:
                    return f"{name}: {problem}"
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except zipfile.BadZipFile:
            return f"{name}: not a torch checkpoint file (no zip archive)"
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:  # a bad header
            return f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _safetensors_damage(path: Path) -> str | None:
    """The format's own layout: 8-byte little-endian header length, JSON header, then the data
    whose last tensor ends exactly at the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a safetensors header"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"header length {length} is past the end of the file ({size} bytes)"
        header = json.loads(fh.read(length))
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if 8 + length + max(ends, default=0) != size:
        return f"tensors end at byte {8 + length + max(ends, default=0)}, the file has {size}"
    return None


def resumable_checkpoint(folder: Path, stage: str = "train") -> Path | None:
    """The newest complete checkpoint that loads. A damaged newer one (garbage in its adapter
    or optimizer file, a bad sector) would fail every re-run, so it is moved aside as
    `damaged-step-N` (kept for inspection; the Trainer's checkpoint rotation never sees it)
    with a one-line warning naming it, and the next older one is tried."""
    from instructflow import progress

    while (newest := last_complete_checkpoint(folder)) is not None:
        problem = checkpoint_damage(newest)
        if problem is None:
            return newest
        step = newest.name.split("-", 1)[1]
        aside = folder / f"damaged-step-{step}-{time.time_ns()}"
        newest.rename(aside)
        older = last_complete_checkpoint(folder)
        then = f"resuming from {older.name}" if older else "starting from step 0"
        msg = f"{stage}: checkpoint {newest} is damaged ({problem}); moved to {aside.name}, {then}"
        progress.notify("warning", stage=stage, message=msg)
    return None


# -- the training run (in-process, or one torchrun rank) ---------------------------------------
def resolve_precision(requested: str) -> str:
    """auto: bf16 on GPUs that compute it natively, fp16 on older GPUs, fp32 on CPU.

    CPUs without native bf16 run bf16 matmuls ~20x slower than fp32 (measured here).
    """
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _load_splits(path: Path, max_eval: int | None):
    import datasets

    def load(name: str):
        d = path / name
        if not d.is_dir():
            return None
        ds = datasets.load_from_disk(str(d))
        missing = {"input_ids", "labels"} - set(ds.column_names)
        if missing:
            raise TrainError(f"{d}: missing column(s) {', '.join(sorted(missing))}")
        return ds

    train_ds = load("train")
    if train_ds is None or len(train_ds) == 0:
        raise TrainError(f"tokenized artifact {path}: train/ split is missing or empty")
    eval_ds = load("validation")
    if eval_ds is not None and max_eval is not None and len(eval_ds) > max_eval:
        eval_ds = eval_ds.select(range(max_eval))
    return train_ds, (eval_ds if eval_ds is not None and len(eval_ds) else None)


def _load_model(base: ArtifactRef, cfg: TrainConfig, precision: str, local_rank: int):
    import torch
    from transformers import BitsAndBytesConfig

    method = methods.get(cfg.method.name)
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if method.quantize_4bit:
        compute = _dtype(precision)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=compute,
        )
        kwargs["dtype"] = compute
        if not (cfg.fsdp or cfg.deepspeed):
            # One full copy per rank: under DDP each process places the model on its device.
            # (FSDP / ZeRO-3 shard it instead; the 4-bit storage dtype above lets them.)
            kwargs["device_map"] = {"": local_rank if cuda else "cpu"}
    elif method.peft_config is not None and precision != "fp32":
        kwargs["dtype"] = _dtype(precision)  # frozen base in half precision; adapters stay fp32
    model = loading.load_base_model(base, **kwargs)
    # A KV cache disables the packed-sequence mask (examples would attend to each other).
    model.config.use_cache = False
    if method.quantize_4bit:
        keep_4bit_differentiable(model)
    return model


def keep_4bit_differentiable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, Linear4bit converts its weight at the first forward in eval
    mode without gradients (e.g. the Trainer's evaluation) and keeps it that way; that
    layout's kernel (gemv_4bit) has no autograd formula, so afterwards no gradient flows
    through the frozen layers: every LoRA matrix below the last layer stops learning while
    the loss still moves (measured with bitsandbytes 0.50: input grad None, QLoRA stuck at
    loss 2.6 where LoRA reached 0.04). Keeping the dequantize + matmul path costs nothing
    measurable at these sizes.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def wrap_method(model, cfg: TrainConfig, tokenizer_dir: str = ""):
    """The model to train: the base with its method's adapters (none for full)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    method = methods.get(cfg.method.name)
    if method.attach is not None:
        return method.attach(model, cfg.method)
    if method.peft_config is None:
        return model
    if method.quantize_4bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return get_peft_model(model, method.peft_config(cfg.method, tokenizer_dir))


def _training_args(cfg: TrainConfig, precision: str, work: Path, has_eval: bool, padded: bool):
    import torch
    from transformers import TrainingArguments

    early = cfg.early_stopping_patience is not None and has_eval
    metric, greater = generation_eval.best_metric(cfg.best_by, early)
    keep_best = metric is not None and has_eval
    if keep_best and cfg.save_steps % cfg.eval_steps:
        why = "train.early_stopping_patience is set" if early else f"train.best_by={cfg.best_by}"
        raise TrainError(
            f"train.save_steps ({cfg.save_steps}) must be a multiple of train.eval_steps "
            f"({cfg.eval_steps}) when {why}"
        )
    cuda = torch.cuda.is_available()
    sharding = {k: v for k, v in (("fsdp", cfg.fsdp), ("deepspeed", cfg.deepspeed)) if v}
    return TrainingArguments(
        **sharding,
        output_dir=str(work / "checkpoints"),
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # qlora: prepare_model_for_kbit_training already enabled it.
        activation_checkpointing=cfg.gradient_checkpointing
        and not methods.get(cfg.method.name).quantize_4bit,
        activation_checkpointing_kwargs={"use_reentrant": False},
        learning_rate=methods.learning_rate(cfg.method, cfg.learning_rate),
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optimizer,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps,
        load_best_model_at_end=keep_best,
        metric_for_best_model=metric if keep_best else None,
        greater_is_better=greater if keep_best else None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[],  # no HF MLflowCallback: figures go through the manifest
        disable_tqdm=True,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if padded else "random",
        length_column_name="length",
        dataloader_num_workers=0,  # the collator's token counters must live in this process
        ddp_backend=("nccl" if cuda else "gloo") if _world_size() > 1 else None,
        ddp_find_unused_parameters=False,
    )


def _choose_packing(model, cfg: TrainConfig, info: dict, vocab: int, precision: str):
    """(packed?, attention implementation): packing only where the probe proves it clean."""
    atol = 1e-4 if precision == "fp32" else 5e-2
    original = model.config._attn_implementation
    if not cfg.packing or not methods.get(cfg.method.name).packing:
        # Virtual tokens (prompt/prefix tuning) would be shared by the examples of a packed
        # row, one set for all: those methods train on padded batches.
        return False, original
    if not info.get("attn_implementation"):  # unless model.attn_implementation was chosen
        # Per-example attention inside the packed row (see packing.varlen_attention).
        packing.use_varlen_attention(model)
        if packing.packs_correctly(model, vocab, atol=atol):
            return True, packing.VARLEN
        model.set_attn_implementation(original)
    return packing.packs_correctly(model, vocab, atol=atol), original


def parameter_count(model) -> int:
    """Parameters of the base: a 4-bit weight packs several values per stored element (2 per
    uint8, 8 per fp32 storage), so its count comes from the shape it was quantized from."""
    import math

    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += math.prod(state.shape) if state is not None else p.numel()
    return total


class PeakMemory:
    """Peak memory of the training run: CUDA peak allocated, or this process's peak RSS
    (Linux: VmHWM, reset through /proc/self/clear_refs so earlier stages do not count)."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # not Linux, or not allowed: the peak covers the whole process

    def peak(self) -> dict[str, int]:
        import torch

        if self.cuda:
            return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated())}
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return {"peak_memory_bytes": int(line.split()[1]) * 1024}
        except OSError:
            pass
        import resource

        return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _trainer_class(answers: generation_eval.GenerationEval | None = None):
    from transformers import Trainer

    class CountingTrainer(Trainer):
        # Trainer shares one collator between training and evaluation: pause its counters
        # so tokens/s and the DDP shard record cover training batches only.
        def evaluate(self, *args, **kwargs):
            stats = self.data_collator.stats
            stats.paused, t0 = True, time.perf_counter()
            try:
                metrics = super().evaluate(*args, **kwargs)
                if answers is not None:
                    # Returned with the loss: the best-checkpoint choice reads them there.
                    scores = answers(self.model)
                    self.log(scores)
                    metrics.update(scores)
                return metrics
            finally:
                stats.paused = False
                stats.excluded_s += time.perf_counter() - t0

    return CountingTrainer


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_training(spec: dict[str, Any], subprocess_mode: bool = False) -> None:
    """Train per `spec` (paths + config); rank 0 writes the outputs into spec["out"]."""
    import torch
    import transformers
    from transformers import EarlyStoppingCallback, PrinterCallback

    from instructflow.training import callbacks

    transformers.utils.logging.disable_progress_bar()
    cfg = TrainConfig.model_validate(spec["cfg"])
    base = ArtifactRef.model_validate(spec["base"])
    out, work = Path(spec["out"]), Path(spec["work"])
    rank, local_rank, world = (
        int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1))
    )
    precision = resolve_precision(cfg.precision)
    transformers.set_seed(cfg.seed)  # LoRA init and dropout: same config -> same curve

    tok = loading.load_tokenizer(spec["tokenizer"])
    train_ds, eval_ds = _load_splits(Path(spec["tokenized"]), cfg.max_eval_examples)
    kd = spec.get("distill")  # a student learning from cached teacher logits (tasks/distill)
    # The row progress goes to and the stage an interrupt names: distill runs this too.
    stage = spec.get("stage", "train")
    if kd:
        train_ds = distill.join_teacher(train_ds, Path(kd["teacher_logits"]) / "train")
    info = loading.model_info(base)
    model = _load_model(base, cfg, precision, local_rank)
    packed, attention = _choose_packing(model, cfg, info, len(tok), precision)
    total_parameters = parameter_count(model)
    model = wrap_method(model, cfg, str(spec["tokenizer"]))
    memory = PeakMemory()
    stats = packing.BatchStats()
    collator = packing.PackingCollator(stats) if packed else packing.PaddingCollator(tok, stats)
    answers = None
    if cfg.eval_generation and eval_ds is not None:
        template = _tokenize_report(Path(spec["tokenized"])).get("template", "alpaca")
        answers = generation_eval.GenerationEval(
            eval_ds, tok, template, cfg.eval_generation, cfg.eval_max_new_tokens
        )
    trainer_class = _trainer_class(answers)
    if kd:
        collator = distill.TeacherCollator(collator, kd["top_k"])
        trainer_class = distill.trainer_class(trainer_class, kd["alpha"], kd["temperature"])
    args = _training_args(cfg, precision, work, eval_ds is not None, padded=not packed)
    metrics_cb = callbacks.StepMetrics(stats, world)
    cbs = [metrics_cb, callbacks.Progress(metrics_cb, subprocess_mode, stage)]
    if args.load_best_model_at_end and cfg.early_stopping_patience is not None:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        callbacks=cbs,
    )
    trainer.remove_callback(PrinterCallback)  # log dicts on stdout: the CLI has its own view
    # Under torchrun, launch_torchrun set damaged checkpoints aside once, before any rank.
    if cfg.resume and world == 1:
        resumable_checkpoint(work / "checkpoints", stage)
    resume = last_complete_checkpoint(work / "checkpoints") if cfg.resume else None
    resumed_step = int(resume.name.split("-")[1]) if resume else 0
    with interrupts.requested_stop() as stop:
        stopper = callbacks.GracefulStop(stop)
        trainer.add_callback(stopper)
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop:
        last = last_complete_checkpoint(work / "checkpoints")
        raise interrupts.Interrupted(stage, int(last.name.split("-")[1]) if last else None)

    is_main = trainer.is_world_process_zero()
    seen_dir = work / "seen"
    seen_dir.mkdir(exist_ok=True)
    (seen_dir / f"rank{rank}.json").write_text(
        json.dumps(
            {"rank": rank, "world_size": world, "wrote_outputs": is_main, "examples": stats.seen}
        )
    )
    peak_memory = memory.peak()
    unwrapped = trainer.model  # the Trainer keeps the DDP/FSDP wrapper separately
    method = methods.get(cfg.method.name)
    base_path = loading.hf_base_path(info)
    if not method.saves_adapter:
        target, extra = out / "model", {}
        unwrapped.config.use_cache = True
        if attention == packing.VARLEN:  # registered in this process only
            unwrapped.set_attn_implementation("sdpa")
    else:
        # adapter_config.json names a base PEFT can load (loading.hf_base_path); embeddings
        # are never resized, so PEFT need not look that name up while saving.
        target, extra = out / "adapter", {"save_embedding_layers": False}
        if method.peft_config is not None:
            unwrapped.peft_config["default"].base_model_name_or_path = base_path
    if method.attach is not None:
        if is_main:
            from instructflow.training import bottleneck

            bottleneck.save(unwrapped, target, base_path)
    elif cfg.fsdp or cfg.deepspeed:
        trainer.save_model(str(target))  # sharded: every rank gathers, rank 0 writes
    elif is_main:
        unwrapped.save_pretrained(str(target), safe_serialization=True, **extra)
    if not is_main:
        return
    copy_tokenizer(Path(spec["tokenizer"]), out / "tokenizer")
    n_trainable = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    state = trainer.state
    series = metrics_cb.series
    metrics: dict[str, Any] = {
        "steps": state.global_step,
        "resumed_from_step": resumed_step,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "final_loss": series["loss"][-1][1] if series.get("loss") else result.training_loss,
        "trainable_parameters": n_trainable,
        "total_parameters": total_parameters,
        "trainable_percent": 100.0 * n_trainable / max(1, total_parameters),
        "saved_bytes": sum(f.stat().st_size for f in target.rglob("*") if f.is_file()),
        **peak_memory,
        "world_size": world,
    }
    if series.get("eval_loss"):
        best_step, best = min(series["eval_loss"], key=lambda sv: sv[1])
        metrics.update(best_eval_loss=best, best_step=best_step)
    kept = state.best_model_checkpoint if args.load_best_model_at_end else None
    kept_step = int(Path(kept).name.split("-")[1]) if kept else None
    metrics.update(generation_eval.summary(series, args.metric_for_best_model, kept_step))
    for name in ("useful_tokens_per_s", "padding_fraction"):
        if series.get(name):
            metrics[f"mean_{name}"] = sum(v for _, v in series[name]) / len(series[name])
    report = _tokenize_report(Path(spec["tokenized"]))
    train_json = {
        "method": cfg.method.name,
        "tokenized_digest": Path(spec["tokenized"]).name,
        "base_model": info,
        "template": report.get("template"),
        "max_length": report.get("max_length"),
        "precision": precision,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "packing": "flattened" if packed else "padded",
        "attention": attention,
        "config": cfg.model_dump(mode="json"),
        **({"distill": {k: v for k, v in kd.items() if k != "teacher_logits"}} if kd else {}),
        "metrics": metrics,
        "step_metrics": series,
        "log_history": state.log_history,
    }
    (out / "train.json").write_text(json.dumps(train_json, indent=1, default=str))
    if target.name == "adapter":
        # PEFT writes an empty template README; this one says what the adapter is.
        card = adapter_card(train_json, base_path, peft=method.peft_config is not None)
        (target / "README.md").write_text(card, encoding="utf-8")


LOAD_WITH_PEFT = [
    "from peft import AutoPeftModelForCausalLM",
    "from transformers import AutoTokenizer",
    "",
    'model = AutoPeftModelForCausalLM.from_pretrained("path/to/adapter")',
    'tokenizer = AutoTokenizer.from_pretrained("path/to/tokenizer")  # beside adapter/',
]
LOAD_BOTTLENECK = [
    "from transformers import AutoModelForCausalLM, AutoTokenizer",
    "from instructflow.training import bottleneck  # layout: see that module's docstring",
    "",
    'base = AutoModelForCausalLM.from_pretrained("<base_model_name_or_path>")',
    'model = bottleneck.load(base, "path/to/adapter")',
    'tokenizer = AutoTokenizer.from_pretrained("path/to/tokenizer")  # beside adapter/',
]


def adapter_card(info: dict[str, Any], base_path: str, peft: bool = True) -> str:
    """The adapter's model card: base, data, method, figures, and how to load it."""
    m = info["metrics"]
    method = info["config"]["method"]
    # A null knob (e.g. learning_rate: use train's) says nothing about the adapter.
    knobs = ", ".join(f"{k}={v}" for k, v in method.items() if k != "name" and v is not None)
    figures = [
        f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}"
        for k, v in sorted(m.items())
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    return "\n".join(
        [
            "---",
            f"library_name: {'peft' if peft else 'instructflow'}",
            f"base_model: {info['base_model'].get('name_or_path')}",
            "tags: [instructflow, " + info["method"] + "]",
            "---",
            "",
            f"# {info['method']} adapter trained by instructflow",
            "",
            f"- **Base model**: `{info['base_model'].get('name_or_path')}` "
            f"({info['base_model'].get('kind')}), loaded from `{base_path}`",
            f"- **Method**: {info['method']} ({knobs})"
            if knobs
            else f"- **Method**: {info['method']}",
            f"- **Prompt template**: `{info.get('template')}`, max_length {info.get('max_length')}",
            f"- **Data**: the tokenized artifact `{info.get('tokenized_digest', '')[:16]}`",
            f"- **Precision**: {info['precision']}, packing: {info['packing']}",
            "",
            "## Training figures",
            *figures,
            "",
            "## How to load",
            "",
            "```python",
            *(LOAD_WITH_PEFT if peft else LOAD_BOTTLENECK),
            "```",
            "",
            "Or `instructflow serve --model <train artifact dir>`, which renders prompts with the "
            f"`{info.get('template')}` template it was trained with.",
            "",
        ]
    )


def copy_tokenizer(src: Path, dst: Path) -> None:
    # Copied, not re-saved: the files (and hash) stay identical to the tokenizer artifact.
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(MANIFEST), dirs_exist_ok=True)


def _tokenize_report(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "report.json").read_text())
    except (OSError, ValueError):
        return {}


# -- torchrun ----------------------------------------------------------------------------------
NODE_SPEC = "node-spec.json"


def torchrun_command(spec_path: Path, cfg: TrainConfig, rdzv_id: str) -> list[str]:
    """The torchrun agent command of one node: --standalone on one node, else the c10d
    rendezvous every node's agent joins (ranks are numbered there, so which node holds rank 0,
    the one writing outputs, is the rendezvous's choice: outputs go to the shared workspace)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.nproc}"]
    if cfg.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [
            f"--nnodes={cfg.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={cfg.rdzv_endpoint}",
            f"--rdzv-id={rdzv_id}",
            f"--rdzv-conf=join_timeout={cfg.rdzv_timeout_s}",
        ]
    cmd.append(f"--max-restarts={cfg.max_restarts}")
    return [*cmd, "-m", "instructflow.training.trainer", str(spec_path)]


def launch_torchrun(spec: dict[str, Any], cfg: TrainConfig) -> None:
    """Run this module's `main` on nproc ranks of this node (and, with nnodes > 1, wait for
    the other nodes' agents: `instructflow train-node` with the spec file this writes into
    the shared work dir); forward rank 0's progress lines."""
    import uuid

    from instructflow import progress

    work, stage = Path(spec["work"]), spec.get("stage", "train")
    if cfg.resume:
        resumable_checkpoint(work / "checkpoints", stage)  # here, before any rank reads one
    if cfg.nnodes > 1:
        # A fresh rendezvous id per launch: an agent started with an older spec (of a killed
        # attempt, whose output dir is gone) never joins this one.
        spec = {**spec, "rdzv_id": uuid.uuid4().hex[:16]}
        work.mkdir(parents=True, exist_ok=True)
        spec_path = work / NODE_SPEC
        tmp = spec_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(spec))
        tmp.replace(spec_path)
        msg = (
            f"{stage}: waiting for {cfg.nnodes - 1} more node(s) at {cfg.rdzv_endpoint}; on each, "
            f"run: instructflow train-node {spec_path}"
        )
        progress.notify("warning", stage=stage, message=msg)
        print(msg, file=sys.stderr, flush=True)
        rc, error = run_agent(spec_path, cfg, spec["rdzv_id"])
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump(spec, fh)
        try:
            rc, error = run_agent(Path(fh.name), cfg, "standalone")
        finally:
            os.unlink(fh.name)
    if rc != 0:
        where = f"{cfg.nnodes} nodes x {cfg.nproc}" if cfg.nnodes > 1 else f"{cfg.nproc}"
        raise TrainError(f"torchrun with {where} processes exited {rc}: {error}")


def run_agent(spec_path: Path, cfg: TrainConfig, rdzv_id: str) -> tuple[int, str]:
    """One node's torchrun agent: its exit status and last error line. Progress lines of a
    rank 0 on this node are forwarded; Ctrl-C is passed on (rank 0 checkpoints, all stop)."""
    from instructflow.training import callbacks

    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    tail: list[str] = []
    cmd = torchrun_command(spec_path, cfg, rdzv_id)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        for line in proc.stdout:
            if not callbacks.forward_progress_line(line):
                tail = (tail + [line.rstrip()])[-40:]
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        spec = json.loads(spec_path.read_text())
        last = last_complete_checkpoint(Path(spec["work"]) / "checkpoints")
        step = int(last.name.split("-")[1]) if last else None
        raise interrupts.Interrupted(spec.get("stage", "train"), step) from None
    errors = [t for t in tail if "Error" in t or "error:" in t] or tail or ["no output"]
    return rc, errors[-1].strip()


def join_node(spec_path: Path) -> int:
    """`instructflow train-node SPEC`: this machine's agent for a multi-node train stage."""
    spec = json.loads(spec_path.read_text())
    cfg = TrainConfig.model_validate(spec["cfg"])
    if cfg.nnodes < 2 or "rdzv_id" not in spec:
        raise TrainError(f"{spec_path}: not a multi-node training spec (train.nnodes < 2)")
    rc, error = run_agent(spec_path, cfg, spec["rdzv_id"])
    if rc != 0:
        raise TrainError(f"this node's torchrun agent exited {rc}: {error}")
    return 0


def main(argv: list[str]) -> None:
    """torchrun entry: `python -m instructflow.training.trainer <spec.json>`."""
    from instructflow import workspace as ws

    ws.configure()
    spec = json.loads(Path(argv[0]).read_text())
    run_training(spec, subprocess_mode=True)


if __name__ == "__main__":
    main(sys.argv[1:])
