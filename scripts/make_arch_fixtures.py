"""Record what llama.cpp (through llama-cpp-python) does with tiny random
models of each architecture (tests/arch_models.py) and with its own
quantizations of them, so that tests/test_arch_parity.py checks the runtime
against it offline.

Run with an environment that has llama-cpp-python, e.g.

    .venv/bin/python scripts/make_arch_fixtures.py   # after `make bench` installed it

It writes, under tests/fixtures/arch/:
  <model>-<type>.gguf  llama.cpp's quantizations of the one-block variant of
                 each model (arch_models.quantization_source): committed,
                 as the tests cannot run llama.cpp's quantizer
  arch.npz       llama.cpp's logits along its own greedy continuation of a
                 few prompts, for every model (the F32 ones and the
                 quantized ones): top-8 per position, a fixed subset of the
                 vocabulary, the tokens it chose
  arch.json      what was run: llama-cpp-python version, the specs and the
                 sha256 of the F32 files the tests write afresh, each
                 model's file, tensor types and prompts, the npz layout
  tokenize.json  llama.cpp's token ids, per vocabulary, for the strings of
                 tests/fixtures/tokenize.json and some with each
                 vocabulary's special tokens

The tests never import llama_cpp; they read these files."""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "scripts")]

from arch_models import (ARCH_MODELS, VOCAB_SIZE, VOCABS, ArchSpec,  # noqa: E402
                         quantization_source, write_arch_model)
from make_parity_fixtures import top_k  # noqa: E402

from edge_slm.pull import sha256_file  # noqa: E402

log = logging.getLogger("make_arch_fixtures")

N_CTX = 128
N_THREADS = 2
N_STEPS = 24           # greedy tokens per prompt: with the prompt, several sliding windows long
TOP_K = 8
SUBSET_SIZE = 64       # vocabulary ids whose logits are kept at every position
SUBSET_SEED = 4321
PROMPTS = [
    "Check the pump before you start the motor.",
    "def check_pressure(value):\n    if value > 3.0:",
    "泵的压力太高了 12345 🙂 it's done",
]


@dataclass(frozen=True)
class Quantization:
    """One llama.cpp quantizer run: `pure` makes every matrix the ftype's
    base type (one kernel per file); otherwise llama.cpp mixes types as it
    does for real models, and embd_type overrides the embedding's and the
    output's."""

    name: str
    ftype: str             # LLAMA_FTYPE_MOSTLY_<ftype>
    pure: bool = True
    embd_type: str | None = None  # GGML_TYPE_<embd_type>


PURE = [Quantization(t, t) for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL")] + [
    Quantization("Q4_K", "Q4_K_M"), Quantization("Q5_K", "Q5_K_M"), Quantization("Q6_K", "Q6_K")]
# llama.cpp's Q4_K_M mix (Q4_K, and Q6_K for attn_v and ffn_down) with Q8_0
# embeddings: a K-quant and Q8_0 in one small file per architecture.
MIXED = Quantization("Q4_K_M", "Q4_K_M", pure=False, embd_type="Q8_0")
QUANTIZATIONS: dict[str, list[Quantization]] = {
    "llama": PURE, "llama3": [MIXED], "qwen2": [MIXED], "qwen3": [MIXED], "gemma3": [MIXED]}


# ---------------------------------------------------------------- llama.cpp runs

def load(path: Path, **kw):
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=N_CTX, n_threads=N_THREADS, verbose=False, seed=0, **kw)


def tokenize(llm, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
    return [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)]


def greedy_trace(llm, prompt_ids: list[int]) -> tuple[list[int], np.ndarray]:
    """The prompt in one batch, then N_STEPS one-token decodes of llama.cpp's
    own argmax: its greedy tokens, and the logits rows it chose them from."""
    llm.reset()
    llm.eval(prompt_ids)
    generated: list[int] = []
    for _ in range(N_STEPS):
        generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([generated[-1]])
    return generated, np.array(llm.scores[:llm.n_tokens], dtype=np.float32)


