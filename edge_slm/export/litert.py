"""`edge-slm export MODEL.gguf --to litert OUT.tflite`: a GGUF model as a
LiteRT (TFLite) decoder with KV-cache signatures, written by Google's
PyTorch-to-LiteRT generative converter (litert-torch), so that LiteRT's
interpreter runs it with XNNPACK.

  OUT.tflite            the decoder, int8 or int4 weights
  OUT.edge-slm.json     the sidecar (edge_slm.backends.sidecar): the GGUF's
                        metadata, tokenizer included, and this export's settings

The model is litert-torch's own decoder (generative.utilities.model_builder's
DecoderOnlyModel, the class its SmolLM example builds) configured from the
GGUF's shape, its weights our GGUF tensors dequantized to float32 (by gguf-py,
as the ONNX export does for types MatMulNBits cannot hold). Building their
class rather than a module of our own means the graph is the one their
converter's passes, quantization recipes and composite ops (RMSNorm, SDPA,
the KV cache's dynamic_update_slice) are written for; what it costs is that
only what their layers express is exported: llama's shape (RMSNorm, RoPE over
the whole head, grouped-query attention, SiLU-gated FFN, tied or untied
output). Other families, QKV biases, RoPE frequency factors and RoPE scaling
are refused in one line.

Two differences from the GGUF are handled here:
  RoPE pairs  llama.cpp's converter permutes each head's Q and K rows so that
              RoPE rotates adjacent pairs (2i, 2i + 1); litert-torch rotates
              (i, i + head_dim / 2), as Hugging Face's llama does. The rows are
              permuted back; attention scores are dot products within a head,
              so permuting Q and K alike changes nothing else (the cache holds
              the keys in that order, which no one outside the graph reads).
  weights     the converter's recipes quantize the float weights again: int8
              is `dynamic_int8` (int8 per output channel, activations
              quantized per call), int4 `dynamic_int4_block32` (int4 in blocks
              of 32). Q4_1 / Q8_0 blocks do not carry over bit for bit.

The signatures, as litert_torch.generative.utilities.converter writes them
(`prefill_<P>` and `decode`), per call:
  tokens [1, P] / [1, 1] int32, input_pos [P] / [1] int32,
  kv_cache_k_N, kv_cache_v_N [1, kv_len, kv_heads, head_dim] float32
  -> kv_cache_k_N, kv_cache_v_N (the cache with rows input_pos written),
     and from decode only, logits [1, 1, vocab] float32.
The mask is built inside the graph (causal, over the whole cache)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.litert import DECODE
from ..backends.sidecar import sidecar, sidecar_path, write_sidecar
from ..errors import EdgeSlmError, UnsupportedModel
from ..model import LoadedModel, ModelConfig, expected_tensors
from .onnx import Progress
from .onnx_weights import float_vector, float_weight

log = logging.getLogger(__name__)

# --weights -> litert-torch's quantization recipe (generative.utilities.converter.QuantizationName)
RECIPES = {"int8": "dynamic_int8", "int4": "dynamic_int4_block32"}
DEFAULT_KV_LEN = 1024
# Prompt tokens one prefill call takes (padded to it): the engine's prompt
# chunk (EngineConfig.prefill_chunk) by default.
DEFAULT_PREFILL_LEN = 32
ARCHITECTURES = ("llama",)
SUFFIX = ".tflite"
KV_LAYOUT = "BTNH"  # the converter's default cache layout: [batch, kv_len (time), kv heads, head_dim]


@dataclass(frozen=True)
class LiteRtExport:
    """What an export wrote."""

    path: Path
    sidecar: Path
    bytes: int            # of the .tflite
    weights: str          # "int8" or "int4"
    recipe: str           # litert-torch's quantization recipe
    kv_len: int
    prefill_len: int
    signatures: tuple[str, ...]


@contextlib.contextmanager
def _tflite_schema_lent_as_tensorflows() -> Iterator[None]:
    """litert-torch 0.10's generative layers (layers/lora.py, for LoRA weights,
    which this export does not use) import TFLite's flatbuffer schema from
    tensorflow, a package it does not declare and that is ~600 MB more to
    install. ai-edge-litert, which it does declare, ships the same generated
    module: it is lent under tensorflow's name while litert-torch is imported,
    and the name withdrawn after, so nothing later takes tensorflow for present."""
    if importlib.util.find_spec("tensorflow") is not None:
        yield
        return
    from ai_edge_litert import schema_py_generated

    lent = {name: types.ModuleType(name) for name in ("tensorflow", "tensorflow.lite", "tensorflow.lite.python")}
    lent["tensorflow.lite.python"].schema_py_generated = schema_py_generated
    lent["tensorflow.lite.python.schema_py_generated"] = schema_py_generated
    sys.modules.update(lent)
    try:
        yield
    finally:
        for name, module in lent.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


def _litert_torch() -> tuple[Any, Any]:
    """litert-torch's generative pieces: (model_builder, converter) modules."""
    try:
        # first what looks for tensorflow by name (torch._dynamo's trace rules), then the borrowers
        import litert_torch  # noqa: F401
        import torch._dynamo  # noqa: F401

        with _tflite_schema_lent_as_tensorflows():
            from litert_torch.generative.utilities import converter, model_builder
    except ImportError as e:
        raise EdgeSlmError(f"exporting to LiteRT needs litert-torch and torch ({e}): "
                           "pip install 'edge-slm[export-litert]'") from None
    return model_builder, converter


