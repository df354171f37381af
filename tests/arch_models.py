"""Tiny random models of each architecture the runtime runs, in F32, for
parity with llama.cpp: scripts/make_arch_fixtures.py records what llama.cpp
does with them (and with its own quantizations of them) under
tests/fixtures/arch/, and tests/test_arch_parity.py checks the runtime
against that.

A model is deterministic from its ArchSpec, so the tests write the F32 files
afresh rather than commit them (the fixture keeps their sha256, to notice
when generation changes). The shapes are the smallest that keep what each
family does differently: embedding width 256 (K-quant rows must be whole
256-element super-blocks), the family's own head size, grouped-query
attention, and a 512-token vocabulary of the family's kind, trained on
CORPUS so that there are merges and pieces for words, numbers, whitespace
runs and CJK text to exercise."""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
from tiny_models import byte_level_alphabet

T = gguf.TokenType
VOCAB_SIZE = 512
EMBED_RMS = 0.25  # of the embedding's rows as the blocks get them (Gemma's after its scaling)

# What the vocabularies are trained on: the product's kind of text, code,
# numbers, contractions, whitespace runs, and a little CJK and emoji.
CORPUS = """\
Check the pump before you start the motor. If the motor is hot, let it cool for 10 minutes.
The pressure should be between 2.5 and 3.0 bar; at 4 bar the relief valve opens.
Replace the filter every 500 hours, or when the pressure drop is over 250 Pa.
Torque the M8 bolts to 25 N·m in a star pattern, then check them again after 24 hours.
Error E-042 means the motor is over temperature. Don't reset it until it's cool.
It's the valve, isn't it? We'd've seen it sooner if they'd checked the sensor.
You'll need a 10 mm spanner, a 13 mm socket and the service manual, page 112.
The voltage on pin 3 should read 24 V; 12 V means the supply is failing.
In 2024 we replaced 1,250 bearings and 375 seals across 16 machines.
def check_pressure(value):
    if value > 3.0:
        return "too high"
    return "ok"

for (int i = 0; i < n; i++) {
    total += reading[i];
}
{"pump": "P-101", "status": "ok", "hours": 1234, "pressure": 2.75}
    indented    text    with    runs    of    spaces
line one
line two

a new paragraph after an empty line
泵的压力太高了，请检查阀门。电机过热，请等待冷却。
ポンプの圧力を確認してください。
Done ✅ — the machine is running again 🙂 👍
"""

# ---------------------------------------------------------------- vocabularies


def train_merges(words: Counter[tuple[str, ...]], n: int) -> list[tuple[str, str]]:
    """n BPE merges learned from word counts: each time the most frequent
    adjacent pair, ties to the smallest pair, so every run learns the same."""
    merges: list[tuple[str, str]] = []
    for _ in range(n):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            raise ValueError(f"the corpus holds only {len(merges)} merges, {n} asked for")
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


@dataclass(frozen=True)
class VocabSpec:
    """A tokenizer of one family's kind: its special tokens and how llama.cpp
    is told to run it.

    The specials (text, token type) come first in a SentencePiece vocabulary
    and last in a BPE one, where the families put them."""

    model: str                       # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str                         # tokenizer.ggml.pre
    specials: tuple[tuple[str, int], ...]
    bos: str
    eos: str
    add_bos: bool
    unk: str | None = None
    pad: str | None = None
    add_space_prefix: bool | None = None  # SentencePiece only; None: the key is not written


VOCABS = {
    # Llama 2's SentencePiece: <unk> <s> </s>, byte fallback, a space before each text run.
    "llama-spm": VocabSpec("llama", "default", (("<unk>", T.UNKNOWN), ("<s>", T.CONTROL),
                                                ("</s>", T.CONTROL)),
                           bos="<s>", eos="</s>", unk="<unk>", add_bos=True),
    # Llama 3's byte-level BPE (tiktoken-style split, whole-word tokens skip merging).
    "llama3-bpe": VocabSpec("gpt2", "llama-bpe", (("<|begin_of_text|>", T.CONTROL),
                                                  ("<|end_of_text|>", T.CONTROL),
                                                  ("<|start_header_id|>", T.CONTROL),
                                                  ("<|end_header_id|>", T.CONTROL),
                                                  ("<|eot_id|>", T.CONTROL)),
                            bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True),
    # Qwen's byte-level BPE: digits one by one, ChatML specials, no BOS.
    "qwen2-bpe": VocabSpec("gpt2", "qwen2", (("<|endoftext|>", T.CONTROL), ("<|im_start|>", T.CONTROL),
                                             ("<|im_end|>", T.CONTROL)),
                           bos="<|endoftext|>", eos="<|im_end|>", add_bos=False),
    # Gemma's SentencePiece: no space prefix, newline and space-run pieces,
    # turn markers, user-defined tokens (matched in any text, special or not).
    "gemma-spm": VocabSpec("llama", "default", (("<pad>", T.CONTROL), ("<eos>", T.CONTROL),
                                                ("<bos>", T.CONTROL), ("<unk>", T.UNKNOWN),
                                                ("<mask>", T.USER_DEFINED),
                                                ("<start_of_turn>", T.CONTROL),
                                                ("<end_of_turn>", T.CONTROL),
                                                ("<unused0>", T.USER_DEFINED)),
                           bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>", add_bos=True,
                           add_space_prefix=False),
}