def record_model(path: Path, subset: np.ndarray) -> tuple[dict[str, np.ndarray], list[dict]]:
    llm = load(path, logits_all=True)
    prompt_ids, generated, logits, prompts = [], [], [], []
    for text in PROMPTS:
        ids = tokenize(llm, text, add_bos=True)  # BOS where the model asks for it
        gen, rows = greedy_trace(llm, ids)
        prompt_ids.append(np.array(ids, dtype=np.int32))
        generated.append(gen)
        logits.append(rows)
        prompts.append({"text": text, "n_prompt": len(ids)})
    rows = np.concatenate(logits)
    ti, tl = top_k(rows, TOP_K)
    arrays = {
        "prompt_ids": np.concatenate(prompt_ids),
        "prompt_offsets": np.cumsum([0] + [len(x) for x in prompt_ids]).astype(np.int64),
        "generated_ids": np.array(generated, dtype=np.int32),
        "position_offsets": np.cumsum([0] + [len(x) for x in logits]).astype(np.int64),
        "top_ids": ti,
        "top_logits": tl.astype(np.float16),
        "margin": (tl[:, 0] - tl[:, 1]).astype(np.float32),
        "subset_logits": rows[:, subset].astype(np.float16),
    }
    return arrays, prompts


NPZ_LAYOUT = {
    "subset_ids": f"int32 [{SUBSET_SIZE}], sorted vocabulary ids (seed {SUBSET_SEED}), shared by all models",
    "<model>/prompt_ids": "int32, the prompts' ids concatenated (BOS included where the model adds it); "
                          "prompt p is prompt_ids[prompt_offsets[p]:prompt_offsets[p+1]]",
    "<model>/generated_ids": f"int32 [prompts, {N_STEPS}], llama.cpp's greedy tokens",
    "<model>/position_offsets": "int64, rows of prompt p are [position_offsets[p], position_offsets[p+1]); "
                                "row j holds the logits after token j of prompt + generated, predicting "
                                "token j+1; the prompt's rows came from one batch, the rest from "
                                "one-token decodes",
    "<model>/top_ids": f"int32 [rows, {TOP_K}], highest logit first",
    "<model>/top_logits": f"float16 [rows, {TOP_K}]",
    "<model>/margin": "float32 [rows], top-1 minus top-2 logit",
    "<model>/subset_logits": f"float16 [rows, {SUBSET_SIZE}], logits at subset_ids",
}


def quantize(src: Path, dst: Path, q: Quantization) -> None:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{q.ftype}")
    p.pure = q.pure
    p.nthread = N_THREADS
    if q.embd_type is not None:
        p.token_embedding_type = p.output_tensor_type = getattr(llama_cpp, f"GGML_TYPE_{q.embd_type}")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {q.name}")


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type the file holds."""
    reader = gguf.GGUFReader(path)
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))


# ---------------------------------------------------------------- tokenization

def special_strings(vocab: str) -> list[str]:
    """Text around each of the vocabulary's special tokens, and all of them in a row."""
    specials = [t for t, _ in VOCABS[vocab].specials]
    return [f"hello{s} world" for s in specials] + [" ".join(specials), "".join(specials) + "\nx"]


def tokenize_cases(path: Path, strings: list[str]) -> dict:
    llm = load(path, vocab_only=True)
    ids, no_special = [], {}
    for i, s in enumerate(strings):
        ids.append(tokenize(llm, s))
        plain = tokenize(llm, s, special=False)
        if plain != ids[-1]:
            no_special[str(i)] = plain
    # What llama.cpp adds of its own (BOS, per the vocabulary) with add_special.
    with_specials = {str(i): tokenize(llm, strings[i], add_bos=True) for i in range(0, len(strings), 37)}
    return {"ids": ids, "ids_no_special": no_special, "ids_add_special": with_specials}


# ---------------------------------------------------------------- main

