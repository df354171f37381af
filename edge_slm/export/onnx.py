"""`edge-slm export MODEL.gguf --to onnx OUT`: a GGUF model as an ONNX
decoder folder, in the layout ONNX Runtime's generative tooling and Hugging
Face's exporters write, so that ONNX Runtime (and onnxruntime-genai) run it.

  OUT/model.onnx          the decoder (model.onnx.data beside it past 2 GB)
  OUT/genai_config.json   what onnxruntime-genai reads
  OUT/tokenizer.json      the `tokenizers` object edge_slm.tokenizer builds from the GGUF
  OUT/tokenizer_config.json, special_tokens_map.json
  OUT/edge-slm.json       the GGUF's metadata, for edge-slm's onnx backend (edge_slm/backends/sidecar.py)

The decoder's interface, per call:
  input_ids [batch, seq] int64, attention_mask [batch, total_seq] int64,
  position_ids [batch, seq] int64, past_key_values.N.key / .value
  [batch, kv_heads, past_seq, head_dim] float32  ->  logits [batch, seq,
  vocab] float32, present.N.key / .value [batch, kv_heads, total_seq, head_dim].

The graph, per layer, in ONNX Runtime's fused ops where they compute what
the family does, as onnxruntime-genai's model builder writes Llama-family
models for the CPU, and in standard ops (opset 21) elsewhere; ONNX Runtime's
cost per token is mostly per node (a decode step of SmolLM2-135M ran ~2000
nodes in standard ops, ~630 fused):

- each residual add and the RMSNorm after it: SkipSimplifiedLayerNormalization
  (com.microsoft); a norm without one written out (x / sqrt(mean(x^2) + eps)
  * w), the pattern ONNX Runtime fuses into SimplifiedLayerNormalization.
- attention, for families without per-head Q/K norms or a sliding window
  (llama, llama 3's RoPE factors, qwen2's biases): GroupQueryAttention
  (com.microsoft) with its rotary (cos/sin caches by position; adjacent pairs
  for Llama's permuted rows, halves for NeoX), appending this call's K/V to
  the past into present. Keys are every position of attention_mask, padding
  masked by an attention_bias from it, and positions are the cache's (past +
  i): position_ids is not read, and a left-padded row's positions are shifted
  by its padding, which RoPE's scores do not see (they depend on distances).
- otherwise (qwen3, gemma3): RoPE as products with the cos/sin tables gathered
  at position_ids; attention as Concat of the past KV with this call's,
  scores over grouped-query heads by broadcasting each KV head over its query
  heads (the same as repeating it, with no copy), a boolean mask (causal by
  index, attention_mask's padding, the sliding window where the family has
  one) applied with Where before Softmax.

The RoPE tables are computed as the C kernels compute them (double angles,
rounded once). Weight types and how each is carried: see onnx_weights.py and
`linears` below; Q/K/V, and gate/up, of one type are one product each. The
model's metadata says which attention the graph holds ("attention":
"GroupQueryAttention" or "standard"), for what the onnx backend plans.

For a SentencePiece vocabulary the folder holds tokenizer.model (the proto
edge_slm.tokenizer builds) in place of tokenizer.json, which onnxruntime-genai's
tokenizer does not read; the export says so."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..backends.sidecar import sidecar, write_sidecar
from ..errors import EdgeSlmError, UnsupportedModel
from ..formats import TensorType
from ..model import LoadedModel, ModelConfig
from ..tokenizer import Tokenizer
from .onnx_weights import BLOCK, NBitsWeight, float_vector, float_weight, nbits_weight, nbits_weight_type

log = logging.getLogger(__name__)

OPSET = 21           # standard ops; ONNX Runtime 1.17 and later run it (GroupQueryAttention's
                     # attention_bias, used by the fused graph, came with 1.22)
IR_VERSION = 10      # the IR of opset 21 (onnx 1.23 writes 14 by default, newer than ONNX Runtime reads)
MS_DOMAIN = "com.microsoft"
# MatMulNBits' accuracy_level by default 4: the input is quantized to int8
# per block for the product, as our kernels and llama.cpp quantize
# activations. 0, the float path, is exact but on ONNX Runtime 1.31's CPU
# kernels ~3x slower for 4-bit weights and ~100x for 8-bit ones.
ACCURACY_LEVEL = 4
MODEL_FILE = "model.onnx"
PROTO_LIMIT = 2 << 30  # protobuf's limit on one message: past it, weights go to model.onnx.data
# The families whose forward pass the graph below writes out.
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
# onnxruntime-genai's model type for each family.
GENAI_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
NEG = float(np.finfo(np.float32).min)  # a masked score: finite, so a fully padded row stays finite

Progress = Callable[[int], None]  # bytes of the GGUF's tensors converted since the last call


@dataclass(frozen=True)
class OnnxExport:
    """What an export wrote."""

    folder: Path
    files: tuple[str, ...]
    bytes: int
    weight_types: dict[str, str]  # GGUF type -> how the graph holds it
    note: str | None              # what the folder lacks for onnxruntime-genai, if anything
    inexact_offsets: int          # Q4_1 blocks whose m + 8d float32 rounds (onnx_weights.py)


def _onnx():
    try:
        import onnx
    except ImportError:
        raise EdgeSlmError("exporting to ONNX needs the onnx package: "
                           "pip install 'edge-slm[export-onnx]'") from None
    return onnx


class _Graph:
    """Nodes and initializers, with names made unique as they are added."""

    def __init__(self):
        self.onnx = _onnx()
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._taken: set[str] = set()
        self._small: dict[tuple, str] = {}

    def _unique(self, name: str) -> str:
        out, n = name, 1
        while out in self._taken:
            out, n = f"{name}_{n}", n + 1
        self._taken.add(out)
        return out

    def op(self, op_type: str, *inputs: str, name: str, outputs: int = 1, out: str | list[str] | None = None,
           domain: str = "", unused: tuple[int, ...] = (), **attrs: Any) -> Any:
        """Add a node; its output name (a tuple of them when outputs > 1).
        `out` names graph outputs; outputs numbered in `unused` are optional
        ones left out (named "", so that the node does not compute them)."""
        name = self._unique(name)
        outs = ([out] if isinstance(out, str) else list(out)) if out else [
            "" if i in unused else f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), outs, name=name,
                                                     domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def const(self, name: str, value: np.ndarray | list | float | int, dtype: Any = None) -> str:
        """An initializer; a small constant asked for again under its name is the same one."""
        array = np.asarray(value, dtype=dtype)
        key = (name, array.dtype.str, array.shape, array.tobytes()) if array.size <= 16 else None
        if key in self._small:
            return self._small[key]
        unique = self._unique(name)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, unique))
        if key:
            self._small[key] = unique
        return unique

    def ints(self, name: str, *values: int) -> str:
        return self.const(name, list(values), np.int64)


@dataclass(frozen=True)
class _Held:
    """How the graph holds a matrix (its arrays are in the initializers only)."""

    init: str               # the codes' initializer (MatMulNBits), or the floats'
    bits: int | None        # None: floats
    rows: int
    offsets: bool = False   # Q4_1's m + 8d term, initializer "<names joined by +>.offsets"
    float16: bool = False   # floats stored as float16


class _Decoder:
    """The decoder graph of one model, built in one pass over its layers."""

    def __init__(self, model: LoadedModel, progress: Progress | None, accuracy_level: int):
        self.m = model
        self.accuracy_level = accuracy_level
        self.cfg: ModelConfig = model.config
        self.g = _Graph()
        self.progress = progress
        self._weights: dict[tuple[str, ...], _Held] = {}  # GGUF matrices side by side -> how held
        self._block_sums: dict[str, str] = {}  # input -> its per-block sums (for Q4_1's offsets)
        self._block_ones: dict[int, str] = {}  # K -> the 0/1 matrix [K, K / 32] that sums blocks
        self._shapes_3d: dict[int, str] = {}   # width -> the shape [batch, seq, width]
        # GroupQueryAttention (RoPE inside it) where it computes exactly what the
        # family does; per-head Q/K norms come before RoPE and a sliding window
        # differs by family, so those take the standard ops.
        self.fused = not self.cfg.swa_window and not any(
            n.endswith(("attn_q_norm.weight", "attn_k_norm.weight")) for n in model.tensors)
        self.gqa: tuple[str, str, str] = ("", "", "")  # seqlens_k, total_sequence_length, attention_bias
        self.weight_types: dict[str, str] = {}
        self.inexact = 0  # Q4_1 blocks whose m + 8d is rounded

    # ---- weights

    def _matrix(self, names: tuple[str, ...]) -> _Held:
        """The initializers of GGUF matrices side by side (rows after rows), made
        once: one MatMulNBits serves projections of one input (Q, K and V; gate
        and up), and a tied embedding is also the output projection. Matrices
        of more than one type, or without a MatMulNBits form, are asked for
        one by one."""
        if names not in self._weights:
            tensors = [self.m.tensors[n] for n in names]
            t, g, key = tensors[0], self.g, "+".join(names)
            ws = [nbits_weight(x) for x in tensors]
            if ws[0] is not None:
                w = ws[0] if len(ws) == 1 else NBitsWeight(
                    ws[0].bits, np.concatenate([x.codes for x in ws]), np.concatenate([x.scales for x in ws]),
                    None if ws[0].offsets is None else np.concatenate([x.offsets for x in ws]),
                    sum(x.inexact for x in ws))
                codes = g.const(f"{key}.codes", w.codes)
                g.const(f"{key}.scales", w.scales)
                if w.offsets is not None:
                    g.const(f"{key}.offsets", np.ascontiguousarray(w.offsets.T))  # [K / 32, N]
                    self.inexact += w.inexact
                self._weights[names] = _Held(codes, w.bits, w.rows, w.offsets is not None)
                self.weight_types[t.type.name] = f"MatMulNBits bits={w.bits} block_size={BLOCK}" + (
                    " and the m + 8d term as a MatMul" if w.offsets is not None else "")
            else:
                assert len(names) == 1
                values = float_weight(t)
                if values.dtype != np.float16:
                    values = values.astype(np.float32)
                self._weights[names] = _Held(g.const(key, values), None, t.rows,
                                             float16=values.dtype == np.float16)
                self.weight_types[t.type.name] = (
                    "float16, cast to float32 for Gemm" if values.dtype == np.float16
                    else "float32 Gemm" + ("" if t.type == TensorType.F32 else ", dequantized by gguf-py"))
            if self.progress is not None:
                self.progress(sum(x.nbytes for x in tensors))
        return self._weights[names]

    def _floats(self, name: str) -> np.ndarray:
        """A norm's, bias's or RoPE factors' values, float32 [n]."""
        t = self.m.tensors[name]
        if self.progress is not None:
            self.progress(t.nbytes)
        return float_vector(t)

    def _vector(self, name: str) -> str:
        return self.g.const(name, self._floats(name))

    def _block_sum(self, x: str, cols: int) -> str:
        """x [T, K] -> [T, K / 32], the sum of each block of 32: what Q4_1's offset
        multiplies. A product with a 0/1 matrix [K, K / 32]: one node where a
        Reshape and a ReduceSum would be two, on a path taken per projection
        per token, where ONNX Runtime's cost is per node."""
        if x not in self._block_sums:
            g = self.g
            if cols not in self._block_ones:
                ones = np.kron(np.eye(cols // BLOCK, dtype=np.float32), np.ones((BLOCK, 1), np.float32))
                self._block_ones[cols] = g.const(f"block_ones_{cols}", ones)
            self._block_sums[x] = g.op("MatMul", x, self._block_ones[cols], name=f"{x}/block_sums")
        return self._block_sums[x]

    def linears(self, x: str, names: tuple[str, ...], scope: str, packed: bool = False) -> list[str]:
        """x [T, K] @ W.T for each GGUF matrix W [N, K] named: one product when they
        share a type with a MatMulNBits form, split after it (or, `packed`, left
        whole: then the list has one entry, the products side by side)."""
        types = {self.m.tensors[n].type for n in names}
        if len(names) > 1 and (len(types) > 1 or nbits_weight_type(types.pop()) is None):
            return [self.linears(x, (n,), f"{scope}/{n.split('.')[-2]}")[0] for n in names]
        g = self.g
        w = self._matrix(names)
        key, K = "+".join(names), self.m.tensors[names[0]].cols
        if w.bits is None:
            weight = g.op("Cast", w.init, to=1, name=f"{scope}/weight_f32") if w.float16 else w.init
            return [g.op("Gemm", x, weight, transB=1, name=scope)]
        # No zero points: MatMulNBits' default, 2^(bits - 1), is ggml's (Q4_0, Q8_0 and Q4_1 as above).
        y = g.op("MatMulNBits", x, w.init, f"{key}.scales", domain=MS_DOMAIN, K=K, N=w.rows, bits=w.bits,
                 block_size=BLOCK, accuracy_level=self.accuracy_level, name=scope)
        if w.offsets:
            y = g.op("Gemm", self._block_sum(x, K), f"{key}.offsets", y, name=f"{scope}/plus_offsets")
        if len(names) == 1 or packed:
            return [y]
        rows = [self.m.tensors[n].rows for n in names]
        return list(g.op("Split", y, g.ints(f"{scope}/rows", *rows), axis=-1, outputs=len(names),
                         name=f"{scope}/split"))

    def linear(self, x: str, name: str, scope: str) -> str:
        return self.linears(x, (name,), scope)[0]

    def embed(self, ids: str) -> str:
        """ids [T] -> [T, dim], the embedding's rows exactly as ggml dequantizes
        them: d * (q - zero point) is exact in float32, and Q4_1's
        d * (q - 8) + (m + 8d) rounds once, to the value of d * q + m."""
        g, name = self.g, "token_embd.weight"
        w = self._matrix((name,))
        if w.bits is None:
            rows = g.op("Gather", w.init, ids, axis=0, name="/embed/rows")
            return g.op("Cast", rows, to=1, name="/embed/rows_f32") if w.float16 else rows
        codes = g.op("Gather", w.init, ids, axis=0, name="/embed/codes")     # [T, nb, bytes]
        if w.bits == 4:  # unpack MatMulNBits' order: element 2i low, 2i + 1 high
            lo = g.op("BitwiseAnd", codes, g.const("nibble_mask", 0x0F, np.uint8), name="/embed/low")
            hi = g.op("BitShift", codes, g.const("nibble_shift", 4, np.uint8), direction="RIGHT",
                      name="/embed/high")
            pairs = g.op("Concat", g.op("Unsqueeze", lo, g.ints("last", -1), name="/embed/low_1"),
                         g.op("Unsqueeze", hi, g.ints("last", -1), name="/embed/high_1"), axis=-1,
                         name="/embed/pairs")
            codes = g.op("Reshape", pairs, g.ints("block_shape", 0, 0, BLOCK), name="/embed/block_codes")
        q = g.op("Sub", g.op("Cast", codes, to=1, name="/embed/codes_f32"),
                 g.const("embed_zero_point", float(1 << (w.bits - 1)), np.float32), name="/embed/centred")
        scales = g.op("Unsqueeze", g.op("Gather", f"{name}.scales", ids, axis=0, name="/embed/scales"),
                      g.ints("last", -1), name="/embed/scales_1")
        x = g.op("Mul", q, scales, name="/embed/scaled")
        if w.offsets:
            offsets = g.op("Transpose", g.op("Gather", f"{name}.offsets", ids, axis=1, name="/embed/offsets"),
                           perm=[1, 0], name="/embed/offsets_t")                       # [T, nb]
            x = g.op("Add", x, g.op("Unsqueeze", offsets, g.ints("last", -1), name="/embed/offsets_1"),
                     name="/embed/plus_offsets")
        return g.op("Reshape", x, g.ints("rows_shape", -1, self.cfg.dim), name="/embed/rows")

    # ---- pieces of the forward pass

    def rmsnorm(self, x: str, weight: str, scope: str) -> str:
        """RMSNorm over the last axis, written as ONNX Runtime's fusion of it
        into SimplifiedLayerNormalization expects (that op itself is ONNX
        Runtime's, registered in the standard domain, where onnx's checker
        refuses it)."""
        g = self.g
        sq = g.op("Pow", x, g.const("two", 2.0, np.float32), name=f"{scope}/square")
        mean = g.op("ReduceMean", sq, g.ints("last_axis", -1), keepdims=1, name=f"{scope}/mean")
        rms = g.op("Sqrt", g.op("Add", mean, g.const("eps", self.cfg.norm_eps, np.float32),
                                name=f"{scope}/plus_eps"), name=f"{scope}/rms")
        return g.op("Mul", g.op("Div", x, rms, name=f"{scope}/normed"), self._vector(weight), name=scope)

    def residual_rmsnorm(self, x: str, residual: str, weight: str, scope: str,
                         keep_sum: bool = True) -> tuple[str, str]:
        """(RMSNorm(x + residual), x + residual) in one SkipSimplifiedLayerNormalization
        (the sum "" when not kept)."""
        normed, _, _, total = self.g.op("SkipSimplifiedLayerNormalization", residual, x, self._vector(weight),
                                        epsilon=self.cfg.norm_eps, domain=MS_DOMAIN, outputs=4,
                                        unused=(1, 2) if keep_sum else (1, 2, 3), name=scope)
        return normed, total

    def rope_cache(self, base: float, scale: float, factors: np.ndarray | None, tag: str) -> tuple[str, str]:
        """cos and sin [context, head_dim / 2] by position, initializers: the
        angles as the C kernels compute them (double, rounded once), linear
        scaling and Llama 3's factors folded in."""
        cfg, g = self.cfg, self.g
        hd = cfg.head_dim
        inv = scale * base ** (-2.0 * np.arange(hd // 2, dtype=np.float64) / hd)
        if factors is not None:
            inv = inv / factors.astype(np.float64)
        angles = np.arange(cfg.context_length, dtype=np.float64)[:, None] * inv[None, :]
        cos, sin = (g.const(f"rope.{tag}.{fn.__name__}", fn(angles).astype(np.float32)) for fn in (np.cos, np.sin))
        return cos, sin

    def rope_tables(self, cache: tuple[str, str], tag: str) -> tuple[str, str]:
        """The cache gathered at position_ids -> [batch, seq, 1, head_dim / 2]
        (and a trailing 1 for adjacent pairs), for rope()."""
        g = self.g
        axes = g.ints("rope_axes", 2) if self.cfg.rope_neox else g.ints("rope_axes", 2, 4)
        return tuple(g.op("Unsqueeze", g.op("Gather", table, "position_ids", axis=0, name=f"/rope_{tag}/{fn}"),
                          axes, name=f"/rope_{tag}/{fn}_b") for table, fn in zip(cache, ("cos", "sin")))

    def rope(self, x: str, cs: tuple[str, str], heads: int, scope: str) -> str:
        """x [batch, seq, heads, head_dim] rotated: pairs (i, i + head_dim / 2)
        in NeoX families, adjacent pairs (2i, 2i + 1) in Llama's."""
        g, hd = self.g, self.cfg.head_dim
        cos, sin = cs
        if not self.cfg.rope_neox:
            x = g.op("Reshape", x, g.ints("pairs_shape", 0, 0, heads, hd // 2, 2), name=f"{scope}/pairs")
        half = hd // 2 if self.cfg.rope_neox else 1
        a, b = g.op("Split", x, g.ints("halves", half, half), axis=-1, outputs=2, name=f"{scope}/split")

        def mul(u: str, w: str) -> str:
            return g.op("Mul", u, w, name=f"{scope}/mul")

        ra = g.op("Sub", mul(a, cos), mul(b, sin), name=f"{scope}/ra")
        rb = g.op("Add", mul(a, sin), mul(b, cos), name=f"{scope}/rb")
        y = g.op("Concat", ra, rb, axis=-1, name=f"{scope}/rotated")
        if not self.cfg.rope_neox:
            y = g.op("Reshape", y, g.ints("heads_shape", 0, 0, heads, hd), name=f"{scope}/rotated_heads")
        return y

    def masks(self) -> tuple[str, str | None]:
        """Which keys each query sees, bool [batch, 1, 1, seq, total_seq]: those at or
        before it (by index in the sequence) that attention_mask keeps; and the
        same within the sliding window, for families that have one."""
        g, cfg = self.g, self.cfg
        zero, one = g.const("zero", 0, np.int64), g.const("one", 1, np.int64)
        seq = g.op("Gather", self.shape, one, axis=0, name="/mask/seq")
        total = g.op("Gather", g.op("Shape", "attention_mask", name="/mask/shape"), one, axis=0,
                     name="/mask/total")
        past = g.op("Sub", total, seq, name="/mask/past")
        keys = g.op("Range", zero, total, one, name="/mask/key_index")                   # [total]
        queries = g.op("Unsqueeze", g.op("Range", past, total, one, name="/mask/query_index"),
                       g.ints("axis_1", 1), name="/mask/query_column")                   # [seq, 1]
        causal = g.op("LessOrEqual", keys, queries, name="/mask/causal")                # [seq, total]
        kept = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=9, name="/mask/kept_bool"),
                    g.ints("mask_axes", 1, 2, 3), name="/mask/kept")            # [batch, 1, 1, 1, total]
        full = g.op("And", causal, kept, name="/mask/full")
        if not cfg.swa_window:
            return full, None
        near = g.op("Less", g.op("Sub", queries, keys, name="/mask/distance"),
                    g.const("window", cfg.swa_window, np.int64), name="/mask/near")
        return full, g.op("And", full, near, name="/mask/sliding")

    def gqa_inputs(self) -> tuple[str, str, str]:
        """GroupQueryAttention's seqlens_k (int32 [batch]), total_sequence_length
        (int32 scalar) and attention_bias [batch, 1, seq, total_seq]. Every row's
        keys are all total_seq positions, padding included (seqlens_k =
        total_seq - 1, not the builder's ReduceSum(attention_mask) - 1, which
        reads right padding only); the bias drops what attention_mask drops,
        so left-padded batches work as on the standard path."""
        g = self.g
        batch = g.op("Shape", "attention_mask", end=1, name="/gqa/batch")                 # [1]
        total = g.op("Shape", "attention_mask", start=1, name="/gqa/total")               # [1]
        seq = g.op("Shape", "input_ids", start=1, name="/gqa/seq")                        # [1]
        last = g.op("Sub", total, g.const("one", 1, np.int64), name="/gqa/last")
        seqlens = g.op("Cast", g.op("Expand", last, batch, name="/gqa/last_each"), to=6, name="/gqa/seqlens_k")
        total_len = g.op("Cast", g.op("Reshape", total, g.ints("scalar"), name="/gqa/total_scalar"), to=6,
                         name="/gqa/total_sequence_length")
        kept = g.op("Cast", "attention_mask", to=9, name="/gqa/kept")
        bias = g.op("Where", kept, g.const("zero_f", 0.0, np.float32), g.const("neg", NEG, np.float32),
                    name="/gqa/bias_keys")                                                 # [batch, total]
        bias = g.op("Unsqueeze", bias, g.ints("bias_axes", 1, 2), name="/gqa/bias_1")    # [batch, 1, 1, total]
        shape = g.op("Concat", batch, g.ints("one_1", 1), seq, total, axis=0, name="/gqa/bias_shape")
        return seqlens, total_len, g.op("Expand", bias, shape, name="/gqa/attention_bias")

    def attention(self, x: str, layer: int, cs: tuple[str, str], mask: str | None) -> str:
        """x [T, dim] -> [T, dim]: fused (GroupQueryAttention, `cs` the RoPE
        cache) where the family allows, else in standard ops (`cs` the tables
        at position_ids)."""
        p, scope = f"blk.{layer}.", f"/layers.{layer}/attn"
        if self.fused:
            out = self.fused_attention(x, layer, cs, scope)
        else:
            out = self.standard_attention(x, layer, cs, mask, scope)
        out = self.linear(out, p + "attn_output.weight", f"{scope}/o_proj")
        if p + "post_attention_norm.weight" in self.m.tensors:
            out = self.rmsnorm(out, p + "post_attention_norm.weight", f"{scope}/post_norm")
        return out

    def fused_attention(self, x: str, layer: int, cache: tuple[str, str], scope: str) -> str:
        """Q, K, V (packed when one product makes them), biases added, into
        GroupQueryAttention with its rotary (adjacent pairs for Llama's
        permuted rows, halves for NeoX), which appends to the past and writes
        present -> [T, n_head * head_dim]."""
        cfg, g, p = self.cfg, self.g, f"blk.{layer}."
        parts = ("q", "k", "v")
        widths = [self.m.tensors[p + f"attn_{c}.weight"].rows for c in parts]
        ys = self.linears(x, tuple(p + f"attn_{c}.weight" for c in parts), f"{scope}/qkv_proj", packed=True)
        groups = [parts] if len(ys) == 1 else [(c,) for c in parts]
        qkv = []
        for y, group in zip(ys, groups):
            biases = [p + f"attn_{c}.bias" for c in group]
            group_widths = [widths[parts.index(c)] for c in group]
            if any(b in self.m.tensors for b in biases):
                values = np.concatenate([self._floats(b) if b in self.m.tensors else np.zeros(w, np.float32)
                                         for b, w in zip(biases, group_widths)])
                y = g.op("Add", y, g.const("+".join(biases), values), name=f"{scope}/{''.join(group)}_bias")
            qkv.append(g.op("Reshape", y, self._shape_rows(sum(group_widths)), name=f"{scope}/{''.join(group)}_3d"))
        if len(qkv) == 1:
            qkv += ["", ""]  # key and value packed into query
        seqlens, total, bias = self.gqa
        scale = cfg.attn_scale if cfg.attn_scale > 0 else 1.0 / math.sqrt(cfg.head_dim)
        name = f"{scope}/gqa"
        out, _, _ = g.op("GroupQueryAttention", *qkv, f"past_key_values.{layer}.key",
                         f"past_key_values.{layer}.value", seqlens, total, *cache, "", bias,
                         domain=MS_DOMAIN, num_heads=cfg.n_head, kv_num_heads=cfg.n_kv_head, scale=scale,
                         do_rotary=1, rotary_interleaved=0 if cfg.rope_neox else 1, name=name,
                         out=[f"{name}/output_0", f"present.{layer}.key", f"present.{layer}.value"])
        return g.op("Reshape", out, g.ints("rows_q", -1, cfg.n_head * cfg.head_dim), name=f"{scope}/out_rows")

    def _shape_rows(self, width: int) -> str:
        """[batch, seq, width]: a [T, width] tensor back in the batch's shape."""
        if width not in self._shapes_3d:
            self._shapes_3d[width] = self.g.op("Concat", self.shape, self.g.ints(f"width_{width}", width), axis=0,
                                               name=f"/shape_rows_{width}")
        return self._shapes_3d[width]

    def standard_attention(self, x: str, layer: int, cs: tuple[str, str], mask: str, scope: str) -> str:
        """Attention in standard ops: the past's K/V and this call's concatenated
        into present, scores over grouped heads, the boolean mask -> [T, n_head * head_dim]."""
        cfg, g = self.cfg, self.g
        p = f"blk.{layer}."
        tensors = self.m.tensors
        kvh, hd = cfg.n_kv_head, cfg.head_dim

        projected = dict(zip("qkv", self.linears(x, tuple(p + f"attn_{part}.weight" for part in "qkv"),
                                                 f"{scope}/qkv_proj")))

        def heads(part: str, n: int) -> str:
            y = projected[part]
            if p + f"attn_{part}.bias" in tensors:
                y = g.op("Add", y, self._vector(p + f"attn_{part}.bias"), name=f"{scope}/{part}_bias")
            y = g.op("Reshape", y, self.shape_heads[n], name=f"{scope}/{part}_heads")  # [b, s, n, hd]
            if p + f"attn_{part}_norm.weight" in tensors:
                y = self.rmsnorm(y, p + f"attn_{part}_norm.weight", f"{scope}/{part}_norm")
            return y

        q = self.rope(heads("q", cfg.n_head), cs, cfg.n_head, f"{scope}/q_rope")
        k = self.rope(heads("k", kvh), cs, kvh, f"{scope}/k_rope")
        v = heads("v", kvh)
        bhsd = [0, 2, 1, 3]
        k, v = (g.op("Concat", f"past_key_values.{layer}.{part}",
                     g.op("Transpose", new, perm=bhsd, name=f"{scope}/{part}_t"), axis=2,
                     name=f"{scope}/present_{part}", out=f"present.{layer}.{part}")
                for part, new in (("key", k), ("value", v)))
        # Query heads as [b, kv_heads, group, s, hd]: head h reads KV head h // group,
        # which MatMul broadcasts to from [b, kv_heads, 1, ...].
        qg = g.op("Transpose", g.op("Reshape", q, self.shape_groups, name=f"{scope}/q_groups"),
                  perm=[0, 2, 3, 1, 4], name=f"{scope}/q_t")
        k1 = g.op("Unsqueeze", g.op("Transpose", k, perm=[0, 1, 3, 2], name=f"{scope}/k_tt"),
                  g.ints("axis_2", 2), name=f"{scope}/k_b")
        v1 = g.op("Unsqueeze", v, g.ints("axis_2", 2), name=f"{scope}/v_b")
        scale = cfg.attn_scale if cfg.attn_scale > 0 else 1.0 / math.sqrt(hd)
        scores = g.op("Mul", g.op("MatMul", qg, k1, name=f"{scope}/qk"),
                      g.const("attn_scale", scale, np.float32), name=f"{scope}/scores")  # [b, kvh, g, s, total]
        scores = g.op("Where", mask, scores, g.const("neg", NEG, np.float32), name=f"{scope}/masked")
        probs = g.op("Softmax", scores, axis=-1, name=f"{scope}/probs")
        out = g.op("Transpose", g.op("MatMul", probs, v1, name=f"{scope}/pv"), perm=[0, 3, 1, 2, 4],
                   name=f"{scope}/out_t")                                               # [b, s, kvh, g, hd]
        return g.op("Reshape", out, g.ints("rows_q", -1, cfg.n_head * hd), name=f"{scope}/out_rows")

    def ffn(self, x: str, layer: int) -> str:
        g, p, scope = self.g, f"blk.{layer}.", f"/layers.{layer}/ffn"
        gate, up = self.linears(x, (p + "ffn_gate.weight", p + "ffn_up.weight"), f"{scope}/gate_up_proj")
        if self.cfg.family.gelu:
            act = g.op("Gelu", gate, approximate="tanh", name=f"{scope}/gelu")
        else:
            act = g.op("Mul", gate, g.op("Sigmoid", gate, name=f"{scope}/sigmoid"), name=f"{scope}/silu")
        out = self.linear(g.op("Mul", act, up, name=f"{scope}/act_up"), p + "ffn_down.weight",
                          f"{scope}/down_proj")
        if p + "post_ffw_norm.weight" in self.m.tensors:
            out = self.rmsnorm(out, p + "post_ffw_norm.weight", f"{scope}/post_norm")
        return out

    # ---- the whole pass

    def build(self) -> Any:
        cfg, g = self.cfg, self.g
        onnx = g.onnx
        self.shape = g.op("Shape", "input_ids", name="/shape")                           # [batch, seq]
        ids = g.op("Reshape", "input_ids", g.ints("flat", -1), name="/ids")
        x = self.embed(ids)                                                              # [T, dim]
        if cfg.embd_scale > 0:
            x = g.op("Mul", x, g.const("embd_scale", cfg.embd_scale, np.float32), name="/embed/scale")
        factors = self._floats("rope_freqs.weight") if "rope_freqs.weight" in self.m.tensors else None
        cs = self.rope_cache(cfg.rope_base, cfg.rope_scale, factors, "global")
        if self.fused:
            self.gqa = self.gqa_inputs()
            cs_swa, mask, mask_swa = None, None, None
        else:
            self.shape_heads = {n: g.op("Concat", self.shape, g.ints(f"heads_{n}", n, cfg.head_dim), axis=0,
                                        name=f"/shape_heads_{n}") for n in {cfg.n_head, cfg.n_kv_head}}
            groups = g.ints("groups", cfg.n_kv_head, cfg.n_head // cfg.n_kv_head, cfg.head_dim)
            self.shape_groups = g.op("Concat", self.shape, groups, axis=0, name="/shape_groups")
            cs = self.rope_tables(cs, "global")
            cs_swa = (self.rope_tables(self.rope_cache(cfg.rope_base_swa or cfg.rope_base, 1.0, None, "local"),
                                       "local") if cfg.swa_window else None)
            mask, mask_swa = self.masks()
        # Each residual add is fused with the norm after it: h is the normed stream, x the stream.
        h = self.rmsnorm(x, "blk.0.attn_norm.weight", "/layers.0/attn_norm")
        for layer in range(cfg.n_layer):
            slides = cfg.swa_window > 0 and not (cfg.swa_pattern and (layer + 1) % cfg.swa_pattern == 0)
            a = self.attention(h, layer, cs_swa if slides else cs, mask_swa if slides else mask)
            h, x = self.residual_rmsnorm(a, x, f"blk.{layer}.ffn_norm.weight", f"/layers.{layer}/ffn_norm")
            last = layer + 1 == cfg.n_layer
            h, x = self.residual_rmsnorm(
                self.ffn(h, layer), x, "output_norm.weight" if last else f"blk.{layer + 1}.attn_norm.weight",
                "/final_norm" if last else f"/layers.{layer + 1}/attn_norm", keep_sum=not last)
        out = "output.weight" if "output.weight" in self.m.tensors else "token_embd.weight"
        logits = self.linear(h, out, "/lm_head")
        g.op("Reshape", logits, g.op("Concat", self.shape, g.ints("vocab", cfg.vocab), axis=0,
                                     name="/logits_shape"), name="/logits", out="logits")

        F, I = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
        vi = onnx.helper.make_tensor_value_info
        kv_in = ["batch_size", cfg.n_kv_head, "past_sequence_length", cfg.head_dim]
        kv_out = ["batch_size", cfg.n_kv_head, "total_sequence_length", cfg.head_dim]
        inputs = [vi("input_ids", I, ["batch_size", "sequence_length"]),
                  vi("attention_mask", I, ["batch_size", "total_sequence_length"]),
                  vi("position_ids", I, ["batch_size", "sequence_length"])]
        outputs = [vi("logits", F, ["batch_size", "sequence_length", cfg.vocab])]
        for layer in range(cfg.n_layer):
            for part in ("key", "value"):
                inputs.append(vi(f"past_key_values.{layer}.{part}", F, kv_in))
                outputs.append(vi(f"present.{layer}.{part}", F, kv_out))
        graph = onnx.helper.make_graph(g.nodes, "decoder", inputs, outputs, g.initializers)
        model = onnx.helper.make_model(
            graph, ir_version=IR_VERSION, producer_name="edge-slm", producer_version=__version__,
            opset_imports=[onnx.helper.make_opsetid("", OPSET), onnx.helper.make_opsetid(MS_DOMAIN, 1)])
        onnx.helper.set_model_props(model, {"source": self.m.path.name,
                                            "architecture": cfg.arch,
                                            "attention": "GroupQueryAttention" if self.fused else "standard",
                                            "weight_types": json.dumps(self.weight_types)})
        return model


# ---- the files around the graph

def _hf_tokenizer(tok: Tokenizer):
    """The `tokenizers` object edge_slm.tokenizer runs for a byte-level BPE
    vocabulary, copied, with the ByteLevel decoder (and the BOS post-processor,
    if the model adds BOS) that a tokenizer.json reader needs to decode and
    encode as we do."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, processors

    out = HfTokenizer.from_str(tok._backend._hf.to_str())  # the runtime's own is left as it is
    out.decoder = decoders.ByteLevel()
    if tok.add_bos and tok.bos_id is not None:
        bos = tok.vocab.tokens[tok.bos_id]
        out.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)])
    return out


def _write_tokenizer(tok: Tokenizer, context_length: int, folder: Path) -> str | None:
    """The tokenizer's files: tokenizer.json for a byte-level BPE vocabulary
    (what onnxruntime-genai and Hugging Face read); for a SentencePiece one,
    tokenizer.model, the model proto edge_slm.tokenizer builds, which
    Hugging Face's LlamaTokenizer reads and onnxruntime-genai does not (then
    a note saying so is returned)."""
    note = None
    if tok.vocab.model == "gpt2":
        _hf_tokenizer(tok).save(str(folder / "tokenizer.json"))
        cls = "PreTrainedTokenizerFast"
    else:
        (folder / "tokenizer.model").write_bytes(type(tok._backend)._model_proto(tok.vocab))
        cls = "LlamaTokenizer"
        note = ("a SentencePiece vocabulary is written as tokenizer.model; onnxruntime-genai's tokenizer "
                "needs a tokenizer.json, which this export does not make (its model runs, given ids)")
    tokens = tok.vocab.tokens
    named = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "unk_token": tok.vocab.unk_id}
    specials = {k: tokens[i] for k, i in named.items() if i is not None}
    config = {
        "tokenizer_class": cls,
        "add_bos_token": tok.add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        **specials,
        **({"chat_template": tok.vocab.chat_template} if tok.vocab.chat_template else {}),
    }
    for name, doc in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        (folder / name).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return note


def genai_config(model: LoadedModel, tok: Tokenizer) -> dict[str, Any]:
    """genai_config.json as onnxruntime-genai reads it."""
    cfg = model.config
    eog = sorted(tok.vocab.eog_ids, key=lambda i: (i != tok.eos_id, i))
    pad = model.file.get("tokenizer.ggml.padding_token_id")
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": MODEL_FILE,
        "head_size": cfg.head_dim,
        "hidden_size": cfg.dim,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                   "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": cfg.n_head,
        "num_hidden_layers": cfg.n_layer,
        "num_key_value_heads": cfg.n_kv_head,
    }
    return {
        "model": {
            "bos_token_id": tok.bos_id if tok.bos_id is not None else (eog[0] if eog else 0),
            "context_length": cfg.context_length,
            "decoder": decoder,
            "eos_token_id": eog[0] if len(eog) == 1 else eog,
            "pad_token_id": pad if isinstance(pad, int) else (eog[0] if eog else 0),
            "type": GENAI_TYPES[cfg.arch],
            "vocab_size": cfg.vocab,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": cfg.context_length, "min_length": 0, "no_repeat_ngram_size": 0,
            "num_beams": 1, "num_return_sequences": 1,
            # The standard-op graph's present is a new tensor (Concat); GroupQueryAttention also
            # runs in place on one buffer, but one setting serves both graphs.
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def check_output_folder(out: Path) -> None:
    """OUT may be new or an empty folder; anything else is refused before work starts."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise EdgeSlmError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise EdgeSlmError(f"{out}: folder is not empty")
    if not out.parent.is_dir():
        raise EdgeSlmError(f"{out.parent}: no such folder")


def check_exportable(model: LoadedModel) -> None:
    if model.config.arch not in ARCHITECTURES:
        raise UnsupportedModel(f"{model.path}: ONNX export of architecture {model.config.arch!r} is not "
                               f"supported (supported: {', '.join(ARCHITECTURES)})")


def export_onnx(model: LoadedModel, out: Path, progress: Progress | None = None,
                accuracy_level: int = ACCURACY_LEVEL) -> OnnxExport:
    """Write the ONNX folder for `model` at `out` (new, or an empty folder).

    It is made beside `out` and renamed into place, so a failed export leaves nothing."""
    onnx = _onnx()
    check_output_folder(out)
    check_exportable(model)
    tok = model.tokenizer()  # refuses a vocabulary we cannot run before the graph is built
    decoder = _Decoder(model, progress, accuracy_level)
    proto = decoder.build()
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise EdgeSlmError(f"{out.parent}: cannot write here ({e.strerror})") from None
    try:
        big = proto.ByteSize() >= PROTO_LIMIT
        onnx.save_model(proto, str(tmp / MODEL_FILE), save_as_external_data=big,
                        all_tensors_to_one_file=True, location=MODEL_FILE + ".data")
        del proto
        note = _write_tokenizer(tok, model.config.context_length, tmp)
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(model, tok), indent=4) + "\n",
                                               encoding="utf-8")
        write_sidecar(tmp, sidecar(model.file, "onnx", model.sha256(), accuracy_level=accuracy_level))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 is for the temporary name only
        if out.is_dir():
            out.rmdir()
        tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, OUT made meanwhile by someone else
            raise EdgeSlmError(f"{out}: cannot write the export ({e.strerror or e})") from None
        raise
    files = tuple(sorted(p.name for p in out.iterdir()))
    size = sum((out / f).stat().st_size for f in files)
    log.info("wrote %s: %s (%d bytes)", out, ", ".join(files), size)
    if decoder.inexact:
        log.warning("%d Q4_1 blocks hold an m + 8d that float32 rounds: those weights are within "
                    "half a unit in the last place of the file's", decoder.inexact)
    return OnnxExport(out, files, size, dict(decoder.weight_types), note, decoder.inexact)
