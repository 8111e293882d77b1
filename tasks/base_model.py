"""The base model and its tokenizer, as workspace artifacts (helpers of the DAG, not stages).

`builtin:tiny` is a ~7M-parameter Llama-style model with a byte-level BPE tokenizer trained
locally, both created deterministically, so the demo and the tests run offline. Any other
`model.name_or_path` (hub id or local directory) is loaded with transformers; its tokenizer
is saved into the workspace (its digest is the tokenizer identity in tokenize/train cache
keys) and the weights are referenced (hub id + revision, or local path + content digest),
not copied.

Both tasks are uncached: they are cheap and must notice a changed model upstream; their
content-addressed outputs keep downstream cache keys stable when nothing changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from instructflow import demo_data
from instructflow.artifacts import ArtifactRef, sha256_file, write_artifact
from instructflow.caching import stage_task
from instructflow.config import ModelConfig

BUILTIN_TINY = "builtin:tiny"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]
# ChatML: also the fallback chat template for tokenizers that ship none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_ARCH = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
TINY_VOCAB = 4096


class ModelError(RuntimeError):
    pass


def _builtin_corpus() -> list[str]:
    """Text the builtin tokenizer learns merges from: demo tasks, prompt scaffolding, English."""
    rows = demo_data.generate(2000, seed=123)
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows]
    scaffold = (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n\n### Input:\n\n### Response:\n"
        "system user assistant Please Can you Could you Explain Describe Write Give List "
        "the a an of to and in is that for it with as on be are this by what how why which "
        "answer question summary sentence word words number numbers text example following"
    )
    digits = " ".join(str(i) for i in range(200))
    return texts + [scaffold] * 20 + [digits] * 5


def build_builtin_tokenizer():
    return build_bpe_tokenizer(_builtin_corpus(), TINY_VOCAB)


def build_bpe_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `corpus`, with the builtin special tokens and
    ChatML template (also used by the benchmarks for a tokenizer with a fuller vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=TINY_ARCH["max_position_embeddings"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "right"
    return fast


def _load_hub_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as exc:
        raise ModelError(
            f"model.name_or_path={cfg.name_or_path}: tokenizer could not be loaded "
            f"({type(exc).__name__}); check the id / path and network"
        ) from None
    if tok.eos_token is None:
        raise ModelError(f"{cfg.name_or_path}: tokenizer has no eos_token; generations can't stop")
    if tok.pad_token is None:
        # Labels come from the tokenize stage, never from pad ids, so pad == eos is safe here.
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def prepare_tokenizer(cfg: ModelConfig) -> ArtifactRef:
    tok = (
        build_builtin_tokenizer() if cfg.name_or_path == BUILTIN_TINY else _load_hub_tokenizer(cfg)
    )

    def write(tmp: Path) -> dict[str, Any]:
        tok.save_pretrained(str(tmp))
        return {
            "params": {"name_or_path": cfg.name_or_path, "vocab_size": len(tok)},
            "summary": f"{cfg.name_or_path} tokenizer, {len(tok)} tokens",
        }

    return write_artifact("tokenizer", write)


def load_tokenizer(ref: ArtifactRef | str | Path):
    from transformers import AutoTokenizer

    path = ref.path if isinstance(ref, ArtifactRef) else str(ref)
    return AutoTokenizer.from_pretrained(path)


def _local_weights_digest(path: Path) -> str:
    """Content digest of a local model folder (config + weights) so edits re-run training."""
    files = sorted(p for p in path.iterdir() if p.is_file())
    return json.dumps({p.name: sha256_file(p) for p in files}, sort_keys=True)


def _hub_revision(cfg: ModelConfig) -> str | None:
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(cfg.name_or_path, revision=cfg.revision).sha
    except Exception:
        return cfg.revision


def prepare_base_model(cfg: ModelConfig, tokenizer: ArtifactRef) -> ArtifactRef:
    def write(tmp: Path) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name_or_path": cfg.name_or_path,
            "revision": cfg.revision,
            "trust_remote_code": cfg.trust_remote_code,
            "attn_implementation": cfg.attn_implementation,
            "tokenizer_digest": tokenizer.digest,
        }
        if cfg.name_or_path == BUILTIN_TINY:
            info["kind"] = "builtin"
            info["weights"] = "weights"
            model = build_builtin_model(load_tokenizer(tokenizer))
            model.save_pretrained(str(tmp / "weights"), safe_serialization=True)
            n_params = sum(p.numel() for p in model.parameters())
        elif Path(cfg.name_or_path).is_dir():
            local = Path(cfg.name_or_path).resolve()
            info.update(kind="local", name_or_path=str(local))
            info["content"] = _local_weights_digest(local)
            n_params = None
        else:
            info.update(kind="hub", revision=_hub_revision(cfg))
            n_params = None
        (tmp / "model.json").write_text(json.dumps(info, indent=1, sort_keys=True))
        meta: dict[str, Any] = {
            "params": {"kind": info["kind"], "name_or_path": info["name_or_path"]},
            "summary": f"{info['kind']} {cfg.name_or_path}",
        }
        if n_params:
            meta["metrics"] = {"parameters": n_params}
        return meta

    return write_artifact("base_model", write)


def build_builtin_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_ARCH,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def model_info(ref: ArtifactRef) -> dict[str, Any]:
    return json.loads(ref.file("model.json").read_text())


def base_model_source(ref: ArtifactRef) -> tuple[str, dict[str, Any]]:
    """(path or hub id, from_pretrained kwargs) of the base weights this artifact refers to."""
    info = model_info(ref)
    kwargs: dict[str, Any] = {
        "trust_remote_code": bool(info.get("trust_remote_code")),
        "use_safetensors": True,
    }
    if info.get("attn_implementation"):
        kwargs["attn_implementation"] = info["attn_implementation"]
    if info["kind"] == "builtin":
        return str(ref.file(info["weights"])), kwargs
    if info["kind"] == "hub" and info.get("revision"):
        kwargs["revision"] = info["revision"]
    return info["name_or_path"], kwargs


def load_base_model(ref: ArtifactRef, **overrides: Any):
    """Load the base causal LM (safetensors only); `overrides` go to from_pretrained."""
    from transformers import AutoModelForCausalLM

    source, kwargs = base_model_source(ref)
    kwargs.update(overrides)
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise ModelError(f"{source}: base model could not be loaded ({exc})") from None


tokenizer_task = stage_task("tokenizer", cache=False)(prepare_tokenizer)
base_model_task = stage_task("base_model", cache=False)(prepare_base_model)
