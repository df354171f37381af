"""Parity with llama.cpp for each architecture and weight type, on tiny
random models (tests/arch_models.py) and llama.cpp's own quantizations of
them, from fixtures made by scripts/make_arch_fixtures.py (tests/fixtures/arch/).

The F32 models are written afresh from their specs and must hash as the
fixture recorded; the quantized ones are committed. Each model runs as
llama.cpp ran it: its prompts in one batch, then its greedy tokens one by one,
on every kernel table this CPU has. Where llama.cpp's top-2 margin is
decisive the choice must be the same; everywhere the logits must correlate
with llama.cpp's and lie close to them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from arch_models import ARCH_MODELS, quantization_source, write_arch_model

from edge_slm import _core
from edge_slm.model import RuntimeOptions, load_model
from edge_slm.pull import sha256_file
from edge_slm.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "arch"
META = json.loads((FIXTURES / "arch.json").read_text(encoding="utf-8"))
MODELS = {m["name"]: m for m in META["models"]}
DECISIVE = 1.0  # top-2 logit margin at which the choice must match
# Per weight type: the least per-position correlation with llama.cpp's logits,
# and the largest error relative to their spread (root mean square over
# the subset). F32 differs only in summation order and the f16 KV cache;
# quantized weights add each side's own rounding of the activations.
TOLERANCE = {"F32": (0.9999, 0.01)}
QUANTIZED_TOLERANCE = (0.995, 0.1)
REGENERATE = ("scripts/make_arch_fixtures.py, and commit tests/fixtures/arch/, if the change was meant")


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "arch.npz"))


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory):
    """The F32 model of a spec, written once per module and checked against the fixture."""
    made: dict[str, Path] = {}

    def get(spec_name: str) -> Path:
        if spec_name not in made:
            path = write_arch_model(tmp_path_factory.mktemp("arch") / f"{spec_name}-F32.gguf",
                                    ARCH_MODELS[spec_name])
            assert sha256_file(path) == META["specs"][spec_name]["f32"]["sha256"], (
                f"{spec_name}: arch_models.py now writes another F32 model than the fixture "
                f"recorded llama.cpp on; run {REGENERATE}")
            made[spec_name] = path
        return made[spec_name]

    return get


def model_file(entry: dict, f32_model) -> Path:
    if entry["file"] is None:
        return f32_model(entry["spec"])
    path = FIXTURES / entry["file"]
    assert sha256_file(path) == entry["sha256"], f"{path} is not the file llama.cpp was run on"
    return path


@pytest.mark.parametrize("spec_name", ARCH_MODELS)
def test_quantization_sources_are_the_recorded_ones(spec_name, tmp_path):
    """The committed quantized files were made from what arch_models.py writes today."""
    path = write_arch_model(tmp_path / "source.gguf", quantization_source(ARCH_MODELS[spec_name]))
    assert sha256_file(path) == META["specs"][spec_name]["quantization_source"]["sha256"], (
        f"{spec_name}: the one-block variant is no longer the one llama.cpp quantized; run {REGENERATE}")


def our_rows(rt, prompt: list[int], generated: list[int]) -> np.ndarray:
    """Logits as llama.cpp made them: the prompt's rows from one batch, then
    one row per greedy token, each decoded alone."""
    rows = [rt.prefill(prompt, all_logits=True)]
    for k, tok in enumerate(generated):
        rows.append(rt.prefill([tok], start=len(prompt) + k, all_logits=True))
    return np.concatenate(rows)


@pytest.mark.parametrize("backend", _core.backends())
@pytest.mark.parametrize("name", MODELS)
def test_logits_match_llama_cpp(name, backend, arrays, f32_model, parity_report):
    entry = MODELS[name]
    a = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(name + "/")}
    model = load_model(model_file(entry, f32_model))
    rt = model.runtime(RuntimeOptions(n_threads=2, n_ctx=META["n_ctx"], max_batch=64, backend=backend))
    po, ro = a["prompt_offsets"], a["position_offsets"]
    # The scalar reference is the specification but several times slower:
    # it runs the first prompt, the SIMD tables all of them.
    n_prompts = 1 if backend == "ref" else len(po) - 1
    ours = np.concatenate([our_rows(rt, a["prompt_ids"][po[p]:po[p + 1]].tolist(),
                                    a["generated_ids"][p].tolist()) for p in range(n_prompts)])
    rows = slice(0, ro[n_prompts])
    assert len(ours) == rows.stop
    theirs_top, margin = a["top_ids"][rows, 0], a["margin"][rows]
    ours_top = ours.argmax(axis=1)
    same = ours_top == theirs_top
    decisive = margin >= DECISIVE
    bad = np.flatnonzero(decisive & ~same)
    sub, theirs = ours[:, arrays["subset_ids"]], a["subset_logits"][rows].astype(np.float32)
    corrs = np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(sub, theirs)])
    spread = np.sqrt(((theirs - theirs.mean(axis=1, keepdims=True)) ** 2).mean(axis=1))
    errors = np.sqrt(((sub - theirs) ** 2).mean(axis=1)) / spread
    parity_report.append(
        f"arch parity {name} [{backend}]: argmax {same.sum()}/{len(same)}, decisive "
        f"{(same & decisive).sum()}/{decisive.sum()}, correlation min {corrs.min():.5f}, "
        f"relative error max {errors.max():.4f}")
    min_corr, max_error = TOLERANCE.get(entry["weights"], QUANTIZED_TOLERANCE)
    assert not len(bad), (f"{name} ({entry['tensor_types']}): {len(bad)} positions where llama.cpp was "
                          f"decisive differ, e.g. rows {bad.tolist()[:8]}: ours {ours_top[bad].tolist()[:8]}, "
                          f"llama.cpp {theirs_top[bad].tolist()[:8]}")
    assert corrs.min() >= min_corr, f"{name}: logit correlation {corrs.min():.5f} at row {corrs.argmin()}"
    assert errors.max() <= max_error, (f"{name}: logit error {errors.max():.4f} of their spread "
                                       f"at row {errors.argmax()}")


TOKENIZE = json.loads((FIXTURES / "tokenize.json").read_text(encoding="utf-8"))["vocabularies"]


@pytest.mark.parametrize("vocab", TOKENIZE)
def test_tokenization_matches_llama_cpp(vocab, f32_model):
    case = TOKENIZE[vocab]
    tok = Tokenizer.from_gguf(f32_model(case["model"]))
    texts = case["texts"]
    checks = [(texts[i], {"add_bos": False}, ids) for i, ids in enumerate(case["ids"])]
    checks += [(texts[int(i)], {"add_bos": False, "special": False}, ids)
               for i, ids in case["ids_no_special"].items()]
    checks += [(texts[int(i)], {}, ids) for i, ids in case["ids_add_special"].items()]  # the model's BOS
    wrong = [(text, kw, ids, ours) for text, kw, ids in checks if (ours := tok.encode(text, **kw)) != ids]
    assert not wrong, f"{vocab}: {len(wrong)} of {len(checks)} tokenized otherwise than by llama.cpp: " + "; ".join(
        f"{text!r} {kw}: llama.cpp {ids}, ours {ours}" for text, kw, ids, ours in wrong[:4])