def check_output_file(out: Path) -> None:
    """OUT must be a new .tflite file in an existing folder, its sidecar new too:
    refused before any work starts."""
    if out.suffix.lower() != SUFFIX:
        raise EdgeSlmError(f"{out}: a LiteRT model is a {SUFFIX} file; name OUT NAME{SUFFIX}")
    if out.exists() or out.is_symlink():
        raise EdgeSlmError(f"{out}: exists; choose a new file")
    if not out.parent.is_dir():
        raise EdgeSlmError(f"{out.parent}: no such folder")
    side = sidecar_path(out)
    if side.exists() or side.is_symlink():
        raise EdgeSlmError(f"{side}: exists (a sidecar of an earlier export?); remove it or choose another OUT")


def check_exportable(model: LoadedModel, kv_len: int, prefill_len: int) -> None:
    """What litert-torch's decoder cannot express, and sizes it cannot hold, refused in one line."""
    cfg, path = model.config, model.path
    if cfg.arch not in ARCHITECTURES:
        raise UnsupportedModel(f"{path}: LiteRT export of architecture {cfg.arch!r} is not supported "
                               f"(supported: {', '.join(ARCHITECTURES)})")
    extras = sorted(n for n in model.tensors if n.endswith(".bias") or n == "rope_freqs.weight")
    if extras:
        raise UnsupportedModel(f"{path}: tensor {extras[0]} has no place in litert-torch's llama decoder "
                               f"(QKV biases and RoPE factors are not exported)")
    if cfg.rope_scale != 1.0:
        raise UnsupportedModel(f"{path}: linear RoPE scaling is not exported to LiteRT")
    if not 2 <= kv_len <= cfg.context_length:
        raise EdgeSlmError(f"--kv-len {kv_len}: choose from 2 to the model's context, {cfg.context_length}")
    if not 2 <= prefill_len <= kv_len:
        raise EdgeSlmError(f"--prefill-len {prefill_len}: choose from 2 to --kv-len ({kv_len})")


def rope_halves(w: np.ndarray, n_head: int) -> np.ndarray:
    """Q or K rows [n_head * head_dim, cols] from llama.cpp's order (RoPE on
    adjacent pairs: row 2i + h of a head) to Hugging Face's (RoPE on halves:
    row h * head_dim / 2 + i)."""
    rows, cols = w.shape
    hd = rows // n_head
    return w.reshape(n_head, hd // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_state_dict(model: LoadedModel, progress: Progress | None) -> dict[str, Any]:
    """The GGUF's tensors as float32 torch tensors under Hugging Face's llama
    names (model_builder.TENSOR_NAMES), Q and K rows in Hugging Face's order."""
    import torch

    cfg: ModelConfig = model.config
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    parts = {"attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
             "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
             "attn_output.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
             "ffn_down.weight": "mlp.down_proj.weight"}
    state = {}
    for name in expected_tensors(cfg, model.tensors):
        t = model.tensors[name]
        if name.startswith("blk."):
            _, layer, part = name.split(".", 2)
            hf = f"model.layers.{layer}.{parts[part]}"
        else:
            hf = names[name]
        values = float_vector(t) if t.rows == 1 else np.asarray(float_weight(t), np.float32)
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            values = rope_halves(values, cfg.n_head if "attn_q" in name else cfg.n_kv_head)
        state[hf] = torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: F32 tensors are read-only views
        if progress is not None:
            progress(t.nbytes)
    return state


def decoder_config(model: LoadedModel, kv_len: int) -> Any:
    """litert-torch's ModelConfig of this GGUF's shape, as its SmolLM example writes one."""
    import litert_torch.generative.layers.model_config as lcfg

    cfg = model.config
    norm = lcfg.NormalizationConfig(type=lcfg.NormalizationType.RMS_NORM, epsilon=cfg.norm_eps)
    block = lcfg.TransformerBlockConfig(
        attn_config=lcfg.AttentionConfig(num_heads=cfg.n_head, head_dim=cfg.head_dim,
                                         num_query_groups=cfg.n_kv_head, rotary_base=cfg.rope_base,
                                         rotary_percentage=1.0),
        ff_config=lcfg.FeedForwardConfig(type=lcfg.FeedForwardType.GATED,
                                         activation=lcfg.ActivationConfig(lcfg.ActivationType.SILU),
                                         intermediate_size=cfg.hidden_dim),
        pre_attention_norm_config=norm,
        post_attention_norm_config=norm,
    )
    return lcfg.ModelConfig(vocab_size=cfg.vocab, num_layers=cfg.n_layer, max_seq_len=kv_len,
                            embedding_dim=cfg.dim, block_configs=block, final_norm_config=norm,
                            lm_head_share_weight_with_embedding="output.weight" not in model.tensors)


def _signatures(path: Path) -> dict[str, Any]:
    """The signature defs of a written .tflite, as LiteRT's interpreter reads them."""
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path)).get_signature_list()


