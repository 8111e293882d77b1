"""`builtin:tiny`: a ~1.3M-parameter Llama-style model the project pre-trains itself, offline.

What it is trained on and why (measured on a 2-core x86 CPU, fp32):
- The corpus is `world.statements()`: 400 facts (country capitals, opposites, plurals,
  upper-case spellings), each stated in 3-5 plain phrasings, never as a question with its bare
  answer and never in an instruction template. The base therefore completes "The capital of
  Japan is" with " Tokyo" but does not answer an Alpaca / ChatML prompt; the demo's fine-tune
  teaches that, and its test rows ask about subjects the fine-tune never saw.
- Why lookups and not skills: an earlier trial pre-trained the previous 5.2M model on
  reverse / sort / add / count lines for 150-330 s and none of those skills formed; facts keyed
  by one subject are memorised by a 1.3M model in ~1,000 steps (~2.5 min here).
- Why small: 4 layers of width 128 run ~10K tokens/s on 2 cores (the 5.2M model ~5K), so the
  one-time build stays near two and a half minutes.
- Why spaces are tokens of their own (the pre-tokenizer isolates whitespace): in GPT-2-style
  byte-level BPE " Tokyo" (mid-sentence, as in every statement) and "Tokyo" (after
  "### Response:\\n") are different ids, and a model this small never learns that they are the
  same word for subjects it was not fine-tuned on. With isolated spaces a word has one id
  wherever it stands.

The build is deterministic (seeded init, seeded data order, fixed recipe): the same recipe on
the same machine and torch build gives byte-identical weights. It is cached per user (not per
workspace) under `cache_root()`, keyed by tokenizer, architecture, recipe, corpus and this
package's code (instructflow.codeid: comments and docstrings do not count), so a second
workspace or a wiped one loads it in a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from instructflow import codeid
from instructflow.builtin import world
from instructflow.templates import IM_END, IM_START

NAME = "builtin:tiny"
MICRO = "builtin:micro"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]
# ChatML: the built-in tokenizer's chat template, and the fallback for tokenizers without one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Whitespace runs, letter runs, up to 3 digits, punctuation runs: each its own pre-token.
SPLIT_PATTERN = r"\s+|\p{L}+|\p{N}{1,3}|[^\s\p{L}\p{N}]+"
VOCAB_SIZE = 2048
ARCH = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)
# builtin:micro: the same family, 2 layers of width 64 (~5x fewer parameters): the default
# student of knowledge distillation (tasks/distill.py), pre-trained on the same facts.
MICRO_ARCH = {
    **ARCH,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
}
SIZES = {NAME: ARCH, MICRO: MICRO_ARCH}
# Pre-training recipe. ~2.1M tokens (~95 passes over the 22K-token corpus); AdamW, warmup then
# cosine to 10 %, packed 128-token rows of EOS-separated statements.
RECIPE = dict(
    steps=1000,
    batch_size=16,
    seq_len=128,
    learning_rate=3e-3,
    warmup_steps=50,
    min_lr_rate=0.1,
    adam_beta2=0.98,
    weight_decay=0.0,
    max_grad_norm=1.0,
    seed=0,
)
BUNDLE_FILE = "pretrain.json"

Progress = Callable[[int, int, float | None], None]


class PretrainError(RuntimeError):
    pass


# -- tokenizer --------------------------------------------------------------------------------
def tokenizer_corpus() -> list[str]:
    """Text the tokenizer learns its merges from: the facts, how the demo asks for them, and
    the prompt templates' scaffolding (merges only; the model never trains on the latter)."""
    from instructflow import templates

    asks = [
        f"{ask.instruction}\n{ask.input}".format(a=a)
        for relation, facts in world.FACTS.items()
        for a, _ in facts
        for ask in world.ASKS[relation]
    ]
    scaffold = (
        templates.ALPACA_HEADER
        + templates.ALPACA_HEADER_INPUT
        + "### Instruction:\n\n### Input:\n\n### Response:\n"
        + "system user assistant Please Can you Could you Explain Describe Write Give List "
        "answer question summary sentence word words number numbers text example following"
    )
    digits = " ".join(str(i) for i in range(100))
    return world.statements() + asks + [scaffold] * 20 + [digits] * 5