def spec_doc(spec: ArchSpec, path: Path) -> dict:
    return {**asdict(spec), "sha256": sha256_file(path)}


def summarize(name: str, arrays: dict[str, np.ndarray]) -> dict:
    m = arrays["margin"]
    stats = {"positions": int(m.size), "margin_ge_1": int((m >= 1).sum()),
             "margin_median": round(float(np.median(m)), 3)}
    log.info("%-16s %3d positions, %3d with margin >= 1, median margin %.2f", name, stats["positions"],
             stats["margin_ge_1"], stats["margin_median"])
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "arch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer tells of every file
    import llama_cpp

    args.out.mkdir(parents=True, exist_ok=True)
    subset = np.sort(np.random.default_rng(SUBSET_SEED).choice(VOCAB_SIZE, SUBSET_SIZE, replace=False))
    subset = subset.astype(np.int32)
    with tempfile.TemporaryDirectory(prefix="arch-fixtures-") as tmp:
        record_all(Path(tmp), args.out, subset, llama_cpp.__version__)


def record_all(tmp: Path, out: Path, subset: np.ndarray, version: str) -> None:
    arrays: dict[str, np.ndarray] = {"subset_ids": subset}
    models, specs = [], {}

    def record(name: str, spec_name: str, weights: str, path: Path, file: str | None,
               quantization: Quantization | None) -> None:
        model_arrays, prompts = record_model(path, subset)
        arrays.update({f"{name}/{k}": v for k, v in model_arrays.items()})
        models.append({"name": name, "spec": spec_name, "weights": weights, "file": file,
                       "sha256": sha256_file(path), "quantization": quantization and asdict(quantization),
                       "tensor_types": tensor_types(path), "prompts": prompts,
                       "summary": summarize(name, model_arrays)})

    for spec_name, spec in ARCH_MODELS.items():
        f32 = write_arch_model(tmp / f"{spec_name}-F32.gguf", spec)
        source = write_arch_model(tmp / f"{spec_name}-source.gguf", quantization_source(spec))
        specs[spec_name] = {"f32": spec_doc(spec, f32),
                            "quantization_source": spec_doc(quantization_source(spec), source)}
        record(f"{spec_name}-F32", spec_name, "F32", f32, None, None)
        for q in QUANTIZATIONS[spec_name]:
            name = f"{spec_name}-{q.name}"
            dst = out / f"{name}.gguf"
            quantize(source, dst, q)
            record(name, spec_name, q.name, dst, dst.name, q)

    strings = [c["text"] for c in json.loads(
        (REPO / "tests" / "fixtures" / "tokenize.json").read_text(encoding="utf-8"))["cases"]]
    tok_doc = {"llama_cpp_python": version,
               "call": "llm.tokenize(text.encode(), add_bos=False, special=True); ids_no_special "
                       "(only where different) with special=False; ids_add_special with add_bos=True",
               "vocabularies": {}}
    for vocab in VOCABS:
        spec_name = next(n for n, s in ARCH_MODELS.items() if s.vocab == vocab)
        texts = strings + special_strings(vocab)
        tok_doc["vocabularies"][vocab] = {"model": spec_name, "texts": texts,
                                          **tokenize_cases(tmp / f"{spec_name}-F32.gguf", texts)}
    (out / "tokenize.json").write_text(json.dumps(tok_doc, ensure_ascii=False) + "\n", encoding="utf-8")

    np.savez_compressed(out / "arch.npz", **arrays)
    doc = {"llama_cpp_python": version, "n_threads": N_THREADS, "n_ctx": N_CTX,
           "n_steps": N_STEPS, "top_k": TOP_K, "layout": NPZ_LAYOUT, "specs": specs, "models": models}
    (out / "arch.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in out.iterdir())
    log.info("%d models, %d vocabularies; %s holds %.2f MB", len(models), len(VOCABS), out, total / 1e6)


if __name__ == "__main__":
    main()
