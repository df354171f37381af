"""Yardsticks for tests. A plain float32 numpy forward pass of a Llama GGUF,
the maths written out: slow and exact (weights dequantized by gguf-py, no
activation rounding), for the C forward pass on tiny test models. And
generation for one sequence at a time through the C model, for the engine's
batched steps and the parity runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from gguf.quants import dequantize

from edge_slm.generate import TextStream
from edge_slm.model import LoadedModel, Transformer
from edge_slm.sampler import Sampler, SamplingConfig


def _weight(model: LoadedModel, name: str) -> np.ndarray:
    t = model.tensors[name]
    w = dequantize(np.asarray(t.data), t.type.value if hasattr(t.type, "value") else int(t.type))
    return np.asarray(w, dtype=np.float32).reshape(t.rows, t.cols)


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, pos: np.ndarray, base: float) -> np.ndarray:
    """x: [T, heads, head_dim]; rotates adjacent pairs."""
    hd = x.shape[-1]
    inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    c, s = np.cos(ang)[:, None, :].astype(np.float32), np.sin(ang)[:, None, :].astype(np.float32)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out


def reference_logits(model: LoadedModel, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] for a sequence starting at position 0."""
    cfg = model.config
    T = len(ids)
    pos = np.arange(T)
    x = _weight(model, "token_embd.weight")[ids]
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
    group = cfg.n_head // cfg.n_kv_head
    for l in range(cfg.n_layer):
        p = f"blk.{l}."
        h = _rmsnorm(x, model.tensors[p + "attn_norm.weight"].data, cfg.norm_eps)
        q = (h @ _weight(model, p + "attn_q.weight").T).reshape(T, cfg.n_head, cfg.head_dim)
        k = (h @ _weight(model, p + "attn_k.weight").T).reshape(T, cfg.n_kv_head, cfg.head_dim)
        v = (h @ _weight(model, p + "attn_v.weight").T).reshape(T, cfg.n_kv_head, cfg.head_dim)
        q, k = _rope(q, pos, cfg.rope_base), _rope(k, pos, cfg.rope_base)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(cfg.head_dim) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, -1)
        x = x + o @ _weight(model, p + "attn_output.weight").T
        h = _rmsnorm(x, model.tensors[p + "ffn_norm.weight"].data, cfg.norm_eps)
        g = h @ _weight(model, p + "ffn_gate.weight").T
        u = h @ _weight(model, p + "ffn_up.weight").T
        x = x + (g / (1 + np.exp(-g)) * u) @ _weight(model, p + "ffn_down.weight").T
    x = _rmsnorm(x, model.tensors["output_norm.weight"].data, cfg.norm_eps)
    out = "output.weight" if "output.weight" in model.tensors else "token_embd.weight"
    return (x @ _weight(model, out).T).astype(np.float32)


# ---- one sequence at a time: the yardstick for the engine's batched steps

@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 256
    stop: tuple[str, ...] = ()   # strings that end the answer (not included in it)
    ignore_eos: bool = False     # keep going past end-of-generation tokens (parity runs)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop string), "length" (max tokens or context)


def generate(runtime: Transformer, tokenizer, prompt: Sequence[int], cfg: GenerationConfig,
             on_text: Callable[[str], None] | None = None) -> Completion:
    """Prefill `prompt` in slot 0, then sample and decode one token per call."""
    n_ctx = runtime.opts.n_ctx
    assert len(prompt) < n_ctx, "the prompt leaves no room for an answer"
    sampler = Sampler(cfg.sampling)
    stream = TextStream(tokenizer, cfg.stop)
    logits = runtime.prefill(list(prompt))
    history = list(prompt)
    tokens: list[int] = []
    finish = "length"
    while len(tokens) < cfg.max_tokens:
        tok = sampler.sample(logits, history)
        if tokenizer.is_eog(tok) and not cfg.ignore_eos:
            finish = "stop"
            break
        tokens.append(tok)
        history.append(tok)
        piece = stream.feed(tok)
        if piece and on_text:
            on_text(piece)
        if stream.stopped:
            finish = "stop"
            break
        if len(history) > n_ctx or len(tokens) == cfg.max_tokens:
            break
        logits = runtime.prefill([tok], start=len(history) - 1)
    tail = stream.flush()
    if tail and on_text:
        on_text(tail)
    return Completion(tokens, stream.text, finish)
