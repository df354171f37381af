"""A plain float32 numpy forward pass of a Llama GGUF, the maths written out.

Slow and exact (weights dequantized by gguf-py, no activation rounding): the
yardstick for the C forward pass on tiny test models."""

from __future__ import annotations

import numpy as np
from gguf.quants import dequantize

from edge_slm.model import LoadedModel


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
