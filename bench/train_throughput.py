"""Benchmark: training throughput three ways, same tiny model, same data, same steps.

    python bench/train_throughput.py [--examples 600] [--steps 40] [--batch 4] [--repeats 2]

(a) lecture recipe: every example padded to max_length 512, fixed batch size, plain Trainer.
(b) instructflow's train stage (`tasks.train.train` over
    instructflow.training.stage.train_artifact, method lora): padding-free packing,
    `--batch` examples a step.
(c) TRL SFTTrainer with its default packing (packing=True: best-fit-decreasing into
    max_length-1024 rows, padding-free), `--trl-batch` packed rows a step.
All: the benchmarks' ~7M Llama (bench/bench_model.py; `--model builtin` for builtin:tiny) + LoRA
r16/alpha32 on all linear layers, fp32
on CPU, AdamW lr 2e-4, cosine, seed 42; data: `--examples` rows of Stanford Alpaca (random_9k,
seeded sample) rendered with the alpaca template and tokenised by the tokenize stage
(`tasks.tokenize.encode_rows`, max_length 512).
Useful tokens = loss-bearing tokens (labels != -100 after the shift) of exactly the batches
the steps consumed; time = the Trainer's train_runtime; padding = share of batch slots that
are padding. Each way runs in its own subprocess (peak RSS from wait4); repeats alternate the
ways and the best run of each counts (other jobs share this machine).
Writes bench/results/train_throughput.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import bench_model  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "stanford_alpaca_subsets" / "random_9k.json"
WAYS = {
    "a": "(a) lecture: pad to 512, fixed batch",
    "b": "(b) instructflow train stage (packed)",
    "c": "(c) TRL SFTTrainer, default packing",
}
MODELS = {
    "builtin": "builtin:tiny, the pre-trained 1.3M model, 2,048-token vocabulary",
    "alpaca-bpe-4k": "the benchmarks' ~7M Llama (bench/bench_model.py), 4,096-token BPE",
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
MAX_LENGTH = 512


# -- parent: data, subprocesses, table ---------------------------------------------------------
def prepare(n: int, model: str, home: Path) -> dict:
    from instructflow.arrow_io import save_table
    from instructflow.artifacts import write_artifact
    from instructflow.config import ModelConfig, TokenizeConfig
    from instructflow.loading import load_tokenizer
    from tasks.base_model import prepare_base_model, prepare_tokenizer
    from tasks.tokenize import encode_rows

    everything = json.loads(DATA.read_text(encoding="utf-8"))
    picked = random.Random(0).sample(range(len(everything)), n)
    rows = [{**everything[i], "id": f"random_9k:{k}"} for k, i in enumerate(picked)]
    model_cfg = ModelConfig()
    if model == "alpaca-bpe-4k":
        rest = [r for i, r in enumerate(everything) if i not in set(picked)]
        folder = bench_model.alpaca_bpe_4k(rest, home / "alpaca-bpe-4k")
        model_cfg = ModelConfig(name_or_path=folder)
    tok_ref = prepare_tokenizer(model_cfg)
    base = prepare_base_model(model_cfg, tok_ref)
    tok = load_tokenizer(tok_ref)
    cfg = TokenizeConfig(template="alpaca", max_length=MAX_LENGTH)
    table, counts = encode_rows(rows, tok, cfg)

    def write(tmp: Path) -> dict:
        save_table(table, tmp / "train")
        (tmp / "report.json").write_text(json.dumps({"template": "alpaca", **counts}))
        return {}

    tokenized = write_artifact("tokenize", write)
    return {
        "tokenized": tokenized.model_dump(),
        "base": base.model_dump(),
        "tokenizer": tok_ref.model_dump(),
        "counts": counts,
    }


def run_way(way: str, spec: dict, args, log: Path) -> dict:
    out = log.with_suffix(".json")
    cmd = [sys.executable, __file__, "--child", way, "--spec", json.dumps(spec), "--out", str(out)]
    cmd += ["--steps", str(args.steps), "--batch", str(args.batch)]
    cmd += ["--trl-batch", str(args.trl_batch)]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0 or not out.is_file():
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"way {way} failed (status {status}):\n" + "\n".join(tail))
    result = json.loads(out.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    return result


def table(best: dict[str, dict], args, counts: dict) -> str:
    a, c = best["a"], best["c"]
    lines = [
        "| way | useful tok/s | × (a) | × (c) | padding | peak RSS MB | steps | useful tokens"
        " | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for way, r in best.items():
        speed = r["useful_tok_s"]
        lines.append(
            f"| {WAYS[way]} | {speed:.0f} | {speed / a['useful_tok_s']:.2f}"
            f" | {speed / c['useful_tok_s']:.2f} | {100 * r['padding']:.1f} %"
            f" | {r['peak_rss_mb']:.0f} | {r['steps']} | {r['useful_tokens']}"
            f" | {r['runtime']:.1f} |"
        )
    b = best["b"]
    targets = [
        f"(b)/(a) = {b['useful_tok_s'] / a['useful_tok_s']:.2f} (target ≥ 3.5)",
        f"(b)/(c) = {b['useful_tok_s'] / c['useful_tok_s']:.2f} (target ≥ 1.5)",
        f"padding (b) = {100 * b['padding']:.1f} % (target ≤ 3 %)",
        f"peak RSS (b) {b['peak_rss_mb']:.0f} MB vs (a) {a['peak_rss_mb']:.0f} MB",
    ]
    head = (
        f"Command: `python bench/train_throughput.py --examples {args.examples} --steps "
        f"{args.steps} --batch {args.batch} --trl-batch {args.trl_batch} --repeats "
        f"{args.repeats} --threads {args.threads} --model {args.model}`  \n"
        f"Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {args.threads or 'default'}; best of "
        f"{args.repeats} alternating runs per way (shared machine).  \n"
        f"Data: {counts['rows']} Alpaca examples (random_9k, seeded sample), "
        f"{counts['tokens']} tokens, {counts['trainable_tokens']} loss-bearing; model "
        f"`{args.model}` ({MODELS[args.model]}) + LoRA r16 all-linear, fp32.\n"
    )
    return head + "\n" + "\n".join(lines) + "\n\n" + "; ".join(targets) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=600)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4, help="examples a step for (a) and (b)")
    p.add_argument("--trl-batch", type=int, default=1, help="packed 1024-token rows for (c)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads per way (0: default)")
    p.add_argument("--ways", default="abc")
    p.add_argument("--model", choices=["builtin", "alpaca-bpe-4k"], default="alpaca-bpe-4k")
    p.add_argument("--child")
    p.add_argument("--spec")
    p.add_argument("--out")
    args = p.parse_args()
    if args.child:
        return child(args)

    home = Path(tempfile.mkdtemp(prefix="bench-train-"))
    os.environ["INSTRUCTFLOW_HOME"] = str(home)
    from instructflow import workspace

    workspace.configure()
    spec = prepare(args.examples, args.model, home)
    counts = spec.pop("counts")
    results: dict[str, list[dict]] = {w: [] for w in args.ways}
    for rep in range(args.repeats):
        for way in args.ways:
            t0 = time.perf_counter()
            r = run_way(way, spec, args, home / f"{way}-{rep}.log")
            results[way].append(r)
            print(
                f"rep {rep} {way}: {r['useful_tok_s']:.0f} useful tok/s, padding "
                f"{100 * r['padding']:.1f} %, RSS {r['peak_rss_mb']:.0f} MB "
                f"({time.perf_counter() - t0:.0f} s wall)",
                flush=True,
            )
    best = {w: max(rs, key=lambda r: r["useful_tok_s"]) for w, rs in results.items()}
    if set(best) == set("abc"):
        text = table(best, args, counts)
        print(text)
        suffix = "" if args.model == "alpaca-bpe-4k" else f"-{args.model}"
        out = ROOT / "bench" / "results" / f"train_throughput{suffix}.md"
        out.parent.mkdir(exist_ok=True)
        out.write_text("# Train throughput\n\n" + text)


# -- children: one way each ----------------------------------------------------------------------
def child(args) -> None:
    from instructflow import workspace

    workspace.configure()
    spec = json.loads(args.spec)
    result = {"a": child_lecture, "b": child_stage, "c": child_trl}[args.child](spec, args)
    Path(args.out).write_text(json.dumps(result))


def _summary(series: dict, runtime: float) -> dict:
    useful = int(sum(v for _, v in series["useful_tokens"]))
    pads = [v for _, v in series.get("padding_fraction", [])]
    return {
        "useful_tokens": useful,
        "useful_tok_s": useful / runtime,
        "padding": sum(pads) / max(len(pads), 1),
        "runtime": runtime,
        "steps": len(series["useful_tokens"]),
    }


def _lora_model(spec: dict):
    from peft import LoraConfig, get_peft_model

    from instructflow.artifacts import ArtifactRef
    from instructflow.loading import load_base_model

    model = load_base_model(ArtifactRef.model_validate(spec["base"]))
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))


def _common_args(args) -> dict:
    return dict(
        output_dir=tempfile.mkdtemp(),
        max_steps=args.steps,
        learning_rate=2e-4,
        warmup_steps=0.03,
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        seed=42,
        dataloader_num_workers=0,
    )


def _train_dataset(spec: dict):
    import datasets

    return datasets.load_from_disk(str(Path(spec["tokenized"]["path"]) / "train"))


def child_lecture(spec: dict, args) -> dict:
    from transformers import Trainer, TrainingArguments, default_data_collator

    from instructflow.loading import load_tokenizer
    from instructflow.training.callbacks import StepMetrics
    from instructflow.training.packing import BatchStats, CountingCollator

    tok = load_tokenizer(spec["tokenizer"]["path"])

    def pad(ex):  # the lecture's tokenizer(..., padding="max_length", max_length=512)
        n = MAX_LENGTH - len(ex["input_ids"])
        return {
            "input_ids": ex["input_ids"] + [tok.pad_token_id] * n,
            "attention_mask": [1] * len(ex["input_ids"]) + [0] * n,
            "labels": ex["labels"] + [-100] * n,
        }

    ds = _train_dataset(spec).map(pad, remove_columns=["length"])
    stats = BatchStats(record_seen=False)
    metrics = StepMetrics(stats)
    trainer = Trainer(
        model=_lora_model(spec),
        args=TrainingArguments(
            per_device_train_batch_size=args.batch,
            remove_unused_columns=False,
            **_common_args(args),
        ),
        train_dataset=ds,
        data_collator=CountingCollator(default_data_collator, stats, plain=False),
        callbacks=[metrics],
    )
    result = trainer.train()
    return _summary(metrics.series, result.metrics["train_runtime"])


def child_stage(spec: dict, args) -> dict:
    from instructflow.artifacts import ArtifactRef
    from instructflow.config import TrainConfig
    from tasks.train import train

    refs = [ArtifactRef.model_validate(spec[k]) for k in ("tokenized", "base", "tokenizer")]
    cfg = TrainConfig(
        method={
            "name": "lora",
            "r": LORA["r"],
            "alpha": LORA["lora_alpha"],
            "dropout": LORA["lora_dropout"],
        },
        precision="fp32",
        max_steps=args.steps,
        per_device_batch_size=args.batch,
        logging_steps=1,
        save_steps=10 * args.steps,  # like (a) and (c): no checkpoint inside the timed run
        learning_rate=2e-4,
        seed=42,
        resume=False,
    )
    ref = train(*refs, cfg)
    info = json.loads(ref.file("train.json").read_text())
    assert info["packing"] == "flattened", info["packing"]
    return _summary(info["step_metrics"], info["metrics"]["train_runtime_s"])


def child_trl(spec: dict, args) -> dict:
    from trl import SFTConfig, SFTTrainer

    from instructflow.loading import load_tokenizer
    from instructflow.training.callbacks import StepMetrics
    from instructflow.training.packing import BatchStats, CountingCollator

    tok = load_tokenizer(spec["tokenizer"]["path"])
    ds = _train_dataset(spec).remove_columns(["length"])
    stats = BatchStats(record_seen=False)
    metrics = StepMetrics(stats)
    trainer = SFTTrainer(
        model=_lora_model(spec),
        args=SFTConfig(
            packing=True, per_device_train_batch_size=args.trl_batch, **_common_args(args)
        ),
        train_dataset=ds,
        processing_class=tok,
        callbacks=[metrics],
    )
    trainer.data_collator = CountingCollator(trainer.data_collator, stats, plain=False)
    result = trainer.train()
    return _summary(metrics.series, result.metrics["train_runtime"])


if __name__ == "__main__":
    main()
