"""Parity with llama.cpp on the reference model requantized by llama.cpp's
own quantizer (edge_slm.requantize): Q8_0 and Q4_K_M, each a real file of
the real shape (llama.cpp's Q4_K_M of SmolLM2 mixes Q5_0, Q4_K, Q6_K and
Q8_0), compared live with llama-cpp-python on the same file.

The copies depend on the quantizer's version, so unlike tests/test_parity.py
this needs llama-cpp-python itself (`make bench` installs it); they are made
once and kept beside the reference model. The checks are test_parity.py's
(llama.cpp is not self-consistent at near-ties, so the same choice is
required where its top-2 margin is at least 1.0, and elsewhere agreement
and correlation), the correlation over the whole vocabulary and its bound
set by type."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_slm.model import RuntimeOptions, load_model
from edge_slm.requantize import variant

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parent / "fixtures"
# The least per-position logit correlation required, by type. Fewer bits
# round more: on these texts llama.cpp's own logits correlate with an exact
# float32 forward pass of the same file (tests/reference.py) at least 0.9977
# on Q8_0 and 0.989 on Q4_K_M, and ours with exact about the same.
MIN_CORRELATION = {"q8_0": 0.995, "q4_k_m": 0.99}
TYPES = tuple(MIN_CORRELATION)
# Texts from the parity fixtures (the prompt and llama.cpp's continuation on
# the reference model), teacher-forced through both runtimes: two chats, code, prose.
PROMPTS = ("chat_battery", "chat_two_turns", "raw_code_python", "raw_repair")
DECISIVE = 1.0  # top-2 logit margin at which the choice must match
N_CTX = 512


@pytest.fixture(scope="module")
def sequences(real_model) -> dict[str, list[int]]:
    meta = json.loads((FIXTURES / "parity.json").read_text())
    tok = load_model(real_model).tokenizer()
    return {p["name"]: tok.encode(p["text"] + p["continuation"])
            for p in meta["prompts"] if p["name"] in PROMPTS}


@pytest.fixture(scope="module", params=TYPES)
def requantized(request, real_model):
    return variant(real_model, request.param)


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for one sequence from position 0,
    in one batch (a fresh context, so nothing is reused)."""
    llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, n_batch=N_CTX, n_threads=2, logits_all=True,
                          verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def test_teacher_forced_logits(requantized, sequences, parity_report):
    rt = load_model(requantized.path).runtime(RuntimeOptions(n_threads=2, n_ctx=N_CTX, max_batch=N_CTX))
    agree = total = decisive = decisive_agree = 0
    corrs = []
    for name, ids in sequences.items():
        assert len(ids) <= N_CTX
        ours = rt.prefill(ids, all_logits=True)
        theirs = llama_cpp_logits(requantized.path, ids)
        second, first = np.partition(theirs, -2, axis=1)[:, -2:].T
        mask = first - second >= DECISIVE
        ours_top, theirs_top = ours.argmax(axis=1), theirs.argmax(axis=1)
        same = ours_top == theirs_top
        bad = np.flatnonzero(mask & ~same)
        assert not len(bad), (f"{requantized.type} {name}: decisive positions {bad.tolist()} differ: ours "
                              f"{ours_top[bad].tolist()} llama.cpp {theirs_top[bad].tolist()}")
        agree += int(same.sum())
        total += len(same)
        decisive += int(mask.sum())
        decisive_agree += int(same[mask].sum())
        corrs += [np.corrcoef(x, y)[0, 1] for x, y in zip(ours, theirs)]
    corrs = np.array(corrs)
    parity_report.append(
        f"parity [{requantized.type}, requantized by llama.cpp] {len(sequences)} texts: argmax "
        f"agreement {agree}/{total} ({100 * agree / total:.1f} %), decisive {decisive_agree}/{decisive}, "
        f"logit correlation min {corrs.min():.4f} median {np.median(corrs):.5f}")
    assert agree / total >= 0.93
    assert corrs.min() >= MIN_CORRELATION[requantized.type]


def test_the_quantizer_reports_progress_and_its_copy_is_reused(real_model, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_SLM_HOME", str(tmp_path))
    seen = []
    v = variant(real_model, "q4_0", lambda done, total: seen.append((done, total)))
    assert seen == [(k, 272) for k in range(1, 273)]  # a line per tensor
    assert v.made_from["quantizer"] == f"llama.cpp's quantizer (llama-cpp-python {llama_cpp.__version__})"
    types = {t.type.name for t in load_model(v.path).tensors.values()}
    assert types == {"Q4_0", "Q8_0", "F32"}  # the tied embedding falls back to Q8_0
    assert variant(real_model, "q4_0", lambda done, total: pytest.fail("made again")) == v
