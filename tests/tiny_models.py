"""Tiny random Llama models written with gguf-py's writer: the loader, the
forward pass and the engine are tested on these in milliseconds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


@dataclass(frozen=True)
class TinySpec:
    n_layer: int = 2
    dim: int = 128
    hidden_dim: int = 96
    n_head: int = 4
    n_kv_head: int = 2
    context_length: int = 256
    weight_type: str = "Q4_1"      # for the matrices
    embd_type: str = "Q8_0"
    tied: bool = True
    arch: str = "llama"
    seed: int = 0
    down_type: str | None = None  # another type for ffn_down, e.g. "Q2_K" (random bytes)
    chat_template: str = CHATML


def write_tiny_model(path: Path, spec: TinySpec = TinySpec()) -> Path:
    rng = np.random.default_rng(spec.seed)
    tokens = byte_level_alphabet() + SPECIALS
    vocab = len(tokens)
    head_dim = spec.dim // spec.n_head
    w = gguf.GGUFWriter(str(path), spec.arch)
    w.add_block_count(spec.n_layer)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.dim)
    w.add_feed_forward_length(spec.hidden_dim)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_kv_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * len(SPECIALS))
    w.add_token_merges([])
    w.add_bos_token_id(256)
    w.add_eos_token_id(256 + SPECIALS.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(spec.chat_template)

    def matrix(name: str, rows: int, cols: int, qtype: str, scale: float) -> None:
        data = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        t = gguf.GGMLQuantizationType[qtype]
        if qtype == spec.down_type:  # a type we cannot quantize: random blocks will do
            elems, nbytes = gguf.GGML_QUANT_SIZES[t]
            w.add_tensor(name, rng.integers(0, 256, (rows, cols // elems * nbytes), dtype=np.uint8),
                         raw_dtype=t)
        elif t == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, quantize(data, t), raw_dtype=t)

    def norm(name: str) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(spec.dim)).astype(np.float32))

    q_dim, kv_dim = spec.n_head * head_dim, spec.n_kv_head * head_dim
    matrix("token_embd.weight", vocab, spec.dim, spec.embd_type, 1.0)
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        s = 1.0 / np.sqrt(spec.dim)
        norm(p + "attn_norm.weight")
        matrix(p + "attn_q.weight", q_dim, spec.dim, spec.weight_type, s)
        matrix(p + "attn_k.weight", kv_dim, spec.dim, spec.weight_type, s)
        matrix(p + "attn_v.weight", kv_dim, spec.dim, spec.weight_type, s)
        matrix(p + "attn_output.weight", spec.dim, q_dim, spec.weight_type, s)
        norm(p + "ffn_norm.weight")
        matrix(p + "ffn_gate.weight", spec.hidden_dim, spec.dim, spec.weight_type, s)
        matrix(p + "ffn_up.weight", spec.hidden_dim, spec.dim, spec.weight_type, s)
        matrix(p + "ffn_down.weight", spec.dim, spec.hidden_dim, spec.down_type or spec.weight_type,
               1.0 / np.sqrt(spec.hidden_dim))
    norm("output_norm.weight")
    if not spec.tied:
        matrix("output.weight", vocab, spec.dim, spec.weight_type, 1.0 / np.sqrt(spec.dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