@dataclass
class Vocabulary:
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None


def bpe_vocabulary(v: VocabSpec) -> Vocabulary:
    """Byte-level BPE: the 256 byte stand-ins in byte order, the merges' tokens, the specials."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = Counter(tuple(word) for word, _ in split.pre_tokenize_str(CORPUS))
    merges = train_merges(words, VOCAB_SIZE - 256 - len(v.specials))
    tokens = byte_level_alphabet() + [a + b for a, b in merges] + [t for t, _ in v.specials]
    types = [T.NORMAL] * (VOCAB_SIZE - len(v.specials)) + [ty for _, ty in v.specials]
    return Vocabulary(tokens, types, merges=[f"{a} {b}" for a, b in merges])


def spm_vocabulary(v: VocabSpec) -> Vocabulary:
    """SentencePiece BPE: the specials, the 256 byte tokens, then pieces by
    score: the merges' results (best first), then the corpus's characters.

    Words are whitespace-led as SentencePiece splits them (a run of spaces
    leads the word after it, so pieces of several spaces appear); Llama's
    text never holds a newline piece (it falls back to <0x0A>), Gemma's does."""
    prefix = "▁" if v.add_space_prefix is not False else ""
    lines = CORPUS.splitlines() if prefix else [CORPUS]
    words = Counter(tuple(w) for line in lines
                    for w in re.findall(r"▁*[^▁\n]+|▁+|\n+", prefix + line.replace(" ", "▁")))
    chars = sorted({c for w in words for c in w})
    n_merges = VOCAB_SIZE - len(v.specials) - 256 - len(chars)
    merged = [a + b for a, b in train_merges(words, n_merges)]
    pieces = merged + chars
    tokens = [t for t, _ in v.specials] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [ty for _, ty in v.specials] + [T.BYTE] * 256 + [T.NORMAL] * len(pieces)
    scores = [0.0] * (len(v.specials) + 256) + [-float(i) for i in range(len(pieces))]
    return Vocabulary(tokens, types, scores=scores)


@functools.cache  # trained once per run: every model of a family shares it
def vocabulary(v: VocabSpec) -> Vocabulary:
    vocab = bpe_vocabulary(v) if v.model == "gpt2" else spm_vocabulary(v)
    if len(set(vocab.tokens)) != len(vocab.tokens):
        raise ValueError("the trained vocabulary repeats a token")
    return vocab


def write_vocabulary(w: gguf.GGUFWriter, v: VocabSpec) -> None:
    vocab = vocabulary(v)
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    w.add_tokenizer_model(v.model)
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        w.add_token_merges(vocab.merges)
    w.add_bos_token_id(ids[v.bos])
    w.add_eos_token_id(ids[v.eos])
    if v.unk is not None:
        w.add_unk_token_id(ids[v.unk])
    if v.pad is not None:
        w.add_pad_token_id(ids[v.pad])
    w.add_add_bos_token(v.add_bos)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)


# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class ArchSpec:
    """A tiny model of one family: its shape and what its blocks do besides Llama's."""

    arch: str              # general.architecture
    vocab: str             # a key of VOCABS
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    rope_base: float
    seed: int
    dim: int = 256
    hidden_dim: int = 512
    norm_eps: float = 1e-5
    tied: bool = True
    context_length: int = 2048
    qkv_bias: bool = False          # qwen2: attn_q/k/v.bias
    qk_norm: bool = False           # qwen3, gemma3: per-head RMSNorm of Q and K before RoPE
    gemma: bool = False             # gemma3: post-norms, embedding scaled by sqrt(dim), GELU
    sliding_window: int | None = None   # gemma3.attention.sliding_window
    llama3_rope: tuple[float, float, float, int] | None = None
    # (factor, low_freq_factor, high_freq_factor, original context): Llama 3's
    # RoPE frequency scaling, written as rope_freqs.weight


# The weights' scales (write_arch_model) make the context, not the token just
# read, decide the next one, and llama.cpp's choice decisive (top-2 margin of
# at least 1) at 80-90 % of positions.
ARCH_MODELS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "llama-spm", n_layer=2, n_head=4, n_kv_head=2, head_dim=64,
                      rope_base=10000.0, seed=101),
    # Llama 3's frequency scaling with a short original context, so that it
    # changes the angles of most dimensions within a short test sequence.
    "llama3": ArchSpec("llama", "llama3-bpe", n_layer=2, n_head=4, n_kv_head=2, head_dim=64,
                       rope_base=500000.0, seed=102, tied=False, llama3_rope=(8.0, 1.0, 4.0, 64)),
    "qwen2": ArchSpec("qwen2", "qwen2-bpe", n_layer=2, n_head=4, n_kv_head=2, head_dim=64,
                      rope_base=1000000.0, norm_eps=1e-6, seed=103, qkv_bias=True),
    "qwen3": ArchSpec("qwen3", "qwen2-bpe", n_layer=2, n_head=4, n_kv_head=2, head_dim=128,
                      rope_base=1000000.0, norm_eps=1e-6, seed=104, qk_norm=True),
    # Six blocks: llama.cpp makes every sixth global, the others sliding.
    "gemma3": ArchSpec("gemma3", "gemma-spm", n_layer=6, n_head=2, n_kv_head=1, head_dim=256,
                       rope_base=1000000.0, norm_eps=1e-6, seed=105, qk_norm=True, gemma=True,
                       sliding_window=8),
}


