"""A tiny GGUF file for tests: a 2-layer Llama with random weights and a real tokenizer.

The tokenizer fields (vocabulary, merges, specials, chat template) are copied from the real
SmolLM2 GGUF, so what transformers reads from it is a real GPT-2-style tokenizer; the tensors
are random fp32 ("F32") except the embedding, stored as Q8_0 so de-quantisation runs. It
converts in a few seconds where SmolLM2 takes ~30.
"""

from __future__ import annotations

from pathlib import Path

ARCH = {"layers": 2, "width": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "context": 512}


def write_tiny_gguf(tokenizer_source: Path, out: Path, seed: int = 0) -> Path:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import quantize

    reader = GGUFReader(str(tokenizer_source))
    writer = GGUFWriter(str(out), "llama")
    vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_array(key, value)
            vocab = max(vocab, len(value)) if key == "tokenizer.ggml.tokens" else vocab
        else:
            writer.add_key_value(key, value, field.types[0])
    a = ARCH
    head_dim = a["width"] // a["heads"]
    writer.add_name("tiny-test-llama")
    writer.add_block_count(a["layers"])
    writer.add_context_length(a["context"])
    writer.add_embedding_length(a["width"])
    writer.add_feed_forward_length(a["ffn"])
    writer.add_head_count(a["heads"])
    writer.add_head_count_kv(a["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(head_dim)

    rng = np.random.default_rng(seed)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    embedding = weight(vocab, a["width"])
    writer.add_tensor(
        "token_embd.weight",
        quantize(embedding, GGMLQuantizationType.Q8_0),
        raw_dtype=GGMLQuantizationType.Q8_0,
    )
    writer.add_tensor("output_norm.weight", np.ones(a["width"], dtype=np.float32))
    kv = a["kv_heads"] * head_dim
    for i in range(a["layers"]):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", np.ones(a["width"], dtype=np.float32))
        writer.add_tensor(f"{blk}.ffn_norm.weight", np.ones(a["width"], dtype=np.float32))
        writer.add_tensor(f"{blk}.attn_q.weight", weight(a["width"], a["width"]))
        writer.add_tensor(f"{blk}.attn_k.weight", weight(kv, a["width"]))
        writer.add_tensor(f"{blk}.attn_v.weight", weight(kv, a["width"]))
        writer.add_tensor(f"{blk}.attn_output.weight", weight(a["width"], a["width"]))
        writer.add_tensor(f"{blk}.ffn_gate.weight", weight(a["ffn"], a["width"]))
        writer.add_tensor(f"{blk}.ffn_up.weight", weight(a["ffn"], a["width"]))
        writer.add_tensor(f"{blk}.ffn_down.weight", weight(a["width"], a["ffn"]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