def build_tokenizer(corpus: list[str] | None = None, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE over `corpus` (default: the built-in one) whose pre-tokenizer isolates
    whitespace, with the built-in special tokens and ChatML template. Deterministic."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=ARCH["max_position_embeddings"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "right"
    return fast


def cached_tokenizer_dir() -> Path:
    """The folder of `build_tokenizer()` in the per-user cache (built there on first use):
    training the BPE takes ~1 s and every run needs it. Keyed by the corpus, vocabulary size
    and this code; nothing here imports transformers, so a cached run starts fast."""
    from instructflow import waits

    corpus = tokenizer_corpus()
    blob = json.dumps([corpus, VOCAB_SIZE, codeid.digest(__file__)]).encode()
    root = cache_root() / "builtin"
    folder = root / f"tokenizer-{hashlib.sha256(blob).hexdigest()[:24]}"
    if (folder / "tokenizer.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with waits.cache_lock(root / f"{folder.name}.lock", "building the built-in tokenizer", 600):
        if not (folder / "tokenizer.json").is_file():
            tok = build_tokenizer(corpus)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
            tok.save_pretrained(str(tmp))
            os.rename(tmp, folder)
    return folder


def cached_tokenizer():
    """The built-in tokenizer, loaded from `cached_tokenizer_dir()`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(cached_tokenizer_dir()))


def tokenizer_size(folder: Path) -> int:
    """len(tokenizer) of a saved fast tokenizer, read from its tokenizer.json."""
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    return len({*spec["model"]["vocab"].values(), *(t["id"] for t in spec["added_tokens"])})


# -- model ------------------------------------------------------------------------------------
def build_model(tokenizer, arch: dict[str, Any] | None = None, seed: int = 0):
    """The built-in architecture, randomly initialised (seeded): what pre-training starts from
    and what the benchmarks use as a model of known size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **(arch or ARCH),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def packed_rows(tokenizer, recipe: dict[str, Any]):
    """[steps * batch, seq_len] token rows: seeded shuffles of the EOS-separated statements,
    concatenated and cut (GPT-style pre-training packing)."""
    import numpy as np

    rng = np.random.default_rng(recipe["seed"])
    lines = tokenizer(world.statements(), add_special_tokens=False)["input_ids"]
    lines = [np.array(ids + [tokenizer.eos_token_id], dtype=np.int64) for ids in lines]
    need = recipe["steps"] * recipe["batch_size"] * recipe["seq_len"]
    pieces, have = [], 0
    while have < need:
        for i in rng.permutation(len(lines)):
            pieces.append(lines[i])
            have += len(lines[i])
    stream = np.concatenate(pieces)[:need]
    return stream.reshape(-1, recipe["seq_len"])


def pretrain(
    tokenizer,
    recipe: dict[str, Any] | None = None,
    progress: Progress | None = None,
    arch: dict[str, Any] | None = None,
):
    """(model, info): the built-in model (`arch`, default tiny's) trained per `recipe` with
    transformers' Trainer."""
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    recipe = {**RECIPE, **(recipe or {})}
    rows = torch.from_numpy(packed_rows(tokenizer, recipe))
    dataset = _RowDataset(rows)
    arch = arch or ARCH
    model = build_model(tokenizer, arch, seed=recipe["seed"])
    losses: list[tuple[int, float]] = []

    class Report(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append((state.global_step, float(logs["loss"])))

        def on_step_end(self, args, state, control, **kwargs):
            if progress is not None and (state.global_step % 10 == 0 or state.global_step == 1):
                progress(state.global_step, state.max_steps, losses[-1][1] if losses else None)

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="instructflow-pretrain-") as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=recipe["steps"],
            per_device_train_batch_size=recipe["batch_size"],
            learning_rate=recipe["learning_rate"],
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": recipe["min_lr_rate"]},
            warmup_steps=recipe["warmup_steps"],
            adam_beta2=recipe["adam_beta2"],
            weight_decay=recipe["weight_decay"],
            max_grad_norm=recipe["max_grad_norm"],
            seed=recipe["seed"],
            data_seed=recipe["seed"],
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[Report()])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    model.eval()
    info = {
        "recipe": recipe,
        "arch": arch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens": int(rows.numel()),
        "seconds": round(time.perf_counter() - t0, 1),
        "final_loss": losses[-1][1] if losses else None,
        "loss_curve": losses,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return model.cpu(), info


class _RowDataset:
    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


# -- what the base knows ----------------------------------------------------------------------
def probe(model, tokenizer, facts: dict[str, list[tuple[str, str]]] | None = None):
    """Share of facts per relation whose raw-form prompt ('The capital of Japan is') the model
    continues with exactly the answer's tokens under greedy decoding (teacher-forced argmax,
    which is the same test), plus the answer the model gives first for a few of them."""
    import torch

    facts = facts or {r: list(f) for r, f in world.FACTS.items()}
    out: dict[str, float] = {}
    model.eval()
    with torch.no_grad():
        for relation, pairs in facts.items():
            ok = 0
            for start in range(0, len(pairs), 64):
                chunk = pairs[start : start + 64]
                prompts = [
                    tokenizer(EOS + world.probe_prompt(relation, a) + " ", add_special_tokens=False)
                    for a, _ in chunk
                ]
                answers = [tokenizer(b, add_special_tokens=False)["input_ids"] for _, b in chunk]
                seqs = [p["input_ids"] + a for p, a in zip(prompts, answers, strict=True)]
                width = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
                mask = torch.zeros((len(seqs), width), dtype=torch.long)
                for i, s in enumerate(seqs):
                    ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
                pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
                for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
                    n = len(p["input_ids"])
                    ok += int(pred[i, n - 1 : n - 1 + len(a)].tolist() == a)
            out[relation] = ok / len(pairs) if pairs else float("nan")
    return out


# -- the per-user cache -----------------------------------------------------------------------
def cache_root() -> Path:
    """Where pre-trained built-in models live, shared by all workspaces of the user:
    $INSTRUCTFLOW_CACHE, else $XDG_CACHE_HOME/instructflow, else ~/.cache/instructflow."""
    if os.environ.get("INSTRUCTFLOW_CACHE"):
        return Path(os.environ["INSTRUCTFLOW_CACHE"]).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser().resolve() / "instructflow"


def tokenizer_digest(tokenizer) -> str:
    """Of a loaded tokenizer, or of a saved one's folder (its tokenizer.json, without loading
    transformers: the check a cached run makes)."""
    if isinstance(tokenizer, (str, Path)):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(Path(tokenizer) / "tokenizer.json"))
        return hashlib.sha256(backend.to_str().encode()).hexdigest()
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def cache_key(
    tokenizer, recipe: dict[str, Any] | None = None, arch: dict[str, Any] | None = None
) -> str:
    """Everything that determines the weights: tokenizer, architecture, recipe, corpus, code."""
    payload = {
        "tokenizer": tokenizer_digest(tokenizer),
        "arch": arch or ARCH,
        "recipe": {**RECIPE, **(recipe or {})},
        "corpus": hashlib.sha256("\n".join(world.statements()).encode()).hexdigest(),
        "world_version": world.WORLD_VERSION,
        "code": codeid.digest(__file__),
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    size = next((n.split(":")[1] for n, a in SIZES.items() if a == (arch or ARCH)), "custom")
    return f"{size}-" + hashlib.sha256(blob).hexdigest()[:24]


def _intact(bundle: Path) -> bool:
    from instructflow.artifacts import folder_intact

    return folder_intact(bundle)


def ensure_pretrained(
    tokenizer,
    recipe: dict[str, Any] | None = None,
    progress: Progress | None = None,
    arch: dict[str, Any] | None = None,
) -> tuple[Path, bool]:
    """(bundle dir, whether it came from the cache). `tokenizer`: a loaded tokenizer or a
    saved one's folder (loaded only if the bundle must be built). The bundle holds model/
    (config, safetensors and the tokenizer) and pretrain.json; it is built once per key, under a
    file lock (a second process waits and then loads it), in a temp dir renamed into place."""
    from instructflow import waits
    from instructflow.artifacts import MANIFEST, digest_of, hash_tree

    root = cache_root() / "builtin"
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(tokenizer, recipe, arch)
    bundle = root / key
    # Pre-training takes minutes: a second first run waits here, and says so (waits).
    what = f"building builtin:{key.partition('-')[0]}"
    with waits.cache_lock(root / f"{key}.lock", what, 3600):
        if bundle.is_dir():
            if _intact(bundle):
                return bundle, True
            shutil.rmtree(bundle, ignore_errors=True)  # half-copied or edited: rebuild
        if isinstance(tokenizer, (str, Path)):
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer))
        model, info = pretrain(tokenizer, recipe, progress, arch)
        info["probe"] = probe(model, tokenizer)
        info["cache_key"] = key
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            # model/ is a complete HF model folder (weights + tokenizer): what adapters trained
            # on it name as their base, so PEFT's own loaders find everything there.
            model.save_pretrained(str(tmp / "model"), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp / "model"))
            (tmp / BUNDLE_FILE).write_text(json.dumps(info, indent=1))
            files = hash_tree(tmp)
            manifest = {"digest": digest_of(files), "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            os.rename(tmp, bundle)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return bundle, False


def bundle_info(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / BUNDLE_FILE).read_text())