def quantization_source(spec: ArchSpec) -> ArchSpec:
    """The variant of a model that llama.cpp quantizes for the committed
    fixtures: one block and the narrowest FFN K-quants allow, to keep the
    files small (gemma3's one block is a sliding one)."""
    return replace(spec, n_layer=1, hidden_dim=256)


def llama3_rope_factors(spec: ArchSpec) -> np.ndarray:
    """What Llama 3's converter writes as rope_freqs.weight: per frequency, the
    divisor of its angle; 1 for short wavelengths, `factor` for long ones,
    blended between."""
    factor, low, high, old_ctx = spec.llama3_rope
    freqs = spec.rope_base ** (-np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(wavelen < old_ctx / high, 1.0,
                   np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def write_arch_model(path: Path, spec: ArchSpec) -> Path:
    rng = np.random.default_rng(spec.seed)
    w = gguf.GGUFWriter(str(path), spec.arch)
    w.add_block_count(spec.n_layer)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.dim)
    w.add_feed_forward_length(spec.hidden_dim)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_kv_head)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    w.add_rope_freq_base(spec.rope_base)
    if spec.sliding_window is not None:
        w.add_sliding_window(spec.sliding_window)
    w.add_vocab_size(VOCAB_SIZE)
    write_vocabulary(w, VOCABS[spec.vocab])

    def matrix(name: str, rows: int, cols: int, gain: float = 1.0) -> None:
        w.add_tensor(name, (rng.standard_normal((rows, cols)) * gain / np.sqrt(cols)).astype(np.float32))

    def vector(name: str, n: int, mean: float, spread: float) -> None:
        w.add_tensor(name, (mean + spread * rng.standard_normal(n)).astype(np.float32))

    q_dim, kv_dim = spec.n_head * spec.head_dim, spec.n_kv_head * spec.head_dim
    # The blocks see the residual stream through RMSNorm, so a small embedding
    # still tells them the token, and their outputs outweigh it: otherwise a
    # tied output mostly predicts the token just read. Gemma scales the
    # embedding up by sqrt(dim) on the way in, so its rows are that much smaller.
    embd_rms = EMBED_RMS / np.sqrt(spec.dim) if spec.gemma else EMBED_RMS
    w.add_tensor("token_embd.weight",
                 (rng.standard_normal((VOCAB_SIZE, spec.dim)) * embd_rms).astype(np.float32))
    if spec.llama3_rope is not None:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(spec))
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", spec.dim, 1.0, 0.1)
        matrix(p + "attn_q.weight", q_dim, spec.dim, 2.0)   # sharper attention: positions matter
        matrix(p + "attn_k.weight", kv_dim, spec.dim, 2.0)
        matrix(p + "attn_v.weight", kv_dim, spec.dim)
        if spec.qkv_bias:
            vector(p + "attn_q.bias", q_dim, 0.0, 0.5)
            vector(p + "attn_k.bias", kv_dim, 0.0, 0.5)
            vector(p + "attn_v.bias", kv_dim, 0.0, 0.5)
        if spec.qk_norm:
            vector(p + "attn_q_norm.weight", spec.head_dim, 2.0, 0.2)
            vector(p + "attn_k_norm.weight", spec.head_dim, 2.0, 0.2)
        matrix(p + "attn_output.weight", spec.dim, q_dim, 4.0)
        if spec.gemma:
            vector(p + "post_attention_norm.weight", spec.dim, 3.0, 0.3)
        vector(p + "ffn_norm.weight", spec.dim, 1.0, 0.1)
        matrix(p + "ffn_gate.weight", spec.hidden_dim, spec.dim, 2.0)
        matrix(p + "ffn_up.weight", spec.hidden_dim, spec.dim)
        matrix(p + "ffn_down.weight", spec.dim, spec.hidden_dim, 4.0)
        if spec.gemma:
            vector(p + "post_ffw_norm.weight", spec.dim, 3.0, 0.3)
    # Logits spread ~16 through either output: decisive, as a trained model's mostly are.
    vector("output_norm.weight", spec.dim, 1 / embd_rms if spec.tied else 1.0, 0.1)
    if not spec.tied:
        matrix("output.weight", VOCAB_SIZE, spec.dim, np.sqrt(spec.dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
