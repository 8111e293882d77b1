"""The benchmarks' own model: a ~7M Llama with a 4,096-token GPT-2-style BPE trained on Alpaca
rows outside each benchmark's sample, built deterministically.

It is the architecture builtin:tiny had before it became a pre-trained 1.3M model; keeping
it here means the benchmark figures measure the stages, not whatever the built-in model is.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

ARCH = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
VOCAB = 4096


def gpt2_style_bpe(corpus: list[str], vocab_size: int = VOCAB):
    """A byte-level BPE with GPT-2's pre-tokenisation (spaces attach to the next word)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from instructflow.builtin.model import CHATML_TEMPLATE, EOS, IM_END, IM_START, PAD

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, IM_START, IM_END],
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
        model_max_length=ARCH["max_position_embeddings"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "right"
    return fast


def alpaca_bpe_4k(rows: list[dict], folder: Path) -> str:
    """Save the benchmark model (random init, seeded) with a BPE trained on `rows` (Alpaca
    rows the benchmark does not measure) into `folder`; returns the folder as a model path."""
    from instructflow import templates
    from instructflow.builtin.model import build_model

    no_tok = SimpleNamespace(eos_token="")  # rendering needs only the EOS text
    corpus = ["".join(t for t, _ in templates.segments(r, "alpaca", no_tok)) for r in rows]
    tok = gpt2_style_bpe(corpus)
    build_model(tok, arch=ARCH).save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return str(folder)