def export_litert(model: LoadedModel, out: Path, progress: Progress | None = None, weights: str = "int8",
                  kv_len: int = DEFAULT_KV_LEN, prefill_len: int = DEFAULT_PREFILL_LEN) -> LiteRtExport:
    """Write `model` as OUT (a new .tflite) and its sidecar beside it.

    Both are made in a folder beside OUT and renamed into place, the sidecar
    first: a failed export leaves neither, and an OUT present has its sidecar."""
    check_output_file(out)
    if weights not in RECIPES:
        raise EdgeSlmError(f"--weights {weights}: choose from {', '.join(RECIPES)}")
    check_exportable(model, kv_len, prefill_len)
    model.tokenizer()  # refuses a vocabulary we cannot run before minutes of conversion
    model_builder, converter = _litert_torch()
    config = decoder_config(model, kv_len)
    state = hf_state_dict(model, progress)
    tied = config.lm_head_share_weight_with_embedding
    decoder = model_builder.build_decoder_only_model(
        str(model.path), config,
        model_builder.TENSOR_NAMES if tied else model_builder.TENSOR_NAMES_WITH_SEPARATE_LM_HEAD,
        custom_loader=lambda _: state, mask_cache_size=kv_len)  # it pops each tensor as it copies it in
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise EdgeSlmError(f"{out.parent}: cannot write here ({e.strerror})") from None
    placed = None  # the sidecar, once renamed into place
    try:
        log.info("converting %s with litert-torch (%s weights, KV cache of %d, prefill of %d)",
                 model.path.name, weights, kv_len, prefill_len)
        written = Path(converter.convert_to_tflite(
            decoder, output_path=str(tmp), output_name_prefix="model", prefill_seq_len=prefill_len,
            kv_cache_max_len=kv_len, quantize=RECIPES[weights], config=config,
            export_config=converter.ExportConfig()))
        del decoder
        staged = tmp / out.name
        written.rename(staged)
        signatures = _signatures(staged)
        prefill = f"prefill_{prefill_len}"  # the converter's name for its one prefill length
        if set(signatures) != {prefill, DECODE}:  # the converter's naming changed under us
            raise EdgeSlmError(f"litert-torch wrote signatures {sorted(signatures)}, "
                               f"expected {prefill} and {DECODE}")
        doc = sidecar(model.file, "litert", model.sha256(), weights=weights, recipe=RECIPES[weights],
                      kv_len=kv_len, prefill_len=prefill_len, kv_layout=KV_LAYOUT,
                      rope_pairs="halves", signatures=signatures, tflite_bytes=staged.stat().st_size,
                      converter=f"litert-torch {importlib.metadata.version('litert-torch')}")
        staged_sidecar = write_sidecar(staged, doc)
        for f in (staged, staged_sidecar):
            os.chmod(f, 0o644)  # not mkdtemp's private mode
        placed = staged_sidecar.rename(sidecar_path(out))
        staged.rename(out)
    except BaseException as e:
        if placed is not None:
            placed.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, OUT made meanwhile by someone else
            raise EdgeSlmError(f"{out}: cannot write the export ({e.strerror or e})") from None
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    size = out.stat().st_size
    log.info("wrote %s (%d bytes) and %s", out, size, sidecar_path(out).name)
    return LiteRtExport(out, sidecar_path(out), size, weights, RECIPES[weights], kv_len, prefill_len,
                        tuple(sorted(signatures)))
